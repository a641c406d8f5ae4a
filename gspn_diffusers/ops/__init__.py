"""GSPN 2D linear propagation: the public operator API.

``gspn_scan`` runs one scan direction, ``gspn_scan_4dir`` several (by default
all four) in one kernel launch, reading the shared input with strided access
instead of flipped copies (on CUDA, planes from 128x128 up run their row and
column scans as one launch each, into one result, the columns staged through
shared memory or, where the planes do not align for that, as row scans of
transposed copies; see ``COLUMNS_AS_ROWS_MIN_PIXELS``). Both are
differentiable in x, gates and lam (and in the gate logits with
``normalize=True``), run the compiled
``gspn::scan`` custom op when it is available and the pure-PyTorch reference
otherwise, and trace under ``torch.compile(fullgraph=True)``.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from .build import BackendStatus, GSPNBuildWarning, load_backend, uses_compiled_kernels
from .reference import DIRECTIONS, normalize_gates, normalize_gates_4dir, scan_directions_reference, scan_reference

__all__ = [
    "DIRECTIONS",
    "BackendStatus",
    "GSPNBuildWarning",
    "gspn_scan",
    "gspn_scan_4dir",
    "load_backend",
    "normalize_gates",
    "normalize_gates_4dir",
    "scan_reference",
]

SUPPORTED_DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)


def _check_tensor(name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"{name} has dtype {t.dtype}; the GSPN scan supports float64, float32, bfloat16 and "
            f"float16. Fix: cast with {name}.float()"
        )


def _check_direction(direction) -> int:
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
    return DIRECTIONS.index(direction)


def _check_chunk(chunk) -> int:
    """Returns the op's encoding: 0 for a global scan."""
    if chunk is None:
        return 0
    if isinstance(chunk, bool) or not isinstance(chunk, int):
        raise TypeError(f"chunk must be a positive int or None (global scan), got {chunk!r}")
    if chunk <= 0:
        raise ValueError(f"chunk must be a positive number of lines or None (global scan), got {chunk}")
    return chunk


def _check_inputs(x, gates, lam, num_dirs: Optional[int]) -> None:
    """Shape/dtype/device checks. ``num_dirs`` None: single-direction layout."""
    for name, t in (("x", x), ("gates", gates), ("lam", lam)):
        _check_tensor(name, t)
    if x.dim() != 4 and not (num_dirs is not None and x.dim() == 5):
        expected = "(B, C, H, W)" if num_dirs is None else "(B, C, H, W) or (B, D, C, H, W)"
        raise ValueError(f"x must have shape {expected}, got a {x.dim()}-D tensor {tuple(x.shape)}")
    batch, channels, height, width = x.shape[0], x.shape[-3], x.shape[-2], x.shape[-1]
    if num_dirs is None:
        expected_gates = (batch, "G", 3, height, width)
        gate_dims = 5
    else:
        expected_gates = (batch, num_dirs, "G", 3, height, width)
        gate_dims = 6
        if x.dim() == 5 and x.shape[1] != num_dirs:
            raise ValueError(f"x has {x.shape[1]} directions along dim 1, expected {num_dirs}")
    if gates.dim() != gate_dims or any(
        e != "G" and s != e for s, e in zip(gates.shape, expected_gates)
    ):
        raise ValueError(
            f"gates must have shape ({', '.join(map(str, expected_gates))}) for x of shape {tuple(x.shape)}, "
            f"got {tuple(gates.shape)}"
        )
    groups = gates.shape[-4]
    if groups < 1 or channels % groups != 0:
        raise ValueError(
            f"gates has G={groups} groups, which does not divide the C={channels} channels of x; "
            "G must divide C (G=C: per-channel gates, G=1: shared by all channels)"
        )
    lam_shapes = [tuple(x.shape)] if num_dirs is None else [
        (batch, channels, height, width), (batch, num_dirs, channels, height, width)
    ]
    if tuple(lam.shape) not in lam_shapes:
        raise ValueError(f"lam must have shape {' or '.join(map(str, lam_shapes))}, got {tuple(lam.shape)}")
    if not (x.dtype == gates.dtype == lam.dtype):
        raise TypeError(
            f"x, gates and lam must share one dtype, got {x.dtype}, {gates.dtype}, {lam.dtype}"
        )
    if not (x.device == gates.device == lam.device):
        raise ValueError(
            f"x, gates and lam must be on one device, got {x.device}, {gates.device}, {lam.device}"
        )


# Column scans ("lr", "rl") on CUDA read one column per line, so a warp's 32
# threads touch 32 rows: read line by line on an H200 they ran 3-10x slower
# than row scans (BENCHMARKS.md). From this many pixels per plane the op runs
# them as a launch of their own (the op's ``columns_as_rows`` argument), in
# place with groups of columns copied ahead into shared memory where the
# planes align for it (rows and chunks of whole 16-byte groups, or 8-byte
# ones for lines too long for those; lines up to 2048 positions forward,
# 1024 backward), else as row scans ("tb", "bt") of
# transposed copies of their inputs whose hidden states are transposed back
# into the one (B, D, C, H, W) result; GSPN_CUDA_COLUMNS=transposed takes
# the copies always. The row and column launches run side by side on two
# CUDA streams (GSPN_CUDA_STREAMS=1: one after the other). A device type missing here (the CPU kernels transpose
# tiles themselves) or None keeps the single launch of the strided kernel.
COLUMNS_AS_ROWS_MIN_PIXELS = {"cuda": 128 * 128}


