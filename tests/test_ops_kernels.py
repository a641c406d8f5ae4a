"""Compiled GSPN kernels against the pure-PyTorch reference.

The CPU tests always run (CI builds the extension); the same matrix runs on
CUDA when a GPU is present. Tolerances, as max error relative to max|ref|:
float64 1e-10; float32 2e-5; bfloat16 and float16 are compared with the
float64 scan of the same rounded inputs, within 1.5 units of the output
dtype's last place (2^-7 for bfloat16, 2^-10 for float16), because both
backends accumulate in float32 and round once.
"""

from __future__ import annotations

import itertools
import os

import pytest
import torch

from gspn_diffusers.ops import DIRECTIONS, gspn_scan, gspn_scan_4dir, normalize_gates, scan_reference
from gspn_diffusers.ops.reference import scan_directions_reference, to_lines
from helpers import assert_close_scaled, generator_for

TOLERANCE = {
    torch.float64: 1e-10,
    torch.float32: 2e-5,
    torch.bfloat16: 1.5 * 2**-7,
    torch.float16: 1.5 * 2**-10,
}
SIDES = (1, 2, 3, 17, 64)
CHUNKS = (1, 2, 4, None, 1000)
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


@pytest.fixture
def device(request):
    if request.param == "cuda":
        request.getfixturevalue("compiled_cuda")
    else:
        request.getfixturevalue("compiled_cpu")
    return torch.device(request.param)


def make_inputs(batch, channels, groups, height, width, dtype, device, *key, dirs=None, shared=True):
    """Random inputs with stable gates (each position's taps sum to at most 1)."""
    gen = generator_for(batch, channels, groups, height, width, dtype, dirs, shared, *key)
    lead = (batch,) if dirs is None else (batch, dirs)
    xlead = (batch,) if shared or dirs is None else (batch, dirs)
    x = torch.randn(*xlead, channels, height, width, generator=gen, dtype=torch.float64)
    lam = torch.rand(*xlead, channels, height, width, generator=gen, dtype=torch.float64) * 2 - 1
    gates = torch.rand(*lead, groups, 3, height, width, generator=gen, dtype=torch.float64) / 3
    return [t.to(device=device, dtype=dtype) for t in (x, gates, lam)]


def reference_of(x, gates, lam, chunk, normalize=False, directions=DIRECTIONS):
    """The float64 reference of the given (possibly rounded) inputs."""
    return scan_directions_reference(
        x.double().cpu(), gates.double().cpu(), lam.double().cpu(), directions, chunk, normalize
    )


def backward_with_reference(x, gates, lam, grad, chunk, normalize=False):
    """Runs gspn_scan_4dir and the float64 reference on copies of the inputs
    and backpropagates grad (float64, cast for the kernel) through both;
    returns (kernel output, reference output, kernel inputs, reference inputs),
    the inputs holding their .grad."""
    inputs = [t.detach().requires_grad_() for t in (x, gates, lam)]
    got = gspn_scan_4dir(*inputs, chunk, normalize)
    got.backward(grad.to(device=x.device, dtype=x.dtype))
    ref_inputs = [t.detach().double().cpu().requires_grad_() for t in (x, gates, lam)]
    want = scan_directions_reference(*ref_inputs, DIRECTIONS, chunk, normalize)
    want.backward(grad)
    return got, want, inputs, ref_inputs


