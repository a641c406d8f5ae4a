"""Helpers shared by the tests (importable: pytest puts tests/ on sys.path)."""

from __future__ import annotations

import zlib

import torch


def generator_for(*key) -> torch.Generator:
    """A CPU generator seeded from ``key`` the same way in every process."""
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


def assert_close_scaled(actual, expected, rtol, what=""):
    """|actual - expected| <= rtol * max|expected| everywhere (scale-aware, no NaN)."""
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    actual = actual.double().cpu()
    expected = expected.double().cpu()
    scale = expected.abs().max().clamp_min(1e-30)
    err = (actual - expected).abs().max() / scale
    assert err <= rtol, f"{what}: max error {err.item():.3g} x max|ref| exceeds {rtol:.1g}"
