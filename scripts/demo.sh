#!/usr/bin/env bash
# The main job on the embedded default: sets everything up on a fresh machine,
# then generates an image with the shapes-world model and its GSPN adapter at
# 8x its native size (512x512 from a 64x64 model) on the CPU, and prints where
# it is.
#   bash scripts/demo.sh ["prompt"] [width] [height]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh >/dev/null
# shellcheck disable=SC1091
. "${GSPN_VENV:-.venv}/bin/activate"
prompt="${1:-a red circle at the top left and a blue square at the bottom right}"
width="${2:-512}"
height="${3:-512}"
assets=$(python -c "from gspn_diffusers.shapes.assets import TEACHER_DIR, ADAPTER_DIR, available; \
import sys; sys.exit('embedded model missing: see gspn_diffusers/shapes/assets/README.md') if not available() else print(TEACHER_DIR, ADAPTER_DIR)")
read -r teacher adapter <<<"$assets"
mkdir -p out
# One upscaling stage (--stage_growth 8): every pixel-upscaling stage is a VAE
# round trip, and on this model each one loses objects (BENCHMARKS.md, fidelity).
# --color_fix: the 512-px stage keeps the 64-px image's colours, adds the detail.
gspn-diffusers generate --model "$teacher" --adapter "$adapter" --prompt "$prompt" \
    --width "$width" --height "$height" --steps 25 --guidance_scale 2 --upscale_mode pixel --stage_growth 8 \
    --color_fix \
    --dilated_sampling --dilated_sampling_size 32 --vae_tile 32 --out out/demo.png --save_stages out/demo-stages
echo "image: $(pwd)/out/demo.png"
