"""Pure-PyTorch GSPN scan: the oracle for every kernel test, and the fallback
backend when the compiled extension cannot be built.

Written from the recurrence in ``../shared/design/GSPN.md`` section 1. Every
direction is reduced to one canonical form -- lines along dim -2 in scan order,
positions along dim -1 in increasing row/column index -- by a transpose and/or
flip, then one Python loop runs over the lines, each line fully vectorised.
The loop keeps autograd working, so this module needs no backward of its own.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

DIRECTIONS = ("tb", "bt", "lr", "rl")
"""Scan directions: top-to-bottom, bottom-to-top, left-to-right, right-to-left.
Their index in this tuple is the direction code the compiled op takes."""

GATE_EPS = 1e-12
"""Floor of the gate normaliser (same constant as ``kGateEps`` in csrc/gspn_scan.h)."""


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the scan accumulates in: float64 for float64 inputs, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _scans_columns(direction: str) -> bool:
    return direction in ("lr", "rl")


def to_lines(t: torch.Tensor, direction: str) -> torch.Tensor:
    """View ``(..., H, W)`` as ``(..., lines, positions)`` in scan order."""
    if _scans_columns(direction):
        t = t.transpose(-1, -2)
    if direction in ("bt", "rl"):
        t = t.flip(-2)
    return t


def from_lines(t: torch.Tensor, direction: str) -> torch.Tensor:
    """Inverse of :func:`to_lines`."""
    if direction in ("bt", "rl"):
        t = t.flip(-2)
    if _scans_columns(direction):
        t = t.transpose(-1, -2)
    return t


def tap_mask(height: int, width: int, direction: str, dtype: torch.dtype, device) -> torch.Tensor:
    """``(3, H, W)`` mask: 0 where a tap's neighbour lies outside the line, else 1.

    Tap 0 reads position p-1, tap 2 position p+1; positions run along W for the
    row scans ("tb", "bt") and along H for the column scans ("lr", "rl").
    """
    mask = torch.ones(3, height, width, dtype=dtype, device=device)
    axis = 1 if _scans_columns(direction) else 2
    mask[0].select(axis - 1, 0).zero_()
    mask[2].select(axis - 1, mask.shape[axis] - 1).zero_()
    return mask


def normalize_gates(logits: torch.Tensor, direction: str) -> torch.Tensor:
    """Stability-context normalisation of gate logits shaped ``(..., 3, H, W)``.

    Each tap goes through a sigmoid; taps whose neighbour lies outside the
    image are dropped; the rest are divided by their sum (clamped away from 0),
    so the gates of every position are non-negative and sum to one.
    """
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
    if logits.dim() < 3 or logits.shape[-3] != 3:
        raise ValueError(f"logits must have shape (..., 3, H, W), got {tuple(logits.shape)}")
    acc = accumulation_dtype(logits.dtype)
    return _normalize_masked(logits, tap_mask(logits.shape[-2], logits.shape[-1], direction, acc, logits.device))


def normalize_gates_4dir(logits: torch.Tensor, directions: Sequence[str] = DIRECTIONS) -> torch.Tensor:
    """:func:`normalize_gates` for every direction of ``(B, D, G, 3, H, W)``
    logits at once (direction d of dim 1 is ``directions[d]``), as
    :func:`~gspn_diffusers.ops.gspn_scan_4dir` takes them: a dozen small
    kernels instead of four times as many, which is what a GPU layer at low
    resolution waits on."""
    unknown = [d for d in directions if d not in DIRECTIONS]
    if unknown:
        raise ValueError(f"directions must be among {DIRECTIONS}, got {unknown}")
    if logits.dim() != 6 or logits.shape[3] != 3 or logits.shape[1] != len(directions):
        raise ValueError(
            f"logits must have shape (B, {len(directions)}, G, 3, H, W) for directions {tuple(directions)}, "
            f"got {tuple(logits.shape)}"
        )
    acc = accumulation_dtype(logits.dtype)
    height, width = logits.shape[-2:]
    # Row scans share one mask and column scans another.
    masks = {
        columns: tap_mask(height, width, "lr" if columns else "tb", acc, logits.device)
        for columns in {_scans_columns(d) for d in directions}
    }
    mask = torch.stack([masks[_scans_columns(d)] for d in directions]).unsqueeze(1)  # (D, 1, 3, H, W)
    return _normalize_masked(logits, mask)


def _normalize_masked(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    s = torch.sigmoid(logits.to(mask.dtype)) * mask
    gates = s / s.sum(dim=-3, keepdim=True).clamp_min(GATE_EPS)
    return gates.to(logits.dtype)


def scan_reference(
    x: torch.Tensor,
    gates: torch.Tensor,
    lam: torch.Tensor,
    direction: str = "tb",
    chunk: Optional[int] = None,
    normalize: bool = False,
    decay: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """One-direction scan. x, lam: (B, C, H, W); gates: (B, G, 3, H, W).

    Accumulates in float32 (float64 for float64 inputs) and returns x's dtype.
    With ``normalize`` the gates are logits and go through
    :func:`normalize_gates` first; ``decay`` (B, G, H, W), logits too, then
    weighs each position's taps by its sigmoid.
    """
    acc = accumulation_dtype(x.dtype)
    if decay is not None and not normalize:
        raise ValueError("decay weighs normalised gates: it needs normalize=True (gates given as logits)")
    if normalize:
        gates = normalize_gates(gates, direction)
        if decay is not None:
            gates = gates.to(acc) * torch.sigmoid(decay.to(acc)).unsqueeze(-3)
    batch, channels = x.shape[:2]
    groups = gates.shape[1]
    lam_x = to_lines(lam.to(acc) * x.to(acc), direction)  # (B, C, T, L)
    # Channel c reads gate group c // (C // G).
    taps = to_lines(gates.to(acc), direction).repeat_interleave(channels // groups, dim=1)  # (B, C, 3, T, L)
    lines = lam_x.shape[-2]
    hidden = []
    prev = None
    for t in range(lines):
        h = lam_x[..., t, :]
        if prev is not None and not (chunk is not None and t % chunk == 0):
            padded = F.pad(prev, (1, 1))
            h = (
                h
                + taps[:, :, 0, t] * padded[..., :-2]
                + taps[:, :, 1, t] * prev
                + taps[:, :, 2, t] * padded[..., 2:]
            )
        hidden.append(h)
        prev = h
    out = torch.stack(hidden, dim=-2) if hidden else lam_x
    return from_lines(out, direction).to(x.dtype).reshape(batch, channels, *x.shape[2:])


def scan_directions_reference(
    x: torch.Tensor,
    gates: torch.Tensor,
    lam: torch.Tensor,
    directions: Sequence[str] = DIRECTIONS,
    chunk: Optional[int] = None,
    normalize: bool = False,
    decay: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Several directions: gates (B, D, G, 3, H, W); x and lam (B, C, H, W)
    shared by all directions or (B, D, C, H, W); decay (B, D, G, H, W) or
    None. Returns (B, D, C, H, W)."""
    outs = []
    for d, direction in enumerate(directions):
        xd = x if x.dim() == 4 else x[:, d]
        lamd = lam if lam.dim() == 4 else lam[:, d]
        decay_d = None if decay is None else decay[:, d]
        outs.append(scan_reference(xd, gates[:, d], lamd, direction, chunk, normalize, decay_d))
    return torch.stack(outs, dim=1)
