"""What differs between the diffusers versions gspn-diffusers supports (>= 0.30)."""

from __future__ import annotations

import diffusers
import torch
from packaging.version import Version

# diffusers 0.40 renamed from_pretrained's torch_dtype to dtype (and warns on the old name); older
# versions do not know dtype.
_DTYPE_KEYWORD = "dtype" if Version(diffusers.__version__).release >= (0, 40) else "torch_dtype"


def from_pretrained_dtype(dtype: torch.dtype) -> dict:
    """``{"dtype": dtype}`` for this diffusers' ``from_pretrained`` (``torch_dtype``
    before 0.40), so loading warns on no version: ``from_pretrained(path, **from_pretrained_dtype(d))``."""
    return {_DTYPE_KEYWORD: dtype}
