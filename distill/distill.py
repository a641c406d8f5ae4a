"""Distil GSPN layers from a pretrained diffusers checkpoint.

    accelerate launch distill/distill.py --pretrained_model_name_or_path PATH_OR_ID \
        --output_dir DIR --prompts_file prompts.txt [...]
    python distill/distill.py ...          # one process
    python distill/distill.py --help       # every option

The logic lives in gspn_diffusers.distill; this file only starts it.
"""

from gspn_diffusers.distill import main

if __name__ == "__main__":
    raise SystemExit(main())
