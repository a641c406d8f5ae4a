#!/usr/bin/env bash
# Re-trains the embedded shapes-world teacher and distils its GSPN adapter,
# then exports both into gspn_diffusers/shapes/assets (see its README.md).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh >/dev/null
# shellcheck disable=SC1091
. "${GSPN_VENV:-.venv}/bin/activate"
mkdir -p work
python -m gspn_diffusers.shapes.teacher --output_dir work/vae-stage --vae_steps 600 --unet_steps 0
python -m gspn_diffusers.shapes.teacher --output_dir work/teacher-64 --vae_from work/vae-stage \
    --unet_steps 5000 --batch_size 32 --unet_lr 8e-4 --warmup_steps 300 \
    --save_every 1000 --eval_prompts 48
python -m gspn_diffusers.shapes.teacher --output_dir work/teacher --init_from work/teacher-64 \
    --vae_multiscale_steps 800 --unet_steps 450 --sizes 64:16,128:4,256:2 --unet_lr 1e-4 \
    --warmup_steps 0 --ema_decay 0.995 --eval_prompts 48
python -m gspn_diffusers.shapes.prompts --count 512 --out work/prompts.txt
python distill/distill.py --pretrained_model_name_or_path work/teacher --output_dir work/adapter \
    --prompts_file work/prompts.txt --resolution 64 128 --max_train_steps 2000 --train_batch_size 16 \
    --learning_rate 1e-3 --lr_warmup_steps 50 --teacher_steps 20 --teacher_guidance_scale 2 \
    --checkpointing_steps 500 --report_to none --seed 0
python -m gspn_diffusers.shapes.export work/teacher work/adapter gspn_diffusers/shapes/assets
python benchmarks/fidelity.py --quick
