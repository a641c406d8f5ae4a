#!/usr/bin/env bash
# Creates .venv (or uses $GSPN_VENV) with the CPU build of torch 2.13.0 and
# gspn-diffusers installed in editable mode with its test extras. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${GSPN_VENV:-.venv}"
python3 -m venv "$venv"
# shellcheck disable=SC1091
. "$venv/bin/activate"
export PIP_DISABLE_PIP_VERSION_CHECK=1
# torch first, pinned: any other torch requirement may pull a multi-GB CUDA build.
pip install -q "torch==2.13.0"
pip install -q -e ".[test]"
python - <<'PY'
import sys, torch
if torch.version.cuda is not None:
    sys.exit(f"setup: a CUDA build of torch was installed ({torch.__version__}); expected the CPU wheel")
print(f"setup: torch {torch.__version__} (CPU) in {sys.prefix}")
PY
