"""GSPNHighResPipeline on tiny SD-1.x- and SDXL-like bases (native 64 px)."""

from __future__ import annotations

import io
import math
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import tiny_pipelines
from gspn_diffusers import GSPNHighResPipeline, apply_gspn, save_gspn_adapter
from gspn_diffusers.pipelines import plan_stages, read_png_metadata, save_png
from gspn_diffusers.pipelines.color_fix import lowpass
from gspn_diffusers.pipelines.highres import chunked_feed_forward, dilation_factor, from_dilated, to_dilated
from gspn_diffusers.pipelines.vae_tiling import vae_decode, vae_encode

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "a red circle at the top left"


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return tiny_pipelines.build_sd(tmp_path_factory.mktemp("hr") / "sd64", sample_size=32)


@pytest.fixture(scope="module")
def adapter(base, tmp_path_factory):
    pipe = tiny_pipelines.load("sd", base)
    apply_gspn(pipe)
    return save_gspn_adapter(pipe, tmp_path_factory.mktemp("hr") / "adapter")


def load(base, adapter=None):
    pipe = GSPNHighResPipeline.from_pretrained(base, adapter=adapter)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run(pipe, width, height, seed=0, **kw):
    kw.setdefault("num_inference_steps", 6)
    kw.setdefault("output_type", "np")
    return pipe(PROMPT, width=width, height=height, generator=torch.Generator().manual_seed(seed),
                vae_tile_size=kw.pop("vae_tile_size", 32), vae_tile_overlap=8, **kw)


def test_stages_64_to_256_square(base, adapter):
    out = run(load(base, adapter), 256, 256, return_stage_images=True)
    assert [(s.width, s.height) for s in out.stages] == [(64, 64), (128, 128), (256, 256)]
    assert [s.steps for s in out.stages] == [6, 3, 2]
    assert out.images.shape == (1, 256, 256, 3) and np.isfinite(out.images).all()
    assert [im.shape[1:3] for im in out.stage_images] == [(64, 64), (128, 128), (256, 256)]
    assert all(s.seconds > 0 for s in out.stages)


def test_stages_non_square(base, adapter):
    out = run(load(base, adapter), 192, 288, stage_sizes=[(64, 96), (128, 192)])
    assert [(s.width, s.height) for s in out.stages] == [(64, 96), (128, 192), (192, 288)]
    assert out.images.shape == (1, 288, 192, 3)


def test_default_plan_keeps_aspect_and_native_area():
    stages = plan_stages(4096, 2304, 1024, 8, 30)
    assert [(s.width, s.height) for s in stages] == [(1368, 768), (2048, 1152), (4096, 2304)]
    assert stages[0].strength == 1.0 and stages[1].strength > stages[2].strength
    with pytest.raises(ValueError, match="smaller than the base model's native 512x512"):
        plan_stages(256, 256, 512, 8, 30)
    with pytest.raises(ValueError, match="stage_strengths has 1 entries for 3 stages"):
        plan_stages(2048, 2048, 512, 8, 30, stage_strengths=[0.3])


def test_stage_growth_sets_how_many_stages():
    def sides(growth, target):
        return [s.width for s in plan_stages(target, target, 64, 8, 15, stage_growth=growth)]

    assert sides(2, 512) == [64, 128, 256, 512]
    assert sides(8, 512) == [64, 512]
    assert sides(4, 1024) == [64, 256, 1024]
    assert sides(4, 512) == [64, 128, 512]  # the first step takes the remainder
    with pytest.raises(ValueError, match="stage_growth=1 must be > 1"):
        plan_stages(512, 512, 64, 8, 15, stage_growth=1)


def test_stage_growth_reaches_the_pipeline(base, adapter):
    out = run(load(base, adapter), 256, 256, stage_growth=4, upscale_mode="pixel")
    assert [(s.width, s.height) for s in out.stages] == [(64, 64), (256, 256)]
    assert out.images.shape == (1, 256, 256, 3) and np.isfinite(out.images).all()


def test_seeds_reproduce(base, adapter):
    pipe = load(base, adapter)
    a, b, c = (run(pipe, 128, 128, seed=s).images for s in (1, 1, 2))
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_sequential_cfg_equals_batched(base, adapter):
    pipe = load(base, adapter)
    batched = run(pipe, 128, 128, sequential_cfg_above=10**9, output_type="latent").images
    sequential = run(pipe, 128, 128, sequential_cfg_above=0, output_type="latent").images
    # Batch size changes the GEMM blocking, so the two agree to float32 rounding
    # accumulated over the steps, not bit for bit.
    torch.testing.assert_close(sequential, batched, rtol=1e-3, atol=1e-3)


