"""Generate an ultra-high-resolution image with GSPN in stages.

    python examples/generate_highres.py BASE ADAPTER "a lighthouse at dawn" 4096 4096 out.png

BASE is an SD-1.x/2.x or SDXL pipeline (folder or Hub repo id), ADAPTER a
GSPN adapter for it (see distill/). The same as
`gspn-diffusers generate --model BASE --adapter ADAPTER --prompt ... --width ... --height ... --out ...`.
"""

import sys

import torch

from gspn_diffusers import GSPNHighResPipeline
from gspn_diffusers.compat import from_pretrained_dtype  # dtype= or torch_dtype=, by diffusers version
from gspn_diffusers.pipelines import save_png

base, adapter, prompt, width, height, out = sys.argv[1:7]
device = "cuda" if torch.cuda.is_available() else "cpu"
dtype = torch.float16 if device == "cuda" else torch.float32

pipe = GSPNHighResPipeline.from_pretrained(base, adapter=adapter, **from_pretrained_dtype(dtype)).to(device)
result = pipe(prompt, width=int(width), height=int(height), generator=torch.Generator(device).manual_seed(0))
for stage in result.stages:
    print(f"stage {stage.index + 1}: {stage.width}x{stage.height}, {stage.steps} steps, {stage.seconds:.1f} s")
save_png(result.images[0], out, {"prompt": prompt, "model": base, "adapter": adapter, "seed": 0})
print(f"wrote {out}")
