#!/usr/bin/env bash
# Create .venv and install torch first, then this package with its dev extra. torch==2.13.0 is
# pinned explicitly so pip resolves it before anything else: on this project's CPU machines pip
# takes the CPU wheel from the local wheel folder in pip's config (no multi-GB CUDA download);
# elsewhere it is the normal PyPI build (CUDA on Linux). CPU-only machines elsewhere can set
# PIP_INDEX_URL/PIP_EXTRA_INDEX_URL to PyTorch's CPU index before running this.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
python -c "import torch" 2>/dev/null || pip install -q "torch==2.13.0"
pip install -q -e ".[dev]"