def test_chunked_feed_forward_equals_plain(base):
    unet = tiny_pipelines.load("sd", base).unet
    args = (torch.randn(1, 4, 12, 20), torch.tensor([300]))
    kwargs = {"encoder_hidden_states": torch.randn(1, 16, 32)}
    with torch.no_grad():
        plain = unet(*args, **kwargs).sample
        with chunked_feed_forward(unet, tokens=7):  # 240 and 60 tokens: uneven chunks
            chunked = unet(*args, **kwargs).sample
        again = unet(*args, **kwargs).sample
    torch.testing.assert_close(chunked, plain, rtol=1e-5, atol=1e-6)
    assert torch.equal(again, plain), "the original feed-forwards must be back"


def smooth_latent(height, width):
    y, x = torch.meshgrid(torch.linspace(0, 1, height), torch.linspace(0, 1, width), indexing="ij")
    return torch.stack([torch.sin(2 * math.pi * (x + k / 4)) * torch.cos(math.pi * y) for k in range(4)])[None]


def test_tiled_apply_is_exact_for_local_functions():
    """The tiling and cross-fade themselves add nothing: for an operation that
    only looks at each cell, tiled equals whole in both directions."""
    from gspn_diffusers.pipelines.vae_tiling import tiled_apply

    x = torch.randn(2, 4, 48, 64)
    up = lambda t: F.interpolate(t, scale_factor=2, mode="nearest") * 2 + 1
    torch.testing.assert_close(tiled_apply(x, up, 20, 6, 2.0, 4), up(x))
    down = lambda t: F.avg_pool2d(t, 2)
    torch.testing.assert_close(tiled_apply(x, down, 20, 6, 0.5, 4), down(x))


def smooth_decoder(vae):
    """A decoder whose 3x3 convolutions average their window: random weights
    otherwise decode even a smooth latent into noise, where a seam would hide."""
    with torch.no_grad():
        for m in vae.decoder.modules():
            if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3):
                m.weight.copy_(m.weight.mean(dim=(2, 3), keepdim=True).expand_as(m.weight))
    return vae


def test_tiled_decode_has_no_seams(base):
    from gspn_diffusers.pipelines.vae_tiling import _starts

    vae = smooth_decoder(tiny_pipelines.load("sd", base).vae)
    latent = smooth_latent(48, 64)
    with torch.no_grad():
        whole = vae_decode(vae, latent)
        tiled = vae_decode(vae, latent, tile=32, overlap=16)
    assert tiled.shape == whole.shape == (1, 3, 96, 128)
    # No step anywhere: neighbouring columns differ no more than in the whole decode.
    jump = (tiled[..., 1:] - tiled[..., :-1]).abs().max()
    assert jump <= 1.25 * (whole[..., 1:] - whole[..., :-1]).abs().max()
    # Per-tile normalisation shifts values slowly; the tile borders (in pixels)
    # are no worse than the rest, and small against the image's range.
    diff = (tiled - whole).abs()
    starts = _starts(64, 32, 16)
    borders = [2 * s for s in starts[1:]] + [2 * (s + 32) for s in starts[:-1] if 2 * (s + 32) < 128]
    band = torch.cat([diff[..., b - 2:b + 2] for b in borders], dim=-1)
    assert band.mean() <= 1.5 * diff.mean() + 0.02
    assert band.mean() <= 0.1 * (whole.max() - whole.min())


def test_tiled_encode_tracks_whole(base):
    vae = tiny_pipelines.load("sd", base).vae
    with torch.no_grad():
        for m in vae.encoder.modules():  # averaging convolutions, as in smooth_decoder
            if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3):
                m.weight.copy_(m.weight.mean(dim=(2, 3), keepdim=True).expand_as(m.weight))
        images = F.interpolate(smooth_latent(24, 32)[:, :3], size=(96, 128), mode="bilinear")
        whole = vae_encode(vae, images)
        tiled = vae_encode(vae, images, tile=64, overlap=32)
    assert tiled.shape == whole.shape == (1, 4, 48, 64) and torch.isfinite(tiled).all()
    diff = (tiled - whole).abs()
    assert diff.mean() <= 0.1 * (whole.max() - whole.min())


def test_skip_residual_keeps_the_previous_layout(base, adapter):
    """DemoFusion's skip residual pulls each stage towards the upscaled
    previous one: the final image stays closer to stage 1's layout."""
    pipe = load(base, adapter)
    distances = {}
    for flag in (True, False):
        out = run(pipe, 256, 256, skip_residual=flag, return_stage_images=True, stage_strengths=[1.0, 0.8, 0.8])
        first = torch.from_numpy(out.stage_images[0]).permute(0, 3, 1, 2)
        up = F.interpolate(first, size=(256, 256), mode="bicubic").permute(0, 2, 3, 1).numpy()
        distances[flag] = float(np.mean((out.images - up) ** 2))
    assert distances[True] < distances[False], distances


