"""The embedded default: the shapes-world teacher and its distilled GSPN
adapter, shipped as safetensors (see README.md in this folder for the exact
commands that reproduce them)."""

from pathlib import Path

ASSETS_DIR = Path(__file__).resolve().parent
TEACHER_DIR = ASSETS_DIR / "teacher"
ADAPTER_DIR = ASSETS_DIR / "gspn_adapter"


def available() -> bool:
    """Whether the embedded teacher and adapter are present."""
    return (TEACHER_DIR / "model_index.json").exists() and (ADAPTER_DIR / "gspn_adapter.json").exists()
