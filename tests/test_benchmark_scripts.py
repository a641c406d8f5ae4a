"""The benchmark scripts run and write their JSON (smoke runs at tiny sizes;
they assert nothing about speed)."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run(script, *args):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_bench_op_writes_json(tmp_path, compiled_cpu):
    out = tmp_path / "op.json"
    run("bench_op.py", "--device", "cpu", "--channels", "4", "--sides", "16", "--groups", "1", "C",
        "--repeats", "1", "--json", str(out))
    result = json.loads(out.read_text())
    rows = result["rows"]
    whats = {r["what"] for r in rows}
    assert {"fwd tb", "bwd rl", "fwd 4dir (one call)", "bwd 4dir (one call)", "fwd 4dir, decay", "bwd 4dir, decay",
            "reference fwd lr", "copy inputs once"} <= whats
    assert all(r["ms"] > 0 and r["GBps"] > 0 for r in rows)
    # the CPU targets: forward vs one copy of its inputs, and vs the reference, per direction and G
    verdicts = {(v["G"], v["what"]): v for v in result["targets"]}
    assert len(verdicts) == 2 * 2 * 4
    v = verdicts[(4, "fwd lr")]
    assert v["target"] == "<= 3" and v["met"] == (v["value"] <= 3)
    assert v["value"] == next(r["x_inputs_copy"] for r in rows if r["G"] == 4 and r["what"] == "fwd lr")
    # malloc tuned as the command line tunes it (glibc on Linux), unless asked not to
    assert result["keep_freed_cpu_memory"] is (sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc")
    run("bench_op.py", "--device", "cpu", "--channels", "4", "--sides", "16", "--groups", "1", "--no-reference",
        "--repeats", "1", "--no-keep-freed", "--json", str(out))
    assert json.loads(out.read_text())["keep_freed_cpu_memory"] is False


def test_bench_op_rows_of_the_column_route(tmp_path, compiled_cpu, monkeypatch):
    """The rows bench_op times only where the column route runs (CUDA): the
    strided kernel's and the transposed copies' 'lr' and four-direction
    rows, and the staged ones forced, beside the route's default; the trial
    ways (split lines, channel pairs). Run here on the CPU with the route switched on for it,
    so a GPU session's short lease does not find a crash in them."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import bench_op
    from gspn_diffusers import ops

    monkeypatch.setitem(ops.COLUMNS_AS_ROWS_MIN_PIXELS, "cpu", 1)
    monkeypatch.setattr(bench_op, "TRIAL_WAYS_DEVICES", {"cuda", "cpu"})
    out = tmp_path / "op.json"
    bench_op.main(["--device", "cpu", "--channels", "2", "--sides", "8", "--groups", "1", "--repeats", "1",
                   "--warmup", "0", "--no-reference", "--no-keep-freed", "--json", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert {"fwd lr, strided kernel", "fwd 4dir, strided kernel", "bwd 4dir, strided kernel", "fwd 4dir (one call)",
            "bwd 4dir (one call)", "fwd lr, transposed", "bwd lr, transposed", "fwd 4dir, transposed",
            "bwd 4dir, transposed", "fwd lr, staged", "bwd lr, staged", "fwd 4dir, staged", "bwd 4dir, staged",
            "fwd 4dir, one stream", "bwd 4dir, one stream", "fwd tb, plain gates", "bwd tb, plain gates",
            "fwd tb, split", "bwd tb, split", "fwd 4dir, split", "bwd 4dir, split", "fwd 4dir, decay, split",
            "fwd tb, channel pairs", "bwd tb, channel pairs", "fwd 4dir, channel pairs", "bwd 4dir, channel pairs",
            "fwd 4dir, decay, channel pairs"} <= {r["what"] for r in rows}
    assert ops.COLUMNS_AS_ROWS_MIN_PIXELS["cpu"] == 1  # the route's threshold is restored after each strided row
    assert "GSPN_CUDA_COLUMNS" not in os.environ  # and the default way of running columns
    assert "GSPN_CUDA_STREAMS" not in os.environ
    assert "GSPN_CUDA_SPLIT" not in os.environ and "GSPN_CUDA_CHANNELS" not in os.environ
    ways = json.loads(out.read_text())["column_ways"]
    assert {w["what"] for w in ways} == {"fwd tb", "bwd tb", "fwd lr", "bwd lr", "fwd 4dir", "bwd 4dir"}
    fwd_lr = next(w for w in ways if w["what"] == "fwd lr")
    ms = {r["what"]: r["ms"] for r in rows}
    assert fwd_lr["x_transposed"] == pytest.approx(ms["fwd lr, transposed"] / ms["fwd lr"])
    assert fwd_lr["x_strided"] == pytest.approx(ms["fwd lr, strided kernel"] / ms["fwd lr"])
    assert fwd_lr["x_staged"] == pytest.approx(ms["fwd lr, staged"] / ms["fwd lr"])
    bwd_4dir = next(w for w in ways if w["what"] == "bwd 4dir")
    assert bwd_4dir["x_one_stream"] == pytest.approx(ms["bwd 4dir, one stream"] / ms["bwd 4dir (one call)"])
    assert "x_one_stream" not in fwd_lr  # a single column direction has no row launch
    fwd_tb = next(w for w in ways if w["what"] == "fwd tb")
    assert fwd_tb["x_split"] == pytest.approx(ms["fwd tb, split"] / ms["fwd tb"])
    assert bwd_4dir["x_split"] == pytest.approx(ms["bwd 4dir, split"] / ms["bwd 4dir (one call)"])
    assert fwd_tb["x_channel_pairs"] == pytest.approx(ms["fwd tb, channel pairs"] / ms["fwd tb"])


def test_bench_unet_quick_writes_json(tmp_path):
    out = tmp_path / "unet.json"
    run("bench_unet.py", "--device", "cpu", "--quick", "--repeats", "1", "--json", str(out))
    rows = json.loads(out.read_text())["rows"]
    assert [r["px"] for r in rows] == [64, 128]
    assert all(r["floor_ms"] > 0 and r["gspn_ms"] > 0 and r["sdpa_ms"] > 0 for r in rows)


def test_bench_distill_quick_writes_json(tmp_path):
    out = tmp_path / "distill.json"
    run("bench_distill.py", "--device", "cpu", "--quick", "--repeats", "1", "--json", str(out))
    (row,) = json.loads(out.read_text())["rows"]
    assert row["samples_per_s"] > 0 and row["gpu_day_samples"] == row["gpu_day_steps"] * row["batch"]


def test_bench_e2e_quick_writes_json(tmp_path):
    out = tmp_path / "e2e.json"
    run("bench_e2e.py", "--device", "cpu", "--quick", "--json", str(out))
    rows = json.loads(out.read_text())["rows"]
    assert {(r["px"], r["variant"]) for r in rows} == {(128, "gspn"), (128, "sdpa"), (256, "gspn"), (256, "sdpa")}
    assert all(r["seconds"] > 0 and r["stages"] for r in rows)


def tiny_teacher_and_adapter(tmp_path):
    """A tiny random SD-like teacher and an untrained GSPN adapter for it, saved."""
    import tiny_pipelines
    from gspn_diffusers import apply_gspn, save_gspn_adapter

    teacher = tiny_pipelines.build_sd(tmp_path / "teacher", sample_size=32)
    pipe = tiny_pipelines.load("sd", teacher)
    apply_gspn(pipe)
    return teacher, save_gspn_adapter(pipe, tmp_path / "adapter")


def test_fidelity_quick_writes_json(tmp_path):
    """On a tiny random teacher: the mechanics, not the scores."""
    teacher, adapter = tiny_teacher_and_adapter(tmp_path)
    out = tmp_path / "fidelity.json"
    run("fidelity.py", "--quick", "--prompts", "2", "--steps", "2", "--teacher", str(teacher), "--adapter", str(adapter),
        "--json", str(out))
    result = json.loads(out.read_text())
    for key in ("teacher_adherence", "student_adherence", "highres_adherence", "direct_adherence"):
        assert 0.0 <= result[key] <= 1.0
    assert result["largest_scale"] == 4 and result["prompts"] == 2 and result["device"] == "cpu"
    entry = result["scales"]["4"]
    assert entry["upscale_mode"] == "pixel" and entry["dilated_sampling_size"] == 32 and entry["stage_growth"] == 2
    assert entry["color_fix"] is True
    # quick mode runs no ablation (the full run: no dilated sampling, no colour fix, no skip residual,
    # the other upscale mode)
    assert not any(key.startswith("highres_") for key in entry)
    # where the minutes go: one wall time per table row
    assert set(result["row_seconds"]) == {"teacher", "student", "highres 4x", "direct 4x"}
    assert all(s > 0 for s in result["row_seconds"].values())
    assert out.with_suffix(".png").exists()


def test_fidelity_without_ablations_measures_the_scales_asked(tmp_path):
    teacher, adapter = tiny_teacher_and_adapter(tmp_path)
    out = tmp_path / "fidelity.json"
    run("fidelity.py", "--no_ablations", "--scales", "2", "--prompts", "1", "--first_prompt", "3", "--steps", "2",
        "--no_color_fix", "--teacher", str(teacher), "--adapter", str(adapter), "--json", str(out))
    result = json.loads(out.read_text())
    entry = result["scales"]["2"]
    assert result["largest_scale"] == 2 and entry["color_fix"] is False
    assert result["prompts"] == 1 and result["first_prompt"] == 3  # a later part of a split run
    assert not any(key.startswith("highres_") for key in entry)


def test_fidelity_refuses_a_negative_first_prompt():
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "fidelity.py"), "--first_prompt", "-1"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--first_prompt must be >= 0, got -1" in proc.stderr


def test_fidelity_refuses_stage_growth_that_does_not_match_the_scales():
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "fidelity.py"), "--scales", "4", "8", "16",
                           "--stage_growth", "2", "8"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--stage_growth has 2 values for the scales [4, 8, 16]" in proc.stderr


