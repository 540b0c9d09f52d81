#!/usr/bin/env bash
# Fetch, on a machine with a package index, the pure-Python wheels that gpu_check.sh installs on a GPU
# machine that has none: the pinned versions of the packages whose version on that machine's image differs
# from requirements.txt, or that it lacks. Into .whl/ (ignored by git), for Python 3.12 on x86-64.
#
#   bash bench/gpu_wheels.sh [DEST]     # default .whl
set -euo pipefail
cd "$(dirname "$0")/.."
DEST="${1:-.whl}"
mkdir -p "$DEST"
# version pins read from requirements.txt, so the carried wheels are the tested ones
pin() { grep -E "^$1==" requirements.txt | head -1; }
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$DEST" "$(pin timm)" "$(pin einops)"
ls -l "$DEST"
