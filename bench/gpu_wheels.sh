#!/usr/bin/env bash
# The wheels bench/gpu_check.sh needs on the GPU image (Python 3.12, x86-64), into .whl/ (git-ignored):
# the versions this project is tested with, for what the image lacks or has older.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
for spec in bitsandbytes==0.50.2 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 transformers==5.24.0; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
    --platform any -d .whl "$spec"
done
ls -la .whl
