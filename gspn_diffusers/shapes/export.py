"""Copy a trained teacher (as fp16 safetensors) and its adapter into the
package's embedded assets.

    python -m gspn_diffusers.shapes.export TEACHER_DIR ADAPTER_DIR gspn_diffusers/shapes/assets
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import torch


def export(teacher: Path, adapter: Path, assets: Path) -> None:
    """Write ``assets/teacher`` (fp16 weights) and ``assets/gspn_adapter``."""
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(teacher, torch_dtype=torch.float16)
    target = assets / "teacher"
    if target.exists():
        shutil.rmtree(target)
    pipe.save_pretrained(target, safe_serialization=True)
    out = assets / "gspn_adapter"
    out.mkdir(parents=True, exist_ok=True)
    for name in ("gspn_adapter.json", "gspn_adapter.safetensors"):
        shutil.copy2(adapter / name, out / name)
    print(f"exported to {assets}")


if __name__ == "__main__":
    export(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]))
