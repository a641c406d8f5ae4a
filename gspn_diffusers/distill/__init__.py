"""Distillation of GSPN layers from a pretrained checkpoint's self-attention.

``main(argv)`` is what ``distill/distill.py`` and ``gspn-diffusers distill``
run; see ``--help`` for every option.
"""

from .trainer import main, train

__all__ = ["main", "train"]