def test_dilated_sub_latents_are_the_interleaved_cells():
    x = torch.randn(2, 4, 12, 8)
    sub = to_dilated(x, 4)
    assert sub.shape == (32, 4, 3, 2)
    for b in range(2):
        for i in range(4):
            for j in range(4):
                assert torch.equal(sub[b * 16 + i * 4 + j], x[b, :, i::4, j::4])
    assert torch.equal(from_dilated(sub, 4), x)
    assert dilation_factor(64, 64, 16) == 4 and dilation_factor(48, 64, 16) == 2
    assert dilation_factor(16, 16, 16) == 1 and dilation_factor(30, 30, 16) == 1 and dilation_factor(64, 32, 8) == 4


def test_dilated_sampling_denoises_native_sized_sub_latents(base, adapter):
    pipe = load(base, adapter)
    seen = []
    hook = pipe.unet.register_forward_pre_hook(lambda module, args: seen.append(tuple(args[0].shape)))
    try:
        plain = run(pipe, 256, 256, stage_strengths=[1.0, 0.5, 0.5])
        calls = len(seen)
        seen.clear()
        dilated = run(pipe, 256, 256, stage_strengths=[1.0, 0.5, 0.5], dilated_sampling=True)
    finally:
        hook.remove()
    native = pipe.unet.config.sample_size
    # CFG doubles the batch; 128 latent cells / 4 and 64 / 2 give native-sized sub-latents
    assert (2 * 16, 4, native, native) in seen and (2 * 4, 4, native, native) in seen
    # 6 + 3 + 3 steps; in the two upscaling stages the first step is dilated only
    # (weight 1) and the other two run both paths
    assert calls == 12 and len(seen) == 6 + 5 + 5
    assert dilated.images.shape == plain.images.shape and not np.allclose(dilated.images, plain.images)
    # large stages run the sub-latents in s groups (and the CFG halves one after the other): same numbers
    grouped = run(pipe, 256, 256, stage_strengths=[1.0, 0.5, 0.5], dilated_sampling=True, sequential_cfg_above=0)
    np.testing.assert_allclose(grouped.images, dilated.images, atol=1e-4)


def test_pixel_upscale_mode(base, adapter):
    out = run(load(base, adapter), 128, 128, upscale_mode="pixel", vae_tile_size=16)
    assert out.images.shape == (1, 128, 128, 3) and np.isfinite(out.images).all()


def test_stage_images_decode_each_stage_once(base, adapter, monkeypatch):
    """return_stage_images reuses each stage's decode for the next upscale and the
    output, so it changes neither the images nor the number of decodes beyond
    one per stage."""
    pipe = load(base, adapter)
    decodes = []
    decode = pipe.decode
    monkeypatch.setattr(pipe, "decode", lambda latents, *a, **k: decodes.append(latents.shape[-1]) or
                        decode(latents, *a, **k))
    # Without stage images, latent mode decodes only the last stage's input (its
    # colour reference) and output.
    for mode, color_fix, needed in (("pixel", False, [32, 64, 128]), ("latent", True, [64, 128])):
        decodes.clear()
        plain = run(pipe, 256, 256, upscale_mode=mode, color_fix=color_fix).images
        without = list(decodes)
        decodes.clear()
        out = run(pipe, 256, 256, upscale_mode=mode, color_fix=color_fix, return_stage_images=True)
        assert decodes == [32, 64, 128], (mode, decodes)  # latent sides of the three stages
        assert without == needed, (mode, without)
        np.testing.assert_array_equal(out.images, plain)
        assert out.stage_images[-1] is out.images


def test_color_fix_keeps_the_previous_stage_colours(base, adapter):
    """With color_fix an upscaling stage's low band is its input's: far closer
    to the upscaled previous stage than without, in both upscale modes."""
    pipe = load(base, adapter)
    for mode in ("pixel", "latent"):
        distance = {}
        for flag in (True, False):
            out = run(pipe, 128, 128, upscale_mode=mode, color_fix=flag, return_stage_images=True,
                      stage_strengths=[1.0, 0.8])
            first = torch.from_numpy(out.stage_images[0]).permute(0, 3, 1, 2)
            final = torch.from_numpy(out.images).permute(0, 3, 1, 2)
            up = F.interpolate(first, size=(128, 128), mode="bicubic", align_corners=False)
            distance[flag] = float((lowpass(final, 1) - lowpass(up, 1)).abs().mean())
            np.testing.assert_allclose(out.stage_images[-1], out.images, atol=1e-6)
        assert distance[True] < 0.3 * distance[False], (mode, distance)


