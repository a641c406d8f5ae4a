"""The wavelet colour fix of upscaling stages (gspn_diffusers.pipelines.color_fix)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gspn_diffusers.pipelines.color_fix import fix_levels, lowpass, wavelet_color_fix


def upsampled(reference, size):
    return F.interpolate(reference, size=size, mode="bicubic", align_corners=False)


def test_levels_reach_one_reference_pixel():
    assert fix_levels(512, 64) == 3 and fix_levels(128, 64) == 1 and fix_levels(384, 128) == 2
    assert fix_levels(64, 64) == 1 and fix_levels(1024, 64) == 4


def test_lowpass_keeps_constants_and_removes_the_finest_checkerboard():
    assert torch.allclose(lowpass(torch.full((1, 2, 9, 7), 0.25), 3), torch.full((1, 2, 9, 7), 0.25))
    i, j = torch.meshgrid(torch.arange(32), torch.arange(32), indexing="ij")
    checker = ((-1.0) ** (i + j))[None, None]
    # [1 2 1] / 4 sums a +1 -1 +1 pattern to zero; edges see replicated pixels
    assert lowpass(checker, 1)[..., 1:-1, 1:-1].abs().max() < 1e-6


def test_colour_drift_is_removed_and_fine_detail_kept():
    torch.manual_seed(0)
    reference = torch.rand(2, 3, 16, 16) * 2 - 1
    base = upsampled(reference, (128, 128))
    i, j = torch.meshgrid(torch.arange(128), torch.arange(128), indexing="ij")
    detail = 0.1 * ((-1.0) ** (i + j))
    drift = torch.tensor([0.3, -0.2, 0.1])[None, :, None, None]
    fixed = wavelet_color_fix(base + drift + detail, reference)
    inner = (..., slice(8, -8), slice(8, -8))
    # the drift (lowest frequency) is gone, the pixel-scale detail survives
    torch.testing.assert_close(fixed[inner], (base + detail)[inner], atol=1e-5, rtol=0)
    # without drift or detail the image is the upsampled reference
    torch.testing.assert_close(wavelet_color_fix(base, reference), base, atol=1e-5, rtol=0)


def test_bad_shapes():
    with pytest.raises(ValueError, match="same B and C"):
        wavelet_color_fix(torch.zeros(1, 3, 32, 32), torch.zeros(1, 4, 8, 8))
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        wavelet_color_fix(torch.zeros(3, 32, 32), torch.zeros(3, 8, 8))
