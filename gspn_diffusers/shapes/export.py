"""Copy a trained teacher (as fp16 safetensors) and its adapter into the
package's embedded assets.

    python -m gspn_diffusers.shapes.export TEACHER_DIR ADAPTER_DIR gspn_diffusers/shapes/assets

ADAPTER_DIR ``-`` exports the teacher alone (a run stopped before distillation).
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import Optional

import torch


def export(teacher: Path, adapter: Optional[Path], assets: Path) -> None:
    """Write ``assets/teacher`` (fp16 weights) and, unless ``adapter`` is None,
    ``assets/gspn_adapter``."""
    from diffusers import DiffusionPipeline

    from ..compat import from_pretrained_dtype

    pipe = DiffusionPipeline.from_pretrained(teacher, **from_pretrained_dtype(torch.float16))
    target = assets / "teacher"
    if target.exists():
        shutil.rmtree(target)
    pipe.save_pretrained(target, safe_serialization=True)
    if adapter is None:
        print(f"exported the teacher alone to {assets}")
        return
    out = assets / "gspn_adapter"
    out.mkdir(parents=True, exist_ok=True)
    for name in ("gspn_adapter.json", "gspn_adapter.safetensors"):
        shutil.copy2(adapter / name, out / name)
    print(f"exported to {assets}")


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit("usage: python -m gspn_diffusers.shapes.export TEACHER_DIR ADAPTER_DIR|- ASSETS_DIR")
    export(Path(sys.argv[1]), None if sys.argv[2] == "-" else Path(sys.argv[2]), Path(sys.argv[3]))
