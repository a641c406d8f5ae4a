#!/usr/bin/env bash
# Re-trains the embedded shapes-world teacher and distils its GSPN adapter,
# then exports both into gspn_diffusers/shapes/assets (see its README.md).
#
#   bash scripts/reproduce_shapes.sh              # the shipped recipe (CPU: ~3.5 hours)
#   bash scripts/reproduce_shapes.sh --gpu        # a longer teacher schedule for a GPU
#   bash scripts/reproduce_shapes.sh --no-setup   # use the active Python as it is
#
# --no-setup is for machines without a package registry (the device machines:
# `bash scripts/gpu_check.sh build shapes` runs `--gpu --no-setup` there).
# SHAPES_WORK (default work/) holds the stages' outputs, SHAPES_ASSETS (default
# the package's assets folder) receives the export.
set -euo pipefail
cd "$(dirname "$0")/.."
gpu=0 setup=1
for arg in "$@"; do
    case $arg in
        --gpu) gpu=1 ;;
        --no-setup) setup=0 ;;
        *) echo "reproduce_shapes.sh: unknown argument $arg (expected --gpu, --no-setup)" >&2; exit 2 ;;
    esac
done
if ((setup)); then
    bash scripts/setup.sh >/dev/null
    # shellcheck disable=SC1091
    . "${GSPN_VENV:-.venv}/bin/activate"
fi
work="${SHAPES_WORK:-work}" assets="${SHAPES_ASSETS:-gspn_diffusers/shapes/assets}"
mkdir -p "$work" "$assets"
# The CPU recipe stops the 64 px denoiser at 5000 steps of 32 scenes for time.
# The GPU recipe sees 3.2x the scenes (8000 steps of 64; a model this small
# leaves a GPU idle at 32) and should fit one device call of ~8 minutes with
# its distillation (not yet run on a GPU: the step counts are estimates).
vae_steps=600 unet_steps=5000 batch=32 multiscale_steps=450 device=cpu
((gpu)) && vae_steps=1500 unet_steps=8000 batch=64 multiscale_steps=1000 device=cuda
set -x
python3 -m gspn_diffusers.shapes.teacher --output_dir "$work/vae-stage" --vae_steps "$vae_steps" --unet_steps 0
python3 -m gspn_diffusers.shapes.teacher --output_dir "$work/teacher-64" --vae_from "$work/vae-stage" \
    --unet_steps "$unet_steps" --batch_size "$batch" --unet_lr 8e-4 --warmup_steps 300 \
    --save_every 1000 --eval_prompts 48
python3 -m gspn_diffusers.shapes.teacher --output_dir "$work/teacher" --init_from "$work/teacher-64" \
    --vae_multiscale_steps 800 --unet_steps "$multiscale_steps" --sizes 64:16,128:4,256:2 --unet_lr 1e-4 \
    --warmup_steps 0 --ema_decay 0.995 --eval_prompts 48
python3 -m gspn_diffusers.shapes.prompts --count 512 --out "$work/prompts.txt"
python3 distill/distill.py --pretrained_model_name_or_path "$work/teacher" --output_dir "$work/adapter" \
    --prompts_file "$work/prompts.txt" --resolution 64 128 --max_train_steps 2000 --train_batch_size 16 \
    --learning_rate 1e-3 --lr_warmup_steps 50 --teacher_steps 20 --teacher_guidance_scale 2 \
    --checkpointing_steps 500 --report_to none --seed 0
python3 -m gspn_diffusers.shapes.export "$work/teacher" "$work/adapter" "$assets"
python3 benchmarks/fidelity.py --quick --teacher "$assets/teacher" --adapter "$assets/gspn_adapter" \
    --device "$device" --json "$work/fidelity_quick.json"
