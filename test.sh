#!/usr/bin/env bash
# Set up the venv, make sure the bundled model is converted (tests that need a
# real model use its cache), then run the test suite.  Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"

bash scripts/setup.sh
.venv/bin/python -c 'from remp.weights.bundled import bundled_model_dir; print("bundled model:", bundled_model_dir())'
exec .venv/bin/python -m pytest -q "$@"