def test_callbacks_and_progress_bars(base, adapter):
    pipe = load(base, adapter)
    stream = io.StringIO()
    pipe.set_progress_bar_config(file=stream, disable=False)
    seen = []

    def callback(p, step, t, kwargs):
        seen.append((p.stage_index, step))
        return kwargs

    out = run(pipe, 128, 128, callback_on_step_end=callback)
    assert [s for _, s in seen] == list(range(sum(s.steps for s in out.stages)))
    assert {stage for stage, _ in seen} == {0, 1}
    text = stream.getvalue()
    assert "all stages" in text and "stage 1/2 64x64" in text and "stage 2/2 128x128" in text


def test_bad_input(base, adapter):
    pipe = load(base, adapter)
    with pytest.raises(ValueError, match="smaller than the base model's native 64x64"):
        run(pipe, 32, 32)
    with pytest.warns(UserWarning, match="width=131 is not a multiple of the latent factor 2; using 132"):
        out = run(pipe, 131, 64, num_inference_steps=2)
    assert out.images.shape == (1, 64, 132, 3)
    with pytest.raises(ValueError, match="upscale_mode"):
        run(pipe, 128, 128, upscale_mode="nearest")


class _Stop(Exception):
    pass


def test_missing_adapter_warns_about_attention_cost(base):
    pipe = load(base)

    def stop(*args):
        raise _Stop  # the warning comes before the first step; attention at 256 px is slow on a CPU

    with pytest.warns(UserWarning, match="no GSPN adapter loaded: the base self-attention runs at 256x256"):
        with pytest.raises(_Stop):
            run(pipe, 256, 256, num_inference_steps=2, callback_on_step_end=stop)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pipe._warn_without_gspn(96, 96)  # a small upscale stays quiet


def test_loading_routes(base, adapter):
    from diffusers import DiffusionPipeline

    sd = tiny_pipelines.load("sd", base)
    from_pipe = GSPNHighResPipeline.from_pipe(sd)
    assert isinstance(from_pipe, GSPNHighResPipeline) and from_pipe.unet is sd.unet
    custom = DiffusionPipeline.from_pretrained(base, custom_pipeline=str(ROOT / "pipelines" / "gspn_highres"),
                                               trust_remote_code=True)
    assert type(custom).__name__ == "GSPNHighResPipeline"
    custom.load_gspn_adapter(adapter)
    custom.set_progress_bar_config(disable=True)
    reference = run(load(base, adapter), 128, 128).images
    assert np.array_equal(run(custom, 128, 128).images, reference)


def test_sdxl_base(tmp_path):
    path = tiny_pipelines.build_sdxl(tmp_path / "sdxl")
    pipe = GSPNHighResPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.is_sdxl
    apply_gspn(pipe)
    out = run(pipe, 64, 96, stage_sizes=[(32, 48)])
    assert out.images.shape == (1, 96, 64, 3) and [(s.width, s.height) for s in out.stages] == [(32, 48), (64, 96)]


def test_png_metadata_round_trip(tmp_path):
    from PIL import Image

    meta = {"prompt": "a red circle", "seed": 7, "stages": [{"width": 64, "strength": 1.0}], "adapter": None}
    path = save_png(Image.new("RGB", (8, 8)), tmp_path / "x.png", meta)
    assert read_png_metadata(path) == meta


def test_cli_generate_writes_png_with_metadata(base, adapter, tmp_path):
    out = tmp_path / "image.png"
    stages = tmp_path / "stages"
    proc = subprocess.run(
        [sys.executable, "-m", "gspn_diffusers.cli", "generate", "--model", str(base), "--adapter", str(adapter),
         "--prompt", PROMPT, "--width", "128", "--height", "96", "--steps", "4", "--seed", "3", "--out", str(out),
         "--save_stages", str(stages), "--color_fix"],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "stage 1" in proc.stdout and "wrote" in proc.stdout
    meta = read_png_metadata(out)
    assert meta["prompt"] == PROMPT and meta["seed"] == 3 and meta["model"] == str(base) and meta["color_fix"]
    planned = [s.width for s in plan_stages(128, 96, 64, 2, 4)]
    assert meta["adapter"] == str(adapter) and [s["width"] for s in meta["stages"]] == planned
    assert sorted(p.name for p in stages.iterdir()) == ["stage-1.png", "stage-2.png"]