def _check_decay(decay, gates, normalize: bool) -> None:
    if decay is None:
        return
    _check_tensor("decay", decay)
    if not normalize:
        raise ValueError(
            "decay weighs the normalised gates, so it needs normalize=True (gates given as logits); with gates "
            "used as given, multiply them by decay.sigmoid().unsqueeze(-3) instead"
        )
    expected = tuple(gates.shape[:-3]) + tuple(gates.shape[-2:])
    if tuple(decay.shape) != expected:
        raise ValueError(
            f"decay must have shape {expected} (the gates' {tuple(gates.shape)} without their 3 taps), "
            f"got {tuple(decay.shape)}"
        )
    if decay.dtype != gates.dtype or decay.device != gates.device:
        raise TypeError(
            f"decay must match gates in dtype and device ({gates.dtype} on {gates.device}), "
            f"got {decay.dtype} on {decay.device}"
        )


def _scan(x, gates, lam, directions: Sequence[str], codes: list, chunk: int, normalize: bool, decay=None):
    if not uses_compiled_kernels(x.device.type):
        return scan_directions_reference(x, gates, lam, directions, chunk or None, normalize, decay)
    threshold = COLUMNS_AS_ROWS_MIN_PIXELS.get(x.device.type)
    return torch.ops.gspn.scan(
        x, gates, lam, codes, chunk, normalize, -1 if threshold is None else threshold, decay
    )


def gspn_scan(
    x: torch.Tensor,
    gates: torch.Tensor,
    lam: torch.Tensor,
    direction: str = "tb",
    chunk: Optional[int] = None,
    normalize: bool = False,
    decay: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """One GSPN scan direction.

    Args:
        x, lam: ``(B, C, H, W)``.
        gates: ``(B, G, 3, H, W)``, G dividing C; channel c uses group
            ``c // (C // G)``. Tap k weighs position ``p - 1 + k`` of the
            previous line. Used as given unless ``normalize``.
        direction: ``"tb"``, ``"bt"`` (lines are rows) or ``"lr"``, ``"rl"``
            (lines are columns).
        chunk: lines per chunk; the state resets at every line whose scan
            index is a multiple of ``chunk``. None: one global scan.
        normalize: ``gates`` are logits; apply :func:`normalize_gates` inside
            the kernel (same result, one pass fewer over the gates).
        decay: with ``normalize``, logits ``(B, G, H, W)`` whose sigmoid
            weighs each position's normalised taps (they then sum to
            ``sigmoid(decay) < 1``: a GSPN layer's decaying average), fused
            like the normalisation: the same as gates
            ``normalize_gates(gates, direction) * decay.sigmoid().unsqueeze(2)``.

    Returns:
        h ``(B, C, H, W)`` in x's dtype, accumulated in float32 (float64 for
        float64 inputs).
    """
    _check_inputs(x, gates, lam, None)
    _check_decay(decay, gates, normalize)
    code = _check_direction(direction)
    decay = None if decay is None else decay.unsqueeze(1)
    h = _scan(x, gates.unsqueeze(1), lam, (direction,), [code], _check_chunk(chunk), bool(normalize), decay)
    return h.squeeze(1)


def gspn_scan_4dir(
    x: torch.Tensor,
    gates: torch.Tensor,
    lam: torch.Tensor,
    chunk: Optional[int] = None,
    normalize: bool = False,
    directions: Sequence[str] = DIRECTIONS,
    decay: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """All four scan directions (or the given subset) in one kernel launch.

    Args:
        x, lam: ``(B, C, H, W)`` shared by every direction (read in place,
            never flipped; on CUDA transposed once for the column scans of
            large planes that cannot run staged), or ``(B, D, C, H, W)``
            with one map per direction.
        gates: ``(B, D, G, 3, H, W)``, one gate set per direction.
        chunk, normalize: as in :func:`gspn_scan`.
        directions: the D directions, default ``("tb", "bt", "lr", "rl")``.
        decay: as in :func:`gspn_scan`, ``(B, D, G, H, W)``.

    Returns:
        ``(B, D, C, H, W)``: the hidden states of each direction, unmerged, so
        the caller decides how to weight them (a GSPN layer multiplies by its
        output gates and sums over D). Gradients of a shared x or lam are the
        sum over directions.
    """
    directions = tuple(directions)
    if not 1 <= len(directions) <= 4:
        raise ValueError(f"directions must name 1 to 4 scan directions, got {directions!r}")
    codes = [_check_direction(d) for d in directions]
    _check_inputs(x, gates, lam, len(directions))
    _check_decay(decay, gates, normalize)
    return _scan(x, gates, lam, directions, codes, _check_chunk(chunk), bool(normalize), decay)
