"""The shapes world and its checker."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from gspn_diffusers.shapes import (COLOURS, adherence, detect, held_out_scenes, parse_caption, render, sample_scene,
                                   score)
from gspn_diffusers.shapes.world import HELD_OUT_SEED_OFFSET, POSITIONS


def test_deterministic_from_seed():
    a, b, c = sample_scene(5), sample_scene(5), sample_scene(6)
    assert a == b and a != c
    assert np.array_equal(render(a), render(b)) and not np.array_equal(render(a), render(c))
    assert render(a).shape == (64, 64, 3) and render(a, 96).shape == (96, 96, 3)


def test_captions_and_held_out_set():
    scene = sample_scene(11)
    assert parse_caption(scene.caption) == list(scene.objects)
    assert 1 <= len(scene.objects) <= 3 and len({o.cell for o in scene.objects}) == len(scene.objects)
    held = held_out_scenes(50)
    assert all(s.seed >= HELD_OUT_SEED_OFFSET for s in held)
    counts = {len(s.objects) for s in held}
    assert counts == {1, 2, 3}
    with pytest.raises(ValueError, match="not a shapes-world phrase"):
        parse_caption("a purple circle at the top")
    with pytest.raises(ValueError, match="unknown position"):
        parse_caption("a red circle somewhere")


def test_checker_reads_the_world_back():
    scenes = [sample_scene(i) for i in range(200)]
    result = adherence([render(s) for s in scenes], [s.caption for s in scenes])
    assert result["correct"] >= 0.99 and result["duplicates_per_image"] == 0


def test_checker_at_high_resolution():
    scenes = [sample_scene(1000 + i) for i in range(40)]
    big = [np.asarray(Image.fromarray(render(s)).resize((512, 512), Image.BICUBIC)) for s in scenes]
    assert adherence(big, [s.caption for s in scenes])["correct"] >= 0.97


def test_checker_ignores_texture_inside_objects():
    """Dark strokes inside an object (as generated images have) leave its shape alone."""
    from gspn_diffusers.shapes.world import Scene, ShapeObject

    scene = Scene((ShapeObject("green", "square", (1, 1)), ShapeObject("red", "circle", (0, 0))), (20, 20, 20), False, 0)
    image = render(scene, 192)
    green = np.all(image == np.array(COLOURS["green"], dtype=np.uint8), axis=-1)
    ys, xs = np.nonzero(green)
    cy, cx = int(ys.mean()), int(xs.mean())
    assert xs.max() - xs.min() > 28  # the strokes below stay inside it
    image[cy - 6:cy + 6, cx - 6:cx + 6] = 0  # a dark blotch and two strokes: 17 % of its area
    image[[cy - 11, cy + 10], cx - 10:cx + 10] = 0
    assert score(image, scene.caption).correct


def test_checker_reads_squares_with_pinched_sides():
    """Generated squares often have concave sides (they fill 0.80-0.88 of their
    bounding box, like a circle's 0.79): full corners still make them squares,
    and a circle or a triangle of the same size stays what it is."""
    size, half = 96, 14.0
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    dy, dx = np.abs(y - 48), np.abs(x - 48)
    # each side bows inwards by 13 % of the half-width at its middle
    pinched = (dy <= half - 0.13 * half * np.cos(np.pi * dx / (2 * half))) & (dx <= half - 0.13 * half * np.cos(
        np.pi * dy / (2 * half)))
    circle = (y - 48) ** 2 + (x - 48) ** 2 <= half ** 2
    top, bottom = 48 - half, 48 + half * 0.9
    t = np.clip((y - top) / (bottom - top), 0, 1)
    triangle = (y >= top) & (y <= bottom) & (dx <= t * half)
    assert 0.75 < pinched.sum() / (2 * half) ** 2 < 0.88  # box fill alone would call it a circle
    for mask, shape in ((pinched, "square"), (circle, "circle"), (triangle, "triangle")):
        image = np.full((size, size, 3), 20, dtype=np.uint8)
        image[mask] = COLOURS["blue"]
        assert score(image, f"a blue {shape} in the center").correct, shape


def test_checker_rejects_wrong_images():
    scenes = [sample_scene(i) for i in range(200)]
    images = [render(s) for s in scenes]
    shuffled = [scenes[(i + 1) % len(scenes)].caption for i in range(len(scenes))]
    assert adherence(images, shuffled)["correct"] <= 0.02
    blank = np.zeros((64, 64, 3), dtype=np.uint8)
    s = score(blank, "a red circle in the center")
    assert not s.correct and not s.count


def test_checker_pinpoints_the_error():
    scene = sample_scene(3)
    obj = scene.objects[0]
    other_colour = next(c for c in COLOURS if c != obj.colour)
    recoloured = scene.caption.replace(f"a {obj.colour} {obj.shape}", f"a {other_colour} {obj.shape}", 1)
    s = score(render(scene), recoloured)
    assert not s.correct and not s.colours and s.count
    free = next(c for c in POSITIONS if c not in {o.cell for o in scene.objects})
    moved = scene.caption.replace(POSITIONS[obj.cell], POSITIONS[free], 1)
    s = score(render(scene), moved)
    assert not s.correct and not s.positions and s.colours and s.shapes


def test_duplicates_are_counted():
    from gspn_diffusers.shapes.world import Scene, ShapeObject

    twice = Scene((ShapeObject("red", "circle", (0, 0)), ShapeObject("red", "circle", (2, 2))), (20, 20, 20), False, 0)
    s = score(render(twice), "a red circle at the top left")
    assert s.duplicates == 1 and not s.correct and not s.count
    assert score(render(twice), twice.caption).duplicates == 0


def test_training_prompts_are_distinct_and_from_training_seeds(tmp_path):
    from gspn_diffusers.shapes.prompts import main, training_prompts

    prompts = training_prompts(64)
    assert len(set(prompts)) == 64 and all(parse_caption(p) for p in prompts)
    out = tmp_path / "p.txt"
    assert main(["--count", "10", "--out", str(out)]) == 0
    assert out.read_text().splitlines() == training_prompts(10)


def test_teacher_recipe_builds_the_documented_architecture():
    from gspn_diffusers.shapes.teacher import MAX_TOKENS, build_teacher, world_batch

    pipe = build_teacher()
    assert pipe.vae_scale_factor == 4 and pipe.unet.config.sample_size == 16
    images, captions = world_batch(3, 4)
    assert images.shape == (4, 3, 64, 64) and images.min() >= -1 and images.max() <= 1
    ids = pipe.tokenizer(captions, padding="max_length", max_length=MAX_TOKENS, return_tensors="pt").input_ids
    assert (ids == pipe.tokenizer.unk_token_id).sum() == 0, "every caption word is in the vocabulary"
    assert ids.shape[1] == MAX_TOKENS


def test_training_batches_are_the_same_rendered_ahead_by_workers():
    from gspn_diffusers.shapes.teacher import _step_batches, world_batch

    sizes = [(64, 3), (128, 2)]
    inline = list(_step_batches(4, sizes, rank=1, workers=0, device="cpu"))
    ahead = list(_step_batches(4, sizes, rank=1, workers=2, device="cpu"))
    assert len(inline) == len(ahead) == 4
    for step, (a, b) in enumerate(zip(inline, ahead)):
        for index, ((side, count), (images, captions), (images2, captions2)) in enumerate(zip(sizes, a, b)):
            want_images, want_captions = world_batch(step, count, 1, stream=0 if index == 0 else 10 + index,
                                                     size=side)
            assert images.shape == (count, 3, side, side)
            assert torch.equal(images, want_images) and torch.equal(images2, want_images)
            assert list(captions) == list(captions2) == want_captions


def test_teacher_stages_chain_through_a_saved_vae(tmp_path):
    from safetensors.torch import load_file

    from gspn_diffusers.shapes.teacher import train_teacher

    vae_only = train_teacher(tmp_path / "vae", vae_steps=2, unet_steps=0, batch_size=2, eval_prompts=0)
    teacher = train_teacher(tmp_path / "teacher", vae_from=vae_only, unet_steps=2, batch_size=2, eval_prompts=0,
                            min_snr_gamma=5.0, warmup_steps=1)
    first, second = (load_file(p / "vae" / "diffusion_pytorch_model.safetensors") for p in (vae_only, teacher))
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    assert (teacher / "unet" / "diffusion_pytorch_model.safetensors").exists()

    from gspn_diffusers.shapes.export import export

    export(teacher, None, tmp_path / "assets")  # a run stopped before distillation: the teacher alone
    unet = load_file(tmp_path / "assets" / "teacher" / "unet" / "diffusion_pytorch_model.safetensors")
    assert {t.dtype for t in unet.values()} == {torch.float16}
    assert not (tmp_path / "assets" / "gspn_adapter").exists()


def test_teacher_continues_at_several_scales(tmp_path):
    from safetensors.torch import load_file

    from gspn_diffusers.shapes.teacher import parse_sizes, train_teacher

    assert parse_sizes("64:16, 128:4") == [(64, 16), (128, 4)]
    for bad in ("64", "64:0", "66:2", "a:b", ""):
        with pytest.raises(ValueError, match="SIDE:BATCH"):
            parse_sizes(bad)
    first = train_teacher(tmp_path / "first", vae_steps=1, unet_steps=1, batch_size=2, eval_prompts=0)
    second = train_teacher(tmp_path / "second", init_from=first, unet_steps=1, sizes=[(64, 2), (128, 1)],
                           vae_multiscale_steps=2, eval_prompts=0, warmup_steps=0, data_workers=1)
    vae1, vae2 = (load_file(p / "vae" / "diffusion_pytorch_model.safetensors") for p in (first, second))
    changed = {k.split(".")[0] for k in vae1 if not torch.equal(vae1[k], vae2[k])}
    assert changed == {"encoder", "quant_conv"}, "the multi-scale stage trains the encoder only"
    unet1, unet2 = (load_file(p / "unet" / "diffusion_pytorch_model.safetensors") for p in (first, second))
    assert any(not torch.equal(unet1[k], unet2[k]) for k in unet1), "the denoiser continued from the first run"