@pytest.mark.parametrize("device", DEVICES, indirect=True)
@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize("height,width", list(itertools.product(SIDES, SIDES)))
def test_forward_matrix_float64(device, height, width, chunk):
    """Every direction, B in {1, 3}, G in {1, C/2, C}: float64 to 1e-10 relative."""
    channels = 4
    for batch, groups in itertools.product((1, 3), (1, channels // 2, channels)):
        x, gates, lam = make_inputs(batch, channels, groups, height, width, torch.float64, device, chunk, dirs=4)
        got = gspn_scan_4dir(x, gates, lam, chunk)
        assert got.shape == (batch, 4, channels, height, width)
        assert_close_scaled(got, reference_of(x, gates, lam, chunk), 1e-10, f"B={batch} G={groups}")


@pytest.mark.parametrize("device", DEVICES, indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("chunk", [2, None])
@pytest.mark.parametrize("height,width", [(1, 64), (17, 3), (64, 17), (64, 64)])
def test_forward_low_precision(device, dtype, height, width, chunk):
    x, gates, lam = make_inputs(3, 8, 2, height, width, dtype, device, chunk, dirs=4)
    got = gspn_scan_4dir(x, gates, lam, chunk)
    assert got.dtype == dtype
    assert_close_scaled(got, reference_of(x, gates, lam, chunk), TOLERANCE[dtype], str(dtype))


@pytest.mark.parametrize("device", DEVICES, indirect=True)
@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("chunk", [None, 3])
def test_single_direction_matches_reference(device, direction, chunk):
    x, gates, lam = make_inputs(2, 6, 3, 17, 9, torch.float64, device, direction, chunk)
    got = gspn_scan(x, gates, lam, direction, chunk)
    want = scan_reference(x.cpu(), gates.cpu(), lam.cpu(), direction, chunk)
    assert_close_scaled(got, want, 1e-10, direction)


@pytest.mark.parametrize("device", DEVICES, indirect=True)
@pytest.mark.parametrize("layout", ["transposed", "channels_last", "sliced"])
def test_non_contiguous_inputs(device, layout):
    x, gates, lam = make_inputs(2, 4, 2, 17, 12, torch.float64, device, layout)
    want = gspn_scan(x, gates, lam, "lr", 4)
    if layout == "transposed":  # same values, non-contiguous storage
        x2, lam2 = (t.transpose(-1, -2).contiguous().transpose(-1, -2) for t in (x, lam))
        gates2 = gates.transpose(-1, -2).contiguous().transpose(-1, -2)
    elif layout == "channels_last":  # CUDA: a tiled transpose of each (H W, C) matrix
        x2, lam2 = (t.contiguous(memory_format=torch.channels_last) for t in (x, lam))
        gates2 = gates.permute(0, 1, 3, 4, 2).contiguous().permute(0, 1, 4, 2, 3)  # taps innermost
        assert gates2.stride(-3) == 1
    else:
        big = torch.zeros(2, 8, 17, 12, dtype=x.dtype, device=device)
        big[:, ::2] = x
        x2, lam2, gates2 = big[:, ::2], lam, gates
    assert not x2.is_contiguous()
    assert_close_scaled(gspn_scan(x2, gates2, lam2, "lr", 4), want, 1e-12, layout)


@pytest.mark.parametrize("device", DEVICES, indirect=True)
def test_per_direction_inputs(device):
    """x and lam given once per direction instead of shared."""
    x, gates, lam = make_inputs(2, 4, 4, 9, 11, torch.float64, device, dirs=4, shared=False)
    got = gspn_scan_4dir(x, gates, lam, 2)
    for d, direction in enumerate(DIRECTIONS):
        want = scan_reference(x[:, d].cpu(), gates[:, d].cpu(), lam[:, d].cpu(), direction, 2)
        assert_close_scaled(got[:, d], want, 1e-10, direction)


@pytest.mark.parametrize("device", DEVICES, indirect=True)
def test_direction_subset(device):
    x, gates, lam = make_inputs(1, 4, 2, 6, 5, torch.float64, device, dirs=2)
    got = gspn_scan_4dir(x, gates, lam, directions=("rl", "tb"))
    assert_close_scaled(got, reference_of(x, gates, lam, None, directions=("rl", "tb")), 1e-10)


@pytest.mark.parametrize("device", DEVICES, indirect=True)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("chunk", [None, 2])
def test_fused_normalisation_matches_unfused(device, dtype, chunk):
    x, _, lam = make_inputs(2, 4, 2, 13, 10, dtype, device, chunk)
    logits = torch.randn(2, 4, 2, 3, 13, 10, generator=generator_for("logits", chunk), dtype=torch.float64)
    logits = (logits * 3).to(device=device, dtype=dtype)
    fused = gspn_scan_4dir(x, logits, lam, chunk, normalize=True)
    gates = torch.stack([normalize_gates(logits[:, d], dn) for d, dn in enumerate(DIRECTIONS)], 1)
    unfused = gspn_scan_4dir(x, gates, lam, chunk)
    assert_close_scaled(fused, unfused, 1e-12 if dtype == torch.float64 else 1e-5, "fused vs unfused")


@pytest.mark.parametrize("device", DEVICES, indirect=True)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize(
    "channels,groups,height,width",
    [(16, 1, 37, 300), (16, 16, 37, 300), (2, 1, 600, 450)],
    ids=["shared gates", "per-channel gates", "planes over 512x512"],
)
def test_column_tiles_of_every_width(device, dtype, channels, groups, height, width):
    """More lines than one CPU column tile, for each tile width the kernel
    picks (csrc tile_lines; AVX-512 builds: 16 channels sharing gates 64
    lines, one channel per gate group 16, planes over 512x512 128; AVX2
    builds: 256 lines up to 256x256 planes, 128 above), with a ragged last
    tile and positions beyond the last whole register block; forward and
    gradients against the reference."""
    key = ("tiles", channels, groups, height)
    x, _, lam = make_inputs(1, channels, groups, height, width, dtype, device, *key, dirs=4)
    logits = torch.randn(1, 4, groups, 3, height, width, generator=generator_for("logits", *key), dtype=torch.float64)
    logits = (logits * 3).to(device=device, dtype=dtype)
    grad = torch.randn(1, 4, channels, height, width, generator=generator_for("grad", *key), dtype=torch.float64)
    got, want, inputs, ref_inputs = backward_with_reference(x, logits, lam, grad, 50, normalize=True)
    exact = dtype == torch.float64
    assert_close_scaled(got, want, 1e-10 if exact else TOLERANCE[dtype], "forward")
    for name, g, w in zip(("x", "logits", "lam"), inputs, ref_inputs):
        assert_close_scaled(g.grad, w.grad, 1e-10 if exact else 1e-4, f"grad {name}")


@pytest.mark.parametrize("device", DEVICES, indirect=True)
@pytest.mark.parametrize("length", [513, 1100, 2100])
@pytest.mark.parametrize("pack", ["1", "0"], ids=["packed", "widest"])
def test_lines_of_several_positions_per_thread(device, length, pack, monkeypatch):
    """Lines longer than a CUDA block's 512 threads, where each thread owns 2,
    4 or 8 positions (the kernels' RPT variants, each with its own tile depth),
    as rows of a 3-row plane (its 'lr'/'rl' scans: 3-position lines): forward
    and gradients with fused normalisation against the reference. Its 8
    planes are more than the simulator's 4 multiprocessors, so the CUDA launch
    planning packs blocks (more positions per thread: 8 at 1100) unless
    GSPN_CUDA_PACK=0 keeps the widest blocks; both run here."""
    monkeypatch.setenv("GSPN_CUDA_PACK", pack)
    key = ("positions per thread", length)
    x, _, lam = make_inputs(1, 2, 1, 3, length, torch.float32, device, *key, dirs=4)
    logits = torch.randn(1, 4, 1, 3, 3, length, generator=generator_for("logits", *key), dtype=torch.float64)
    logits = (logits * 3).to(device=device, dtype=torch.float32)
    grad = torch.randn(1, 4, 2, 3, length, generator=generator_for("grad", *key), dtype=torch.float64)
    got, want, inputs, ref_inputs = backward_with_reference(x, logits, lam, grad, None, normalize=True)
    assert_close_scaled(got, want, TOLERANCE[torch.float32], "forward")
    for name, g, w in zip(("x", "logits", "lam"), inputs, ref_inputs):
        assert_close_scaled(g.grad, w.grad, 1e-4, f"grad {name}")


def assert_aligned_and_shifted_match_reference(x, gates, lam, grad, directions, chunk, normalize, tolerance,
                                               grad_tolerance, what):
    """gspn_scan_4dir over the given directions, forward and gradients, from x
    and from a copy of x that starts one element later (off any vector
    alignment, so the kernels must fall back to scalar loads), against the
    float64 reference."""
    shifted = torch.zeros(x.numel() + 1, dtype=x.dtype, device=x.device)[1:].view(x.shape).copy_(x)
    ref_inputs = [t.detach().double().cpu().requires_grad_() for t in (x, gates, lam)]
    want = scan_directions_reference(*ref_inputs, directions, chunk, normalize)
    want.backward(grad)
    for first, label in ((x, f"{what}, aligned"), (shifted, f"{what}, shifted")):
        inputs = [t.detach().requires_grad_() for t in (first, gates, lam)]
        got = gspn_scan_4dir(*inputs, chunk, normalize, directions=directions)
        got.backward(grad.to(device=x.device, dtype=x.dtype))
        assert_close_scaled(got, want, tolerance, label)
        for name, g, w in zip(("x", "gates", "lam"), inputs, ref_inputs):
            assert_close_scaled(g.grad, w.grad, grad_tolerance, f"{label} grad {name}")


@pytest.mark.parametrize("device", DEVICES, indirect=True)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("width", [2, 6, 64, 1100, 2050, 7])
def test_row_scans_of_even_rows(device, dtype, width):
    """Row scans alone ("tb", "bt": how the CUDA column route runs every
    scan), where the CUDA kernels move two neighbouring positions per slot on
    even rows (1, 2 and 4 pairs per thread at these widths): forward and
    gradients against the reference, with per-channel and shared gates, and
    the same from an input that starts off a 2-element boundary (which must
    fall back to single positions) and from odd rows."""
    rows = ("tb", "bt")
    low_precision = dtype in (torch.float16, torch.bfloat16)
    tolerance = TOLERANCE[dtype] * (4 if low_precision else 1)  # the gates' rounding, as below
    grad_tolerance = {torch.float64: 1e-10, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 3e-2}[dtype]
    grad = torch.randn(2, 2, 4, 5, width, generator=generator_for("even rows grad", width), dtype=torch.float64)
    for groups in (4, 2):
        x, gates, lam = make_inputs(2, 4, groups, 5, width, dtype, device, "even rows", width, dirs=2)
        for chunk, normalize in ((None, True), (2, False)):
            assert_aligned_and_shifted_match_reference(x, gates, lam, grad, rows, chunk, normalize, tolerance,
                                                       grad_tolerance, f"G={groups} chunk={chunk} normalize={normalize}")


@pytest.mark.parametrize("device", DEVICES, indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("height", [5, 600])
def test_column_scans_of_aligned_columns(device, dtype, height):
    """Column scans alone ("lr", "rl") of rows of a multiple of 4, where the
    CUDA kernels take a tile's lines (consecutive columns) in one vector load
    per input: 4 lines in the forward at up to 2 positions per thread, in the
    backward 4 at 1 and 2 at 2 (600-row columns); global scans, chunks of 4
    (aligned) and of 2 (not, for 4-line tiles), and an input one element off
    alignment (scalar loads): forward and gradients against the reference."""
    columns = ("lr", "rl")
    tolerance = TOLERANCE[dtype] * (4 if dtype == torch.float16 else 1)  # the gates' rounding, as above
    grad_tolerance = {torch.float32: 1e-4, torch.float16: 1e-2}[dtype]
    for width, chunk in ((8, None), (12, 4), (8, 2)):
        key = ("aligned columns", height, width, chunk)
        x, gates, lam = make_inputs(1, 3, 3, height, width, dtype, device, *key, dirs=2)
        grad = torch.randn(1, 2, 3, height, width, generator=generator_for("grad", *key), dtype=torch.float64)
        assert_aligned_and_shifted_match_reference(x, gates, lam, grad, columns, chunk, True, tolerance, grad_tolerance,
                                                   f"{width} wide, chunk={chunk}")


# ---- gradients --------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES, indirect=True)
@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("chunk", [None, 2])
@pytest.mark.parametrize("normalize", [False, True])
def test_gradcheck(device, direction, chunk, normalize):
    x, gates, lam = make_inputs(2, 4, 2, 5, 6, torch.float64, device, direction, chunk)
    if normalize:
        gates = gates * 6 - 1  # logits
    inputs = [t.requires_grad_() for t in (x, gates, lam)]
    assert torch.autograd.gradcheck(lambda *a: gspn_scan(*a, direction, chunk, normalize), inputs)


@pytest.mark.parametrize("device", DEVICES, indirect=True)
@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("normalize", [False, True])
def test_gradcheck_four_directions(device, shared, normalize):
    x, gates, lam = make_inputs(1, 4, 2, 4, 5, torch.float64, device, normalize, dirs=4, shared=shared)
    inputs = [t.requires_grad_() for t in (x, gates, lam)]
    assert torch.autograd.gradcheck(lambda *a: gspn_scan_4dir(*a, 3, normalize), inputs)


@pytest.mark.parametrize("device", DEVICES, indirect=True)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("height,width,groups,chunk", [(1, 17, 1, None), (17, 1, 4, 2), (17, 23, 2, 4), (64, 64, 1, None)])
def test_backward_matches_reference_autograd(device, dtype, height, width, groups, chunk):
    """Kernel gradients against autograd through the reference (float64)."""
    x, gates, lam = make_inputs(3, 4, groups, height, width, dtype, device, "bwd", chunk, dirs=4)
    grad = torch.randn(3, 4, 4, height, width, generator=generator_for("grad", height), dtype=torch.float64)
    _, _, inputs, ref_inputs = backward_with_reference(x, gates, lam, grad, chunk)
    # Gradients sum many products, so low precision gets a looser bound than the forward.
    rtol = {torch.float64: 1e-10, torch.float32: 1e-4, torch.bfloat16: 3e-2}[dtype]
    for name, got, want in zip(("x", "gates", "lam"), inputs, ref_inputs):
        assert got.grad.dtype == dtype and got.grad.shape == got.shape
        assert_close_scaled(got.grad, want.grad, rtol, f"grad {name}")


@pytest.mark.parametrize("device", DEVICES, indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("groups", [1, 4])
def test_fused_normalisation_backward_low_precision(device, dtype, groups):
    """The logits' gradients of the fused normalisation (the CUDA backward
    kernel applies the chain rule per position from the normalised gates it
    keeps, stored in the input dtype at G = C and added into a float32 buffer
    by the channels of shared groups) against autograd through the reference."""
    x, _, lam = make_inputs(3, 4, groups, 17, 23, dtype, device, "fused bwd", groups, dirs=4)
    logits = torch.randn(3, 4, groups, 3, 17, 23, generator=generator_for("fused logits", groups), dtype=torch.float64)
    logits = (logits * 3).to(device=device, dtype=dtype)
    grad = torch.randn(3, 4, 4, 17, 23, generator=generator_for("fused grad", groups), dtype=torch.float64)
    _, _, inputs, ref_inputs = backward_with_reference(x, logits, lam, grad, None, normalize=True)
    rtol = {torch.float32: 1e-4, torch.bfloat16: 3e-2}[dtype]
    for name, got, want in zip(("x", "logits", "lam"), inputs, ref_inputs):
        assert_close_scaled(got.grad, want.grad, rtol, f"grad {name}")


@pytest.mark.parametrize("device", DEVICES, indirect=True)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16], ids=str)
def test_transposed_view_inputs(device, dtype):
    """Inputs that are transposed views of contiguous planes (how column scans
    of large planes reach the op; CUDA copies them with its own tiled
    transpose), with strided leading dims and planes that are not whole
    32x32 tiles, give exactly the results of contiguous inputs."""
    x, gates, lam = make_inputs(3, 4, 2, 47, 33, dtype, device, "views", dirs=4, shared=False)
    views = [t[:, 1:3].transpose(-1, -2) for t in (x, gates, lam)]  # (3, 2, ..., 33, 47), batch stride of 4 dirs
    assert not views[0].is_contiguous() and views[0].stride(-2) == 1
    dense = [t.contiguous() for t in views]
    for normalize in (False, True):
        args = ([0, 1], 5, normalize)
        got = torch.ops.gspn.scan(*views, *args)
        want = torch.ops.gspn.scan(*dense, *args)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        grad_h = torch.randn_like(got).transpose(-1, -2).contiguous().transpose(-1, -2)  # a transposed view too
        got_grads = torch.ops.gspn.scan_backward(grad_h, got, *views, *args)
        want_grads = torch.ops.gspn.scan_backward(grad_h.contiguous(), want, *dense, *args)
        for g, w in zip(got_grads, want_grads):
            torch.testing.assert_close(g, w, rtol=0, atol=0)


# ---- stability --------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES, indirect=True)
@pytest.mark.parametrize("direction", DIRECTIONS)
def test_normalised_gates_cannot_blow_up(device, direction):
    """Row-stochastic gates make each line a convex mix of the previous one, so
    max|h_t| <= max|h_{t-1}| + max|lam_t * x_t|: growth is at most linear in
    the number of lines, never exponential. (The bound 'max|h| <= running
    max|x|' would need lam and the gates to be a convex pair, which the op
    leaves to the layer: with lam = 1, x = 1, h_t = t + 1.)"""
    gen = generator_for("stability", direction)
    x = torch.randn(2, 3, 40, 40, generator=gen, dtype=torch.float64) * 5
    lam = torch.rand(2, 3, 40, 40, generator=gen, dtype=torch.float64) * 2 - 1
    logits = torch.randn(2, 3, 3, 40, 40, generator=gen, dtype=torch.float64) * 8
    h = gspn_scan(x.to(device), logits.to(device), lam.to(device), direction, normalize=True).cpu()
    h_lines = to_lines(h, direction).abs().amax(dim=(0, 1, 3))
    drive = to_lines(lam * x, direction).abs().amax(dim=(0, 1, 3))
    assert (h_lines[1:] <= h_lines[:-1] + drive[1:] + 1e-9).all()
    assert (h_lines <= drive.cumsum(0) + 1e-9).all()


@pytest.mark.parametrize("device", DEVICES, indirect=True)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_fused_normalisation_at_extreme_logits(device, dtype):
    """Saturated logits (|l| up to 200, where exp overflows float32 and all
    three sigmoids can underflow to below the normaliser's floor) give the
    reference's gates: finite, and the floor taken where the taps vanish."""
    gen = generator_for("extreme", dtype)
    values = torch.tensor([-200.0, -90.0, -40.0, -10.0, 0.0, 10.0, 40.0, 90.0, 200.0], dtype=torch.float64)
    logits = values[torch.randint(len(values), (1, 2, 3, 9, 21), generator=gen)]  # rows of whole vectors
    logits[..., :3, :] = -200.0  # every tap vanishes: the eps floor
    x = torch.randn(1, 2, 9, 21, generator=gen, dtype=torch.float64)
    lam = torch.rand(1, 2, 9, 21, generator=gen, dtype=torch.float64)
    for direction in DIRECTIONS:
        h = gspn_scan(*(t.to(device=device, dtype=dtype) for t in (x, logits, lam)), direction, normalize=True)
        want = scan_reference(x, logits, lam, direction, normalize=True)
        assert_close_scaled(h, want, TOLERANCE[dtype], f"{direction} {dtype}")


@pytest.mark.parametrize("device", DEVICES, indirect=True)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_fused_normalisation_gradients_at_the_floor(device, dtype):
    """Logits' gradients where the taps' sum falls below the normaliser's
    floor (1e-12: three sigmoids of about -29), where the floor's slope is
    zero, and just above it, where the gates are still O(1): the kernels'
    chain rule (on CUDA recomputed from the normalised gates and their signed
    sum) against autograd through the reference, every direction."""
    gen = generator_for("floor", dtype)
    values = torch.tensor([-30.0, -29.0, -28.5, -28.0, -27.0, -2.0, 0.0, 2.0], dtype=torch.float64)
    logits = values[torch.randint(len(values), (2, 2, 3, 9, 12), generator=gen)]
    logits[:, :, :, :4] = values[torch.randint(5, (2, 2, 3, 4, 12), generator=gen)]  # rows near the floor only
    x = torch.randn(2, 2, 9, 12, generator=gen, dtype=torch.float64)
    lam = torch.rand(2, 2, 9, 12, generator=gen, dtype=torch.float64)
    grad = torch.randn(2, 2, 9, 12, generator=gen, dtype=torch.float64)
    rtol = {torch.float64: 1e-10, torch.float32: 1e-4}[dtype]
    for direction in DIRECTIONS:
        inputs = [t.to(device=device, dtype=dtype).detach().requires_grad_() for t in (x, logits, lam)]
        gspn_scan(*inputs, direction, normalize=True).backward(grad.to(device=device, dtype=dtype))
        ref_inputs = [t.detach().clone().requires_grad_() for t in (x, logits, lam)]
        scan_reference(*ref_inputs, direction, normalize=True).backward(grad)
        for name, got, want in zip(("x", "logits", "lam"), inputs, ref_inputs):
            assert_close_scaled(got.grad, want.grad, rtol, f"{direction} grad {name}")


@pytest.mark.parametrize("device", DEVICES, indirect=True)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_fused_normalisation_passes_nan_on(device, dtype):
    """A NaN logit makes h NaN exactly where the reference's is (its position
    and what the scan carries it to), the rest matching: the kernels' fast
    paths (the CPU's vectors clamp exp's argument, the product form of the
    normalisation) must neither hide bad input nor spread it further. The
    NaN sits inside a line, where the CPU normalises whole vectors."""
    gen = generator_for("nan", dtype)
    logits = torch.randn(1, 2, 3, 9, 21, generator=gen, dtype=torch.float64) * 3
    logits[0, 0, 1, 4, 10] = float("nan")
    x = torch.randn(1, 2, 9, 21, generator=gen, dtype=torch.float64)
    lam = torch.rand(1, 2, 9, 21, generator=gen, dtype=torch.float64)
    for direction in DIRECTIONS:
        h = gspn_scan(*(t.to(device=device, dtype=dtype) for t in (x, logits, lam)), direction, normalize=True).cpu()
        want = scan_reference(x, logits, lam, direction, normalize=True)
        assert want.isnan().any() and not want.isnan().all()
        assert torch.equal(h.isnan(), want.isnan()), direction
        assert_close_scaled(h.nan_to_num(), want.nan_to_num(), TOLERANCE[dtype], f"{direction} {dtype}")


@pytest.mark.parametrize("channels", [8, 6], ids=["slices of 2", "fewer slices than threads"])
@pytest.mark.parametrize("gates_are", ["gates", "logits", "logits with decay"])
def test_channel_slices_of_one_gate_group(gates_are, channels):
    """With fewer gate groups than threads the CPU kernels split a group's
    channels into slices, each summing its channels' gate gradients (with
    fused normalisation already the logits', and the decay logits': the chain
    rule runs per slice) and the host adds the slices. Four threads over one
    group of 8 channels (4 slices of 2) or 6 (3 slices of 2: a fourth would
    have no channels and write none of its partial sums), every direction: forward and
    gradients against the reference to 1e-10. (The test workers otherwise run
    one thread: one slice.)"""
    gen = generator_for("slices", gates_are, channels)
    normalize = gates_are != "gates"
    x = torch.randn(1, channels, 9, 20, generator=gen, dtype=torch.float64)
    lam = torch.rand(1, channels, 9, 20, generator=gen, dtype=torch.float64)
    gates = torch.randn(1, 1, 3, 9, 20, generator=gen, dtype=torch.float64) * 3
    if not normalize:
        gates = gates.sigmoid() / 3
    decay = torch.randn(1, 1, 9, 20, generator=gen, dtype=torch.float64) * 2 if "decay" in gates_are else None
    grad = torch.randn(1, channels, 9, 20, generator=gen, dtype=torch.float64)
    names = ("x", "gates", "lam") + (("decay",) if decay is not None else ())
    threads = torch.get_num_threads()
    torch.set_num_threads(4)
    try:
        for direction in DIRECTIONS:
            tensors = (x, gates, lam) + ((decay,) if decay is not None else ())
            inputs = [t.detach().clone().requires_grad_() for t in tensors]
            got = gspn_scan(*inputs[:3], direction, normalize=normalize, decay=inputs[3] if decay is not None else None)
            got.backward(grad)
            ref_inputs = [t.detach().clone().requires_grad_() for t in tensors]
            want = scan_reference(*ref_inputs[:3], direction, normalize=normalize,
                                  decay=ref_inputs[3] if decay is not None else None)
            want.backward(grad)
            assert_close_scaled(got, want, 1e-10, f"{direction} forward")
            for name, g, w in zip(names, inputs, ref_inputs):
                assert_close_scaled(g.grad, w.grad, 1e-10, f"{direction} grad {name}")
    finally:
        torch.set_num_threads(threads)


# ---- decay fused with the normalisation -------------------------------------


def decay_inputs(batch, channels, groups, height, width, *key):
    """float64 x, gate logits and decay logits (scaled to reach saturated
    sigmoids), lam, and a gradient for the four-direction output."""
    gen = generator_for("decay", batch, channels, groups, height, width, *key)
    x = torch.randn(batch, channels, height, width, generator=gen, dtype=torch.float64)
    logits = torch.randn(batch, 4, groups, 3, height, width, generator=gen, dtype=torch.float64) * 3
    lam = torch.rand(batch, channels, height, width, generator=gen, dtype=torch.float64)
    decay = torch.randn(batch, 4, groups, height, width, generator=gen, dtype=torch.float64) * 3
    grad = torch.randn(batch, 4, channels, height, width, generator=gen, dtype=torch.float64)
    return (x, logits, lam, decay), grad


def decay_against_reference(inputs, grad, chunk, device, dtype):
    """gspn_scan_4dir with decay and the float64 reference on copies of the
    (float64) inputs; returns (output, reference, inputs, reference inputs),
    the inputs holding their .grad."""
    got_in = [t.to(device=device, dtype=dtype).requires_grad_() for t in inputs]
    got = gspn_scan_4dir(got_in[0], got_in[1], got_in[2], chunk, normalize=True, decay=got_in[3])
    got.backward(grad.to(device=device, dtype=dtype))
    ref_in = [t.to(dtype).double().detach().requires_grad_() for t in inputs]
    want = scan_directions_reference(ref_in[0], ref_in[1], ref_in[2], DIRECTIONS, chunk, True, ref_in[3])
    want.backward(grad)
    return got, want, got_in, ref_in


@pytest.mark.parametrize("device", DEVICES, indirect=True)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("chunk", [None, 4])
def test_decay_matches_reference(device, dtype, chunk):
    """Decay logits fused with the gate normalisation (in the CPU kernels'
    tiles; on CUDA one pass making the decayed gates and one for the chain
    rule): forward and the gradients of x, logits, lam and decay against
    autograd through the reference, G in {1, C/2, C}, every direction, B = 2,
    lines spanning whole vectors."""
    for groups in (1, 2, 4):
        inputs, grad = decay_inputs(2, 4, groups, 9, 21, chunk)
        got, want, got_in, ref_in = decay_against_reference(inputs, grad, chunk, device, dtype)
        exact = dtype == torch.float64
        assert_close_scaled(got, want, 1e-10 if exact else TOLERANCE[dtype], f"G={groups} forward")
        rtol = {torch.float64: 1e-10, torch.float32: 1e-4, torch.bfloat16: 3e-2}[dtype]
        for name, g, w in zip(("x", "logits", "lam", "decay"), got_in, ref_in):
            assert g.grad.dtype == dtype and g.grad.shape == g.shape
            assert_close_scaled(g.grad, w.grad, rtol, f"G={groups} grad {name}")


@pytest.mark.parametrize("device", DEVICES, indirect=True)
def test_decay_gradcheck(device):
    """Finite differences in float64 through the decayed gates, shared gates
    and per-channel ones."""
    for groups in (1, 2):
        inputs, _ = decay_inputs(1, 2, groups, 4, 5, "gradcheck")
        inputs = [t.to(device).requires_grad_() for t in inputs]
        assert torch.autograd.gradcheck(
            lambda x, g, l, d: gspn_scan_4dir(x, g, l, 3, normalize=True, decay=d), inputs
        )


@pytest.mark.parametrize("device", DEVICES, indirect=True)
@pytest.mark.parametrize("size,dtype", [((40, 12), torch.float64), ((3, 260), torch.float64),
                                        ((16, 24), torch.bfloat16)], ids=str)
def test_decay_on_the_column_route(device, monkeypatch, size, dtype):
    """The column route (on CUDA: the decayed gates made first, then the
    route's launches; the CPU kernels, which fuse decay, leave it) with decay,
    against the reference. On CUDA the decay passes' blocks span 8 rows of
    the narrow planes (more rows than their grid, which the simulator caps at
    3 high, so threads loop) and 256 positions of the wide ones; in bf16 the
    route transposes the float gates that the decay pass makes (rows of
    whole groups, which staged kernels would take if they took float gates)."""
    from gspn_diffusers import ops

    monkeypatch.setitem(ops.COLUMNS_AS_ROWS_MIN_PIXELS, device.type, 0)
    inputs, grad = decay_inputs(1, 4, 2, *size, "route")
    got, want, got_in, ref_in = decay_against_reference(inputs, grad, None, device, dtype)
    rtol = 1e-10 if dtype == torch.float64 else 3e-2
    assert_close_scaled(got, want, rtol, "forward")
    for name, g, w in zip(("x", "logits", "lam", "decay"), got_in, ref_in):
        assert g.grad.dtype == dtype
        assert_close_scaled(g.grad, w.grad, rtol, f"grad {name}")


@pytest.mark.parametrize("device", DEVICES, indirect=True)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_decay_long_horizon_half_precision(device, dtype):
    """Decay close to 1 (sigmoid(8)) over 1024 lines in half precision, even
    taps: within 1 % of float64, which needs the decayed gates in float32
    (the CPU kernels' tiles; on CUDA the elementwise pass's output, which the
    scan kernels take as float gates). Stored in bf16 they made the taps' sum
    1.002 instead of 0.99966 and h 3x too large."""
    height, width = 1024, 8
    x = torch.ones(1, 1, height, width, dtype=torch.float64)
    lam = torch.full((1, 1, height, width), 0.01, dtype=torch.float64)
    logits = torch.zeros(1, 4, 1, 3, height, width, dtype=torch.float64)
    decay = torch.full((1, 4, 1, height, width), 8.0, dtype=torch.float64)
    want = scan_directions_reference(x, logits, lam, DIRECTIONS, None, True, decay)
    got = gspn_scan_4dir(*(t.to(device, dtype) for t in (x, logits, lam)), normalize=True,
                         decay=decay.to(device, dtype))
    assert want.max() > 8  # a long horizon: h still growing after 1024 lines
    assert_close_scaled(got.double().cpu(), want, 1e-2, "h")


@pytest.mark.parametrize("device", DEVICES, indirect=True)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_long_scan_low_precision(device, dtype):
    """4096 sequential lines in half precision: finite and close to float64."""
    gen = generator_for("long", dtype)
    x = torch.randn(1, 1, 4, 4096, generator=gen, dtype=torch.float64)
    lam = torch.rand(1, 1, 4, 4096, generator=gen, dtype=torch.float64)
    logits = torch.randn(1, 1, 3, 4, 4096, generator=gen, dtype=torch.float64) * 3
    x, lam, logits = (t.to(device=device, dtype=dtype) for t in (x, lam, logits))
    for direction in DIRECTIONS:
        h = gspn_scan(x, logits, lam, direction, normalize=True)
        assert torch.isfinite(h).all()
        want = scan_reference(x.double().cpu(), logits.double().cpu(), lam.double().cpu(), direction, normalize=True)
        # Output rounding plus the gates' own rounding inside the kernel.
        assert_close_scaled(h, want, 4 * TOLERANCE[dtype], f"{direction} {dtype}")


def transposes_of_route(fn) -> set:
    """The ATen ops that the column route's transposed copies dispatch from
    inside the gspn op while fn runs (slices of the column directions,
    transposed views); ATen's own use of them, such as a multi-threaded sum's
    slices, does not count. With inputs that require grad the op runs inside
    its autograd kernel, which the profiler names after it."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    route = {"aten::select", "aten::narrow", "aten::transpose"}
    ops = ("gspn::", "GeneratedBackwardFor_gspn_")
    return {e.name for e in prof.events() if e.name in route and e.cpu_parent and e.cpu_parent.name.startswith(ops)}


@pytest.mark.parametrize("device", DEVICES, indirect=True)
@pytest.mark.parametrize(
    "directions,shared,groups,size,dtype",
    [
        (DIRECTIONS, True, 2, (7, 5), torch.float64),
        (("rl", "tb", "lr"), False, 4, (7, 5), torch.float64),  # columns not one range of the result
        (("lr",), True, 2, (7, 5), torch.float64),
        (("tb", "lr", "bt", "rl"), False, 2, (47, 33), torch.float64),  # planes of several 32x32 tiles
        (DIRECTIONS, True, 4, (1, 9), torch.float64),
        (("rl", "bt"), True, 2, (9, 1), torch.float64),
        (DIRECTIONS, True, 2, (47, 33), torch.float16),
    ],
    ids=str,
)
@pytest.mark.parametrize("chunk,normalize", [(None, True), (3, False)])
def test_column_route(device, monkeypatch, directions, shared, groups, size, dtype, chunk, normalize):
    """Column scans run as row scans of transposed copies, written back into
    the one result beside the row directions (the CUDA route for large
    planes), give the strided kernels' outputs and gradients: every order of
    row and column directions, shared and per-direction inputs, per-channel
    and shared gates, degenerate and multi-tile planes."""
    from gspn_diffusers import ops

    x, gates, lam = make_inputs(2, 4, groups, *size, dtype, device, "columns", dirs=len(directions), shared=shared)
    if normalize:
        gates = gates * 18 - 3  # logits
    weights = torch.randn((2, len(directions), 4, *size), generator=generator_for("weights"), dtype=torch.float64)

    def run():
        inputs = [t.clone().requires_grad_() for t in (x, gates, lam)]
        h = gspn_scan_4dir(*inputs, chunk=chunk, normalize=normalize, directions=directions)
        (h.double() * weights.to(device)).sum().backward()
        return [h.detach()] + [t.grad for t in inputs]

    # the route takes the column directions' slices (one view per run of
    # them) to transpose; these planes do not align for the staged kernels
    monkeypatch.setitem(ops.COLUMNS_AS_ROWS_MIN_PIXELS, device.type, None)
    strided = run()
    assert not transposes_of_route(run)
    monkeypatch.setitem(ops.COLUMNS_AS_ROWS_MIN_PIXELS, device.type, size[0] * size[1])
    routed = run()
    assert transposes_of_route(run)
    tolerance = 1e-12 if dtype == torch.float64 else 4 * TOLERANCE[dtype]
    for what, got, want in zip(("h", "dx", "dgates", "dlam"), routed, strided):
        assert got.is_contiguous()
        assert_close_scaled(got.double(), want.double(), tolerance, what)
    monkeypatch.setitem(ops.COLUMNS_AS_ROWS_MIN_PIXELS, device.type, size[0] * size[1] + 1)
    assert not transposes_of_route(run)  # below the threshold


def runs_cuda_kernels(device) -> bool:
    """Whether tensors on device run the CUDA kernels (a GPU, or CPU tensors
    in the simulator build that CI tests them with)."""
    return device.type == "cuda" or os.environ.get("GSPN_CUDA_SIM") == "1"


@pytest.mark.parametrize("device", DEVICES, indirect=True)
@pytest.mark.parametrize(
    "dtype,size,chunk,normalize,groups,shared",
    [
        (torch.float64, (13, 16), None, False, 2, True),  # groups of 4 lines, 32-byte rows
        (torch.float32, (13, 16), 4, True, 4, False),  # a group per chunk, per-direction x and lam
        (torch.float32, (256, 8), None, True, 1, True),  # long columns: 2 positions per thread
        (torch.float16, (40, 24), 8, True, 2, True),  # several tiles per group
        (torch.bfloat16, (9, 32), 16, False, 4, True),
        # lines over 512: 2 positions per thread, and groups of 4 tiles, some read after
        # line barriers at which the next group's copies may land (the simulator lands some)
        (torch.float16, (520, 16), 16, True, 4, True),
        (torch.bfloat16, (600, 16), None, False, 2, True),  # the same with shared gates (vector adds)
    ],
    ids=str,
)
def test_columns_staged(device, monkeypatch, dtype, size, chunk, normalize, groups, shared):
    """The CUDA route's column scans staged through shared memory, in place
    (its default where the tensors align), against the reference and against
    the transposed copies (GSPN_CUDA_COLUMNS=transposed): outputs and every
    gradient, shared and per-channel gates, chunks of one and several groups."""
    from gspn_diffusers import ops

    x, gates, lam = make_inputs(2, 4, groups, *size, dtype, device, "staged", dirs=4, shared=shared)
    if normalize:
        gates = gates * 18 - 3  # logits
    weights = torch.randn((2, 4, 4, *size), generator=generator_for("staged weights"), dtype=torch.float64)

    def run():
        inputs = [t.clone().requires_grad_() for t in (x, gates, lam)]
        h = gspn_scan_4dir(*inputs, chunk=chunk, normalize=normalize)
        (h.double() * weights.to(device)).sum().backward()
        return [h.detach()] + [t.grad for t in inputs]

    monkeypatch.setitem(ops.COLUMNS_AS_ROWS_MIN_PIXELS, device.type, 0)
    monkeypatch.setenv("GSPN_CUDA_COLUMNS", "staged")
    staged = run()
    # in place: nothing sliced to be transposed (the CPU kernels always transpose)
    assert bool(transposes_of_route(run)) != runs_cuda_kernels(device)
    assert_close_scaled(staged[0].double().cpu(), reference_of(x, gates, lam, chunk, normalize), 4 * TOLERANCE[dtype], "h")
    monkeypatch.setenv("GSPN_CUDA_COLUMNS", "transposed")
    transposed = run()
    assert transposes_of_route(run)
    tolerance = 1e-12 if dtype == torch.float64 else 4 * TOLERANCE[dtype]
    for what, got, want in zip(("h", "dx", "dgates", "dlam"), staged, transposed):
        assert_close_scaled(got.double(), want.double(), tolerance, what)


@pytest.mark.parametrize("device", DEVICES, indirect=True)
@pytest.mark.parametrize(
    "dtype,height,width,backward_staged",
    [
        # wide groups forward, at 4 positions per thread; the backward's lines exceed its 2 per thread
        (torch.float16, 1040, 8, False),
        # narrow groups forward: two wide stages of 1500-position lines overflow shared memory
        (torch.float16, 1500, 16, False),
        # narrow groups backward (its seven wide stages overflow), wide forward
        (torch.float16, 960, 16, True),
        # float32's narrow groups are one tile each
        (torch.float32, 1500, 8, False),
        (torch.float32, 960, 8, True),
    ],
    ids=str,
)
def test_columns_staged_long_lines(device, monkeypatch, dtype, height, width, backward_staged):
    """Columns longer than two wide stages fit in shared memory run staged in
    narrow groups (8 bytes of each row per input, 16 in float64) as far as
    the thread limit goes; longer ones take the transposed copies. Output
    and gradients against the reference, and which way each pass went."""
    from gspn_diffusers import ops

    x, gates, lam = make_inputs(1, 2, 1, height, width, dtype, device, "long", dirs=2)
    monkeypatch.setitem(ops.COLUMNS_AS_ROWS_MIN_PIXELS, device.type, 0)
    monkeypatch.setenv("GSPN_CUDA_COLUMNS", "staged")
    inputs = [t.clone().requires_grad_() for t in (x, gates, lam)]
    h = None

    def forward():
        nonlocal h
        h = gspn_scan_4dir(*inputs, directions=("lr", "rl"))

    assert bool(transposes_of_route(forward)) != runs_cuda_kernels(device)
    grad = torch.randn((1, 2, 2, height, width), generator=generator_for("long grad"), dtype=torch.float64)
    backward = lambda: h.backward(grad.to(device, dtype))  # noqa: E731
    assert bool(transposes_of_route(backward)) != (runs_cuda_kernels(device) and backward_staged)
    ref_inputs = [t.detach().double().cpu().requires_grad_() for t in (x, gates, lam)]
    want = scan_directions_reference(*ref_inputs, ("lr", "rl"), None, False)
    want.backward(grad)
    assert_close_scaled(h.detach().double().cpu(), want.detach(), 4 * TOLERANCE[dtype], "h")
    for name, got, ref in zip(("dx", "dgates", "dlam"), inputs, ref_inputs):
        assert_close_scaled(got.grad.double().cpu(), ref.grad, 8 * TOLERANCE[dtype], name)


@pytest.mark.parametrize("device", DEVICES, indirect=True)
@pytest.mark.parametrize("width,chunk", [(20, None), (24, 4)], ids=["row not whole groups", "chunk not whole groups"])
def test_columns_staged_falls_back_to_transposes(device, monkeypatch, width, chunk):
    """fp16 columns stage in groups of 8: planes and chunks that do not split
    into whole groups take the transposed copies, with the same results."""
    from gspn_diffusers import ops

    x, gates, lam = make_inputs(1, 2, 2, 16, width, torch.float16, device, "fallback", dirs=4)
    monkeypatch.setitem(ops.COLUMNS_AS_ROWS_MIN_PIXELS, device.type, 0)
    monkeypatch.setenv("GSPN_CUDA_COLUMNS", "staged")
    run = lambda: gspn_scan_4dir(x, gates, lam, chunk=chunk)  # noqa: E731
    assert transposes_of_route(run)
    assert_close_scaled(run().double().cpu(), reference_of(x, gates, lam, chunk), 4 * TOLERANCE[torch.float16], "h")


@pytest.mark.parametrize("device", DEVICES, indirect=True)
def test_columns_staged_by_default_only_for_small_calls(device, monkeypatch):
    """With GSPN_CUDA_COLUMNS unset the route stages the column scans of calls
    of up to 2^22 elements per input (the simulator's limit: 2^12) and takes
    the transposed copies above (on an H200 the copies won from
    1x320x256x256 and 1x32x1024x1024 up)."""
    from gspn_diffusers import ops

    monkeypatch.setitem(ops.COLUMNS_AS_ROWS_MIN_PIXELS, device.type, 0)
    monkeypatch.delenv("GSPN_CUDA_COLUMNS", raising=False)
    side = 2048 if device.type == "cuda" else 64
    for width, small in ((side, True), (side + 8, False)):  # side^2 is the limit; rows of whole fp16 groups
        x, gates, lam = make_inputs(1, 1, 1, side, width, torch.float16, device, "default way", dirs=1)
        staged = not transposes_of_route(lambda: gspn_scan_4dir(x, gates, lam, directions=("lr",)))
        assert staged == (small and runs_cuda_kernels(device)), width


@pytest.mark.parametrize("device", DEVICES, indirect=True)
@pytest.mark.parametrize("columns", ["staged", "transposed"])
@pytest.mark.parametrize("groups", [1, 4])
def test_route_on_one_or_two_streams(device, monkeypatch, columns, groups):
    """The route's row and column launches run side by side on two CUDA
    streams (in the simulator the second stream's launches run last, after
    the column launch and its copies); on one stream (GSPN_CUDA_STREAMS=1)
    they give the same outputs and gradients, and both against the reference."""
    from gspn_diffusers import ops

    x, gates, lam = make_inputs(2, 4, groups, 24, 16, torch.float32, device, "streams", dirs=4)
    grad = torch.randn((2, 4, 4, 24, 16), generator=generator_for("streams grad"), dtype=torch.float64)
    monkeypatch.setitem(ops.COLUMNS_AS_ROWS_MIN_PIXELS, device.type, 0)
    monkeypatch.setenv("GSPN_CUDA_COLUMNS", columns)
    monkeypatch.delenv("GSPN_CUDA_STREAMS", raising=False)

    def run():
        inputs = [t.clone().requires_grad_() for t in (x, gates, lam)]
        h = gspn_scan_4dir(*inputs, chunk=8, normalize=True)
        h.backward(grad.to(device, h.dtype))
        return [h.detach()] + [t.grad for t in inputs]

    two = run()
    monkeypatch.setenv("GSPN_CUDA_STREAMS", "1")
    one = run()
    for what, got, want in zip(("h", "dx", "dgates", "dlam"), two, one):
        assert_close_scaled(got.double(), want.double(), 1e-6, what)  # gate gradients: atomics in any order
    assert_close_scaled(two[0].double().cpu(), reference_of(x, gates, lam, 8, True), 4 * TOLERANCE[torch.float32], "h")
    monkeypatch.setenv("GSPN_CUDA_STREAMS", "3")
    if runs_cuda_kernels(device):
        with pytest.raises(RuntimeError, match="GSPN_CUDA_STREAMS=3.*use 2.*or 1"):
            gspn_scan_4dir(x, gates, lam)


@pytest.mark.parametrize("device", DEVICES, indirect=True)
def test_columns_mode_must_be_known(device, monkeypatch):
    from gspn_diffusers import ops

    x, gates, lam = make_inputs(1, 2, 2, 8, 8, torch.float32, device, "mode", dirs=4)
    monkeypatch.setitem(ops.COLUMNS_AS_ROWS_MIN_PIXELS, device.type, 0)
    monkeypatch.setenv("GSPN_CUDA_COLUMNS", "strided")
    with pytest.raises(RuntimeError, match="GSPN_CUDA_COLUMNS=strided.*staged.*transposed"):
        gspn_scan_4dir(x, gates, lam)


# ---- torch.library integration ---------------------------------------------


@pytest.mark.parametrize("device", DEVICES, indirect=True)
def test_opcheck(device):
    # the second call runs its column directions through the column route
    # the third with decay logits
    for normalize, x_dirs, columns_as_rows, decay in ((False, None, -1, False), (True, 4, 0, False),
                                                      (True, None, -1, True)):
        x, gates, lam = make_inputs(2, 4, 2, 5, 7, torch.float64, device, "opcheck", dirs=4, shared=x_dirs is None)
        args = (x.requires_grad_(), gates.requires_grad_(), lam.requires_grad_(), [0, 1, 2, 3], 2, normalize,
                columns_as_rows)
        if decay:
            args += (torch.randn(2, 4, 2, 5, 7, dtype=torch.float64, device=device, requires_grad=True),)
        torch.library.opcheck(torch.ops.gspn.scan.default, args)


@pytest.mark.parametrize("device", DEVICES, indirect=True)
@pytest.mark.parametrize("columns_as_rows", [False, True])
def test_torch_compile_fullgraph(device, columns_as_rows, monkeypatch):
    from gspn_diffusers import ops

    monkeypatch.setitem(ops.COLUMNS_AS_ROWS_MIN_PIXELS, device.type, 0 if columns_as_rows else None)
    x, gates, lam = make_inputs(1, 4, 2, 9, 7, torch.float32, device, "compile", dirs=4)

    decay = torch.randn(1, 4, 2, 9, 7, generator=generator_for("compile decay")).to(device)

    def layer(x, logits, lam, decay):
        h = gspn_scan_4dir(x, logits, lam, chunk=4, normalize=True, decay=decay)
        return torch.tanh(h.sum(1)) * 2

    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    inputs = [t.requires_grad_() for t in (x, gates, lam, decay)]
    out = compiled(*inputs)
    out.sum().backward()
    grads = [t.grad.clone() for t in inputs]
    for t in inputs:
        t.grad = None
    eager = layer(*inputs)
    eager.sum().backward()
    torch.testing.assert_close(out, eager)
    for got, t in zip(grads, inputs):
        torch.testing.assert_close(got, t.grad)


# ---- bad input --------------------------------------------------------------


def _good(dtype=torch.float32):
    return torch.zeros(2, 4, 5, 6, dtype=dtype), torch.zeros(2, 2, 3, 5, 6, dtype=dtype), torch.zeros(2, 4, 5, 6, dtype=dtype)


@pytest.mark.parametrize(
    "mutate,error,pattern",
    [
        (lambda x, g, l: (x[0], g, l), ValueError, r"x must have shape \(B, C, H, W\)"),
        (lambda x, g, l: (x, g[:, :, :2], l), ValueError, "gates must have shape"),
        (lambda x, g, l: (x, g[..., :4, :], l), ValueError, "gates must have shape"),
        (lambda x, g, l: (x, g[:1], l), ValueError, "gates must have shape"),
        (lambda x, g, l: (x, torch.zeros(2, 3, 3, 5, 6), l), ValueError, "G=3 groups, which does not divide the C=4"),
        (lambda x, g, l: (x, g, l[..., :5]), ValueError, "lam must have shape"),
        (lambda x, g, l: (x, g.double(), l), TypeError, "share one dtype"),
        (lambda x, g, l: (x, g, l.to("meta")), ValueError, "one device"),
        (lambda x, g, l: (x.int(), g, l), TypeError, r"x has dtype torch.int32"),
        (lambda x, g, l: (x, g.long(), l), TypeError, r"gates has dtype torch.int64"),
        (lambda x, g, l: (x.numpy(), g, l), TypeError, "x must be a torch.Tensor"),
    ],
)
def test_bad_tensors(mutate, error, pattern):
    with pytest.raises(error, match=pattern):
        gspn_scan(*mutate(*_good()))


def test_bad_options():
    x, g, l = _good()
    with pytest.raises(ValueError, match="direction must be one of"):
        gspn_scan(x, g, l, direction="up")
    with pytest.raises(ValueError, match="chunk must be a positive"):
        gspn_scan(x, g, l, chunk=0)
    with pytest.raises(ValueError, match="chunk must be a positive"):
        gspn_scan(x, g, l, chunk=-2)
    with pytest.raises(TypeError, match="chunk must be a positive int"):
        gspn_scan(x, g, l, chunk=2.5)
    g4 = torch.zeros(2, 4, 2, 3, 5, 6)
    with pytest.raises(ValueError, match="directions must name 1 to 4"):
        gspn_scan_4dir(x, g4, l, directions=())
    with pytest.raises(ValueError, match="gates must have shape"):
        gspn_scan_4dir(x, g, l)
    with pytest.raises(ValueError, match="x has 3 directions"):
        gspn_scan_4dir(torch.zeros(2, 3, 4, 5, 6), g4, l)


def test_bad_decay():
    x, g, l = _good()
    decay = torch.zeros(2, 2, 5, 6)
    with pytest.raises(ValueError, match="decay weighs the normalised gates, so it needs normalize=True"):
        gspn_scan(x, g, l, decay=decay)
    with pytest.raises(ValueError, match=r"decay must have shape \(2, 2, 5, 6\)"):
        gspn_scan(x, g, l, normalize=True, decay=decay[:, :1])
    with pytest.raises(ValueError, match=r"decay must have shape \(2, 4, 2, 5, 6\)"):
        gspn_scan_4dir(x, torch.zeros(2, 4, 2, 3, 5, 6), l, normalize=True, decay=decay)
    with pytest.raises(TypeError, match="decay must match gates in dtype"):
        gspn_scan(x, g, l, normalize=True, decay=decay.double())
    with pytest.raises(TypeError, match="decay has dtype torch.int64"):
        gspn_scan(x, g, l, normalize=True, decay=decay.long())
    with pytest.raises(ValueError, match="needs normalize=True"):
        scan_reference(x, g, l, decay=decay)


def test_op_rejects_bad_codes_directly(compiled_cpu):
    """The op's own checks guard callers that bypass the Python wrapper."""
    x, g, l = _good()
    with pytest.raises(RuntimeError, match="direction codes are 0..3"):
        torch.ops.gspn.scan(x, g.unsqueeze(1), l, [7], 0, False)
    with pytest.raises(RuntimeError, match="must divide channels"):
        torch.ops.gspn.scan(x, torch.zeros(2, 1, 3, 3, 5, 6), l, [0], 0, False)


# ---- CUDA only --------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.parametrize("streams", ["2", "1"])
def test_route_in_a_cuda_graph(compiled_cuda, monkeypatch, streams):
    """The column route (its row launch on a second stream by default) inside
    CUDA graph capture, as torch.compile's "reduce-overhead" mode runs it:
    captured, then replayed on new inputs, it gives the eager result."""
    monkeypatch.setenv("GSPN_CUDA_STREAMS", streams)
    x, gates, lam = make_inputs(2, 4, 2, 128, 128, torch.float16, torch.device("cuda"), "graph", dirs=4)
    static = [t.clone() for t in (x, gates, lam)]
    warmup = torch.cuda.Stream()  # torch.cuda.graph's advice: warm up on a side stream
    warmup.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(warmup):
        gspn_scan_4dir(*static)
    torch.cuda.current_stream().wait_stream(warmup)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = gspn_scan_4dir(*static)
    for t, new in zip(static, (x.flip(-1), gates.flip(-2), lam.flip(-1))):
        t.copy_(new)
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out, gspn_scan_4dir(*static), rtol=0, atol=0)


@pytest.mark.cuda
def test_cuda_offsets_beyond_int32(compiled_cuda):
    """A 16K-pixel layer has more than 2^31 elements: the last channel must be
    right, which it would not be with 32-bit offsets."""
    channels, side = 600, 2048  # 2.5e9 elements per tensor, 5 GB in float16
    free, _ = torch.cuda.mem_get_info()
    if free < 40 * 2**30:  # inputs, output, and transposed copies of both (columns run as rows)
        pytest.skip("needs 40 GiB of free GPU memory")
    x = torch.empty(1, channels, side, side, device="cuda", dtype=torch.float16).normal_()
    lam = torch.empty_like(x).uniform_()
    logits = torch.randn(1, 1, 3, side, side, device="cuda", dtype=torch.float16)
    assert x.numel() > 2**31
    h = gspn_scan(x, logits, lam, "lr", chunk=64, normalize=True)
    last = slice(channels - 1, channels)
    want = gspn_scan(x[:, last].clone(), logits, lam[:, last].clone(), "lr", chunk=64, normalize=True)
    torch.testing.assert_close(h[:, last], want, rtol=0, atol=0)
    del h, x, lam
    torch.cuda.empty_cache()


def launches(device) -> list:
    """(blocks, cluster size) of each kernel launch since the last call (a
    cluster size of 1: a plain launch), where the simulator runs them; None
    elsewhere (a GPU, or the CPU kernels)."""
    if device.type != "cpu" or not runs_cuda_kernels(device):
        return None
    flat = list(torch.ops.gspn_sim.launches())
    return list(zip(flat[::2], flat[1::2]))


def cluster_launches(device) -> list:
    """Cluster sizes of the kernel launches since the last call (see launches)."""
    launched = launches(device)
    return None if launched is None else [cluster for _, cluster in launched]


@pytest.mark.parametrize("device", DEVICES, indirect=True)
@pytest.mark.parametrize(
    "split,width,segments",
    [
        ("2", 40, 2),  # segments of 20 positions: halos of 8 inside them
        ("4", 64, 4),
        ("8", 130, 8),  # segments of 18 (even), the last one 4 positions
        ("8", 40, 4),  # 8 segments of 6 are shorter than the halo: the most that fit
        ("8", 12, 1),  # too short to split at all
        ("auto", 64, 4),  # 1 plane on the simulator's 4 SMs
    ],
)
def test_split_lines_match_reference(device, monkeypatch, split, width, segments):
    """Lines split across a cluster of blocks (GSPN_CUDA_SPLIT; sm_90 on a
    GPU): each block computes its segment and a halo of 8 positions each side
    and copies the halo from its neighbours' shared memory every 8 lines
    (forward: the hidden state; backward: the adjoint's three products). 40
    lines (4 refills, the last lines between refills), normalised gates whose
    edges are the line's, fp32 and fp16 pairs, "tb" and "bt", a chunked scan:
    output and gradients against the reference; in the simulator also the
    launches' cluster sizes."""
    monkeypatch.setenv("GSPN_CUDA_SPLIT", split)
    cluster_launches(device)  # forget earlier launches
    for dtype, direction, chunk in ((torch.float32, "tb", None), (torch.float16, "bt", None),
                                    (torch.float32, "bt", 12)):
        x, gates, lam = make_inputs(1, 1, 1, 40, width, dtype, device, "split", split)
        logits = gates[:, :, :3] * 4 - 2
        grad = torch.randn(x.shape, generator=generator_for("split grad", width), dtype=torch.float64)
        inputs = [t.detach().requires_grad_() for t in (x, logits, lam)]
        got = gspn_scan(*inputs, direction, chunk, normalize=True)
        got.backward(grad.to(device, dtype))
        ref = [t.detach().double().cpu().requires_grad_() for t in (x, logits, lam)]
        want = scan_reference(*ref, direction, chunk, True)
        want.backward(grad)
        tolerance = TOLERANCE[dtype] * (4 if dtype == torch.float16 else 1)
        what = f"{direction} {dtype} chunk {chunk}"
        assert_close_scaled(got, want, tolerance, what)
        for name, g, w in zip(("x", "logits", "lam"), inputs, ref):
            assert_close_scaled(g.grad, w.grad, tolerance, f"grad {name}, {what}")
    launched = cluster_launches(device)
    if launched is not None:  # forward, backward; auto: the chunked scan's 4 chunks fill the simulator's 4 SMs
        assert launched == [segments] * 4 + [1 if split == "auto" else segments] * 2


@pytest.mark.parametrize("device", DEVICES, indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_split_lines_in_the_layers_call(device, monkeypatch, dtype):
    """The GSPN layer's call, split: four directions with decay, fp32 and
    bf16 (on CUDA the decay pass's gates, float for bf16, then the route's row launch and the
    column launch on transposed copies, both split, forward and backward,
    with two gate groups of 2 channels (the backward's atomic adds), B = 2;
    decays near 1, so that a wrong halo carries far), forward and gradients
    against the reference."""
    from gspn_diffusers import ops

    monkeypatch.setitem(ops.COLUMNS_AS_ROWS_MIN_PIXELS, device.type, 0)
    monkeypatch.setenv("GSPN_CUDA_SPLIT", "2")
    monkeypatch.setenv("GSPN_CUDA_COLUMNS", "transposed")
    (x, logits, lam, decay), grad = decay_inputs(2, 4, 2, 40, 36, "split")
    inputs = (x, logits, lam, decay + 6)  # decays near 1: lines far back still count
    cluster_launches(device)
    got, want, got_in, ref_in = decay_against_reference(inputs, grad, None, device, dtype)
    rtol = 3e-2 if dtype == torch.bfloat16 else 1e-4
    assert_close_scaled(got, want, rtol, "forward")
    for name, g, w in zip(("x", "logits", "lam", "decay"), got_in, ref_in):
        assert_close_scaled(g.grad, w.grad, rtol, f"grad {name}")
    launched = cluster_launches(device)
    if launched is not None:
        assert launched.count(2) == 4, launched  # the row and the column launches, forward and backward


@pytest.mark.parametrize("device", DEVICES, indirect=True)
@pytest.mark.parametrize("channels,segments", [(4, 1), (5, 4)])
def test_split_lines_auto_balances_the_sms(device, monkeypatch, channels, segments):
    """GSPN_CUDA_SPLIT=auto splits where it evens out the SMs' work: on the
    simulator's 4 SMs, 4 planes of 256-position lines are one block per SM
    (not split); 5 would leave one SM two whole planes, so each line goes to
    4 blocks (20 blocks of 80-position windows, 5 per SM)."""
    monkeypatch.setenv("GSPN_CUDA_SPLIT", "auto")
    x, gates, lam = make_inputs(1, channels, 1, 12, 256, torch.float32, device, "split auto")
    cluster_launches(device)
    got = gspn_scan(x, gates[:, :, :3], lam)
    assert_close_scaled(got, reference_of(x, gates.unsqueeze(1), lam, None, False, ("tb",)).squeeze(1),
                        TOLERANCE[torch.float32], "forward")
    launched = cluster_launches(device)
    if launched is not None:
        assert launched == [segments]


@pytest.mark.parametrize("device", DEVICES, indirect=True)
@pytest.mark.parametrize("streams,segments", [("2", 1), ("1", 2)])
def test_split_lines_auto_counts_launches_side_by_side(device, monkeypatch, streams, segments):
    """The column route's row and column launches run side by side (two
    streams) and share the SMs: auto balances each over half of them. Two
    planes of 64-position lines per launch: on 2 of the simulator's 4 SMs
    they are one block each (not split); one after the other (one stream),
    each launch has 4 SMs and splits its lines in 2."""
    from gspn_diffusers import ops

    monkeypatch.setitem(ops.COLUMNS_AS_ROWS_MIN_PIXELS, device.type, 0)
    monkeypatch.setenv("GSPN_CUDA_COLUMNS", "transposed")
    monkeypatch.setenv("GSPN_CUDA_STREAMS", streams)
    monkeypatch.setenv("GSPN_CUDA_SPLIT", "auto")
    x, gates, lam = make_inputs(1, 1, 1, 64, 64, torch.float32, device, "split streams", dirs=4)
    cluster_launches(device)
    got = gspn_scan_4dir(x, gates, lam)
    assert_close_scaled(got, reference_of(x, gates, lam, None), TOLERANCE[torch.float32], "forward")
    launched = cluster_launches(device)
    if launched is not None:  # the scans' launches (the transposes' are plain)
        assert launched.count(segments) >= 2 and max(launched) == segments, launched


@pytest.mark.parametrize("device", DEVICES, indirect=True)
def test_split_lines_unknown_setting(device, monkeypatch):
    """GSPN_CUDA_SPLIT other than auto, 2, 4 or 8 (or unset, 0, 1) is an
    error that names the ways, where the CUDA kernels run."""
    monkeypatch.setenv("GSPN_CUDA_SPLIT", "3")
    x, gates, lam = make_inputs(1, 1, 1, 8, 16, torch.float32, device, "split setting")
    if not runs_cuda_kernels(device):
        gspn_scan(x, gates[:, :, :3], lam)  # the CPU kernels do not split
        return
    with pytest.raises(RuntimeError, match='GSPN_CUDA_SPLIT=3.*"auto"'):
        gspn_scan(x, gates[:, :, :3], lam)


@pytest.mark.parametrize("device", DEVICES, indirect=True)
@pytest.mark.parametrize(
    "dtype,width,channels,groups,chunk,paired",
    [
        (torch.float32, 40, 4, 2, None, (True, True)),  # pairs of positions (even rows), 2 channels per group
        (torch.float16, 40, 6, 1, 4, (True, True)),  # 3 pairs of one group's 6 channels, chunks
        (torch.bfloat16, 17, 4, 1, None, (True, True)),  # single positions (odd rows)
        (torch.float64, 1100, 2, 1, None, (True, True)),  # 2 slots per thread (pairs of positions)
        # 2 slots of 2 positions, the backward's 16 rows of 2050 doubles over the shared memory
        (torch.float64, 2048, 2, 1, None, (True, False)),
        (torch.float32, 2100, 2, 1, None, (False, False)),  # 4 slots per thread: too many registers for pairs
        (torch.float32, 40, 3, 1, None, (False, False)),  # an odd number of channels per group
        (torch.float32, 40, 4, 4, None, (False, False)),  # per-channel gates: nothing to share
    ],
    ids=lambda v: str(v).replace("torch.", "") if isinstance(v, torch.dtype) else None,
)
@pytest.mark.parametrize("normalize", [True, False], ids=["normalised", "plain"])
def test_channel_pairs_match_reference(device, monkeypatch, dtype, width, channels, groups, chunk, paired,
                                       normalize):
    """GSPN_CUDA_CHANNELS=2: a block scans two channels of one gate group,
    whose gates it loads and normalises once, and sums both channels' gate
    (or logit) gradients before adding them into the group's buffer. "tb"
    and "bt" (the backward's gather from the next line reads both channels'
    rows), B = 2: output and gradients of x, gates and lam against the
    reference; in the simulator also the blocks of the scan launches (half
    where paired: forward, backward)."""
    monkeypatch.setenv("GSPN_CUDA_CHANNELS", "2")
    height = 4 if width > 2000 else 8 if width > 1000 else 12
    for direction in ("tb", "bt"):
        x, gates, lam = make_inputs(2, channels, groups, height, width, dtype, device, "pairs", direction)
        gates = gates[:, :, :3] * 4 - 2 if normalize else gates[:, :, :3]
        grad = torch.randn(x.shape, generator=generator_for("pairs grad", direction, width), dtype=torch.float64)
        inputs = [t.detach().requires_grad_() for t in (x, gates, lam)]
        launches(device)  # forget earlier launches
        got = gspn_scan(*inputs, direction, chunk, normalize=normalize)
        got.backward(grad.to(device, dtype))
        launched = launches(device)
        ref = [t.detach().double().cpu().requires_grad_() for t in (x, gates, lam)]
        want = scan_reference(*ref, direction, chunk, normalize)
        want.backward(grad)
        tolerance = TOLERANCE[dtype] * (1 if dtype in (torch.float64, torch.float32) else 4)
        what = f"{direction} {dtype} width {width}"
        assert_close_scaled(got, want, tolerance, what)
        for name, g, w in zip(("x", "gates", "lam"), inputs, ref):
            assert_close_scaled(g.grad, w.grad, tolerance, f"grad {name}, {what}")
        if launched is not None:  # forward, backward: one block per (batch, channel or pair, chunk)
            chunks = 1 if chunk is None else -(-height // chunk)
            assert launched == [(2 * channels * chunks // (2 if p else 1), 1) for p in paired], launched


@pytest.mark.parametrize("device", DEVICES, indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_channel_pairs_in_the_layers_call(device, monkeypatch, dtype):
    """The GSPN layer's call with channel pairs: four directions with decay
    (on CUDA float gates for fp16), the column directions as row scans of
    transposed copies, two gate groups of 4 channels, B = 2: forward and
    gradients against the reference, and the scan launches' blocks halved."""
    from gspn_diffusers import ops

    monkeypatch.setitem(ops.COLUMNS_AS_ROWS_MIN_PIXELS, device.type, 0)
    monkeypatch.setenv("GSPN_CUDA_COLUMNS", "transposed")
    inputs, grad = decay_inputs(2, 8, 2, 12, 10, "pairs")
    inputs = (*inputs[:3], inputs[3] + 4)  # decays near 1
    launched = {}
    for channels in ("1", "2"):
        monkeypatch.setenv("GSPN_CUDA_CHANNELS", channels)
        launches(device)
        got, want, got_in, ref_in = decay_against_reference(inputs, grad, None, device, dtype)
        launched[channels] = launches(device)
        rtol = 2e-3 if dtype == torch.float16 else 1e-4
        assert_close_scaled(got, want, rtol, f"forward, {channels} channels per block")
        for name, g, w in zip(("x", "logits", "lam", "decay"), got_in, ref_in):
            assert_close_scaled(g.grad, w.grad, rtol, f"grad {name}, {channels} channels per block")
    if launched["1"] is not None:
        # The same launches but the scans': the row and the column launches (2
        # directions of 2 x 8 planes each), forward and backward, in half the blocks.
        changed = [(one, two) for one, two in zip(launched["1"], launched["2"]) if one != two]
        assert len(launched["1"]) == len(launched["2"]) and changed == [((32, 1), (16, 1))] * 4, launched


@pytest.mark.parametrize("device", DEVICES, indirect=True)
def test_channel_pairs_unknown_setting(device, monkeypatch):
    """GSPN_CUDA_CHANNELS other than 1 or 2 (or unset) is an error that says
    what to set, where the CUDA kernels run."""
    monkeypatch.setenv("GSPN_CUDA_CHANNELS", "4")
    x, gates, lam = make_inputs(1, 2, 1, 8, 16, torch.float32, device, "pairs setting")
    if not runs_cuda_kernels(device):
        gspn_scan(x, gates[:, :, :3], lam)  # the CPU kernels do not pair channels
        return
    with pytest.raises(RuntimeError, match='GSPN_CUDA_CHANNELS=4.*"2"'):
        gspn_scan(x, gates[:, :, :3], lam)
