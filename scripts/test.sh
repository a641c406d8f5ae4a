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
# The CUDA kernels' logic without a GPU: the kernel tests once more, with CPU
# tensors running the CUDA kernels in the CPU simulator (csrc/sim/).
# GSPN_TEST_CUDA_SIM=0 skips this step.
if [ "${GSPN_TEST_CUDA_SIM:-1}" = 1 ]; then
    export GSPN_CUDA_SIM=1
    GSPN_BACKEND=compiled gspn-diffusers build
    python -m pytest -n "${GSPN_TEST_WORKERS:-2}" tests/test_ops_kernels.py
fi
