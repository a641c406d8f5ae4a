"""Wavelet colour fix: an upscaling stage keeps its reference's low frequencies.

An upscaling stage should add the detail its smaller reference cannot hold,
not change what the reference already says. Diffusion at many times the
native size drifts in colour (objects darker or shifted towards a neighbouring
hue, bright fringes at edges), which moves an object's colour - and sometimes
part of an object - across a palette boundary. The fix (as in StableSR's
wavelet colour fix) splits both images with an a-trous low-pass and keeps the
generated image's high band over the reference's low band:

    fixed = image - lowpass(image) + lowpass(upsample(reference))

The low-pass reaches about one reference pixel: ``levels = log2(growth)``
binomial 3x3 blurs, the i-th with dilation 2^i, so it passes what the
reference resolved and leaves everything finer to the generated image.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def lowpass(images: torch.Tensor, levels: int) -> torch.Tensor:
    """``levels`` binomial 3x3 blurs of (B, C, H, W) ``images``, the i-th dilated
    by 2^i (an a-trous pyramid's coarse band); edges replicated."""
    kernel = torch.tensor([1.0, 2.0, 1.0], dtype=images.dtype, device=images.device)
    kernel = (kernel[:, None] * kernel[None, :] / 16).expand(images.shape[1], 1, 3, 3)
    for level in range(levels):
        d = 2**level
        images = F.conv2d(F.pad(images, (d, d, d, d), mode="replicate"), kernel, dilation=d, groups=images.shape[1])
    return images


def fix_levels(size: int, reference_size: int) -> int:
    """Blur levels that reach one reference pixel at ``size``: ceil(log2(growth)), at least 1."""
    return max(1, math.ceil(math.log2(max(size / reference_size, 1.0)) - 1e-9))


def wavelet_color_fix(images: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """``images`` (B, C, H, W) with the low band of ``reference`` (B, C, h, w),
    a smaller image of the same scene, bicubically upsampled. Not clamped:
    callers clamp to their value range."""
    if images.dim() != 4 or reference.dim() != 4 or images.shape[:2] != reference.shape[:2]:
        raise ValueError(f"wavelet_color_fix: images {tuple(images.shape)} and reference {tuple(reference.shape)} "
                         "must both be (B, C, H, W) with the same B and C")
    levels = fix_levels(max(images.shape[-2:]), max(reference.shape[-2:]))
    out = torch.empty_like(images)
    # One image and channel at a time: at 16K a full (B, 3, H, W) float batch
    # and its blurred copies would be several GB each.
    for b in range(images.shape[0]):
        for c in range(images.shape[1]):
            image = images[b:b + 1, c:c + 1].float()
            ref = F.interpolate(reference[b:b + 1, c:c + 1].float(), size=images.shape[-2:], mode="bicubic",
                                align_corners=False)
            # lowpass is linear (replicate padding included): one pass over the
            # difference instead of one over each image
            out[b:b + 1, c:c + 1] = image + lowpass(ref - image, levels)
    return out
