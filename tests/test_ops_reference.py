"""The reference scan against a literal, scalar transcription of the recurrence.

The reference is the oracle for every kernel test, so it is itself checked
against the formula of the operator issue written with explicit row/column
coordinates, independent of its own transpose/flip bookkeeping.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from gspn_diffusers.ops import DIRECTIONS, normalize_gates, normalize_gates_4dir, scan_reference
from helpers import generator_for


def naive_scan(x, gates, lam, direction, chunk):
    """h[t, p] = lam*x + sum_k gates[k][t, p] * h[t-1, p-1+k], element by element."""
    batch, channels, height, width = x.shape
    per_group = channels // gates.shape[1]
    lines, length = (height, width) if direction in ("tb", "bt") else (width, height)

    def coord(t, p):
        return {"tb": (t, p), "bt": (height - 1 - t, p), "lr": (p, t), "rl": (p, width - 1 - t)}[direction]

    out = torch.zeros_like(x, dtype=torch.float64)
    for b, c in itertools.product(range(batch), range(channels)):
        g = c // per_group
        for t in range(lines):
            for p in range(length):
                i, j = coord(t, p)
                v = float(lam[b, c, i, j]) * float(x[b, c, i, j])
                if t > 0 and not (chunk is not None and t % chunk == 0):
                    for k in range(3):
                        q = p - 1 + k
                        if 0 <= q < length:
                            i2, j2 = coord(t - 1, q)
                            v += float(gates[b, g, k, i, j]) * float(out[b, c, i2, j2])
                out[b, c, i, j] = v
    return out


@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("chunk", [None, 1, 2, 3])
@pytest.mark.parametrize("hw", [(1, 1), (3, 5), (4, 2)])
def test_reference_matches_formula(direction, chunk, hw):
    gen = generator_for(direction, chunk, hw)
    x = torch.randn(2, 4, *hw, generator=gen, dtype=torch.float64)
    lam = torch.randn(2, 4, *hw, generator=gen, dtype=torch.float64)
    gates = torch.randn(2, 2, 3, *hw, generator=gen, dtype=torch.float64)
    got = scan_reference(x, gates, lam, direction, chunk)
    torch.testing.assert_close(got, naive_scan(x, gates, lam, direction, chunk), rtol=1e-12, atol=1e-12)


def test_lr_is_published_form():
    """'lr': tap 0 = row i-1, tap 1 = row i, tap 2 = row i+1 of column j-1."""
    x = torch.zeros(1, 1, 3, 2, dtype=torch.float64)
    x[0, 0, :, 0] = torch.tensor([1.0, 10.0, 100.0])
    lam = torch.ones_like(x)
    gates = torch.zeros(1, 1, 3, 3, 2, dtype=torch.float64)
    gates[0, 0, 0, 1, 1] = 1.0  # row 1 of column 1 takes row 0 of column 0
    gates[0, 0, 2, 0, 1] = 2.0  # row 0 of column 1 takes row 1 of column 0
    h = scan_reference(x, gates, lam, "lr")
    assert h[0, 0, 1, 1] == 1.0 and h[0, 0, 0, 1] == 20.0 and h[0, 0, 2, 1] == 0.0


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_normalize_gates_rows_are_stochastic(direction):
    logits = torch.randn(2, 3, 3, 5, 7, dtype=torch.float64) * 4
    g = normalize_gates(logits, direction)
    assert (g >= 0).all()
    torch.testing.assert_close(g.sum(-3), torch.ones(2, 3, 5, 7, dtype=torch.float64))
    first, last = (g[..., 0, 0, :], g[..., 2, -1, :]) if direction in ("lr", "rl") else (g[..., 0, :, 0], g[..., 2, :, -1])
    assert (first == 0).all() and (last == 0).all(), "taps reaching outside the line must be zero"


def test_normalize_gates_single_position_line():
    g = normalize_gates(torch.randn(1, 1, 3, 4, 1), "tb")
    torch.testing.assert_close(g[:, :, 1], torch.ones(1, 1, 4, 1))


@pytest.mark.parametrize("directions", [DIRECTIONS, ("rl", "tb")])
def test_normalize_gates_4dir_is_each_direction(directions):
    logits = torch.randn(2, len(directions), 2, 3, 5, 7) * 4
    got = normalize_gates_4dir(logits, directions)
    for d, direction in enumerate(directions):
        torch.testing.assert_close(got[:, d], normalize_gates(logits[:, d], direction), rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match=rf"\(B, {len(directions)}, G, 3, H, W\)"):
        normalize_gates_4dir(logits[:, :1], directions)
    with pytest.raises(ValueError, match="directions must be among"):
        normalize_gates_4dir(logits, ("tb", "up"))


def test_normalize_gates_errors():
    with pytest.raises(ValueError, match="direction"):
        normalize_gates(torch.zeros(1, 1, 3, 2, 2), "up")
    with pytest.raises(ValueError, match=r"\(\.\.\., 3, H, W\)"):
        normalize_gates(torch.zeros(1, 1, 2, 2, 2), "tb")