def test_fidelity_parts_merge_into_prompt_weighted_figures(tmp_path):
    """A run split with --first_prompt and merged: figures weighted by each part's prompts,
    seconds added; overlapping parts or parts with other settings are refused."""
    teacher, adapter = tiny_teacher_and_adapter(tmp_path)
    first = tmp_path / "part0.json"
    run("fidelity.py", "--no_ablations", "--scales", "2", "--prompts", "1", "--steps", "2", "--teacher", str(teacher),
        "--adapter", str(adapter), "--json", str(first))
    part0 = json.loads(first.read_text())
    # the second part built from the first (a tiny random teacher scores 0 everywhere): three more prompts,
    # all correct, so the merged figures show their weights
    part1 = json.loads(first.read_text())
    part1.update(first_prompt=1, prompts=3, teacher_student_mean_abs_diff=part0["teacher_student_mean_abs_diff"] + 0.4)
    for figures in (part1["teacher"], part1["scales"]["2"]["highres"], part1["scales"]["2"]["direct"]):
        figures.update(correct=1.0, duplicates_per_image=2.0)
    for figures in (part0["teacher"], part0["scales"]["2"]["highres"], part0["scales"]["2"]["direct"]):
        figures.update(correct=0.0, duplicates_per_image=0.0)
    second = tmp_path / "part1.json"
    first.write_text(json.dumps(part0))
    second.write_text(json.dumps(part1))
    out = tmp_path / "merged.json"
    table = run("fidelity.py", "--merge", str(second), str(first), "--json", str(out))
    merged = json.loads(out.read_text())
    assert merged["prompts"] == 4 and merged["prompt_ranges"] == [[0, 1], [1, 4]]
    assert merged["teacher"]["correct"] == merged["teacher_adherence"] == 0.75
    assert merged["teacher"]["duplicates_per_image"] == 1.5
    assert merged["highres_adherence"] == merged["direct_adherence"] == 0.75
    assert merged["student_adherence"] == part0["student_adherence"]
    assert abs(merged["teacher_student_mean_abs_diff"] - (part0["teacher_student_mean_abs_diff"] + 0.3)) < 1e-12
    assert merged["row_seconds"]["direct 2x"] == 2 * part0["row_seconds"]["direct 2x"]
    assert merged["scales"]["2"]["stage_growth"] == 2 and merged["merged_from"] == [str(second), str(first)]
    assert "over 4 prompts" in table

    def refused(*parts):
        proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "fidelity.py"), "--merge", *map(str, parts),
                               "--json", str(tmp_path / "refused.json")], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2 and not (tmp_path / "refused.json").exists()
        return proc.stderr

    assert "prompt ranges overlap: [0, 1] and [0, 1]" in refused(first, first)
    part1.update(steps=3)
    second.write_text(json.dumps(part1))
    assert "steps differs between parts: 2 (prompts [0, 1]) vs 3 (prompts [1, 4])" in refused(first, second)
    part1.update(steps=2)
    part1["scales"]["2"]["color_fix"] = False
    second.write_text(json.dumps(part1))
    assert "scales or their settings differ between parts" in refused(first, second)


def test_profile_kernels_runs_every_case(compiled_cpu):
    """The script gpu_check.sh's profile stage runs under ncu, as it runs it:
    every case (at a small side on the CPU here) in the order it lists them,
    which the stage prints to tell the profiled kernels apart."""
    script = str(ROOT / "scripts" / "profile_kernels.py")
    names = [line.split()[0] for line in subprocess.run(
        [sys.executable, script, "--list"], check=True, capture_output=True, text=True).stdout.splitlines()]
    assert len(names) >= 4 and len(set(names)) == len(names)
    out = subprocess.run([sys.executable, script, "--device", "cpu", "--side", "8", "--dtype", "float32", "--no-warmup"],
                         check=True, capture_output=True, text=True).stdout
    assert out.split() == [w for name in names for w in ("ran", name)]
