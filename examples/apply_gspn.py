"""Load a diffusers pipeline, swap its self-attention for GSPN, generate.

    python examples/apply_gspn.py PATH_OR_REPO [--adapter DIR] [--prompt "..."] [--out image.png]

Without an adapter the GSPN layers are freshly initialised from the
attention they replace: the pipeline runs, but images need a distilled
adapter (see distill/) to look right.
"""

import argparse

import torch
from diffusers import DiffusionPipeline

from gspn_diffusers import apply_gspn, remove_gspn
from gspn_diffusers.compat import from_pretrained_dtype  # dtype= or torch_dtype=, by diffusers version

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("model", help="a local pipeline folder or a Hub repo id")
parser.add_argument("--adapter", default=None, help="GSPN adapter folder or Hub repo id")
parser.add_argument("--prompt", default="a red circle at the top left")
parser.add_argument("--steps", type=int, default=20)
parser.add_argument("--out", default="gspn.png")
args = parser.parse_args()

device = "cuda" if torch.cuda.is_available() else "cpu"
dtype = torch.float16 if device == "cuda" else torch.float32
pipe = DiffusionPipeline.from_pretrained(args.model, **from_pretrained_dtype(dtype)).to(device)

apply_gspn(pipe, adapter=args.adapter)  # one call; remove_gspn(pipe) undoes it
image = pipe(args.prompt, num_inference_steps=args.steps, generator=torch.Generator(device).manual_seed(0)).images[0]
image.save(args.out)
print(f"wrote {args.out}")
remove_gspn(pipe)
