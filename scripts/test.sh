#!/usr/bin/env bash
# Sets everything up on a fresh machine, then runs the whole test suite:
#   bash scripts/test.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# shellcheck disable=SC1091
. "${GSPN_VENV:-.venv}/bin/activate"
# Build the compiled kernels once, before the test workers start.
GSPN_BACKEND=compiled gspn-diffusers build
# Every CUDA source must compile, even on a machine without a GPU.
python scripts/check_cuda_compiles.py
python -m pytest -n "${GSPN_TEST_WORKERS:-2}" "$@" tests
