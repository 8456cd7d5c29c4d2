#!/usr/bin/env bash
# Set up a virtual environment (CPU torch from the local wheel when there is no GPU) and run the
# default test suite. Usage: bash tests/run.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
. .venv/bin/activate
python -m ruff check alignment tests launch bench
python -m pytest -p no:cacheprovider "$@"
