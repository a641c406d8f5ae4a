"""Building, caching and falling back. Each case runs in a fresh interpreter,
because the backend is chosen once per process."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

PROBE = textwrap.dedent(
    """
    import json, warnings, torch
    from gspn_diffusers.ops import gspn_scan, scan_reference, load_backend
    x = torch.randn(1, 2, 5, 4, dtype=torch.float64)
    g = torch.rand(1, 2, 3, 5, 4, dtype=torch.float64) / 3
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ok = all(torch.allclose(gspn_scan(x, g, x, "lr"), scan_reference(x, g, x, "lr")) for _ in range(3))
    status = load_backend()
    print(json.dumps({
        "cpu": status.cpu, "reason": status.reason, "ok": ok,
        "build_dir": str(status.build_dir) if status.build_dir else None,
        "warnings": [str(w.message) for w in caught if "gspn" in str(w.message)],
    }))
    """
)


def run_probe(env_update: dict):
    env = dict(os.environ)
    env.update(env_update)
    proc = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, timeout=600)
    return proc, (json.loads(proc.stdout.strip().splitlines()[-1]) if proc.returncode == 0 else None)


def test_forced_reference_backend_is_silent():
    proc, out = run_probe({"GSPN_BACKEND": "reference"})
    assert out is not None, proc.stderr
    assert out["cpu"] == "reference" and out["ok"] and out["warnings"] == []


def test_missing_compiler_warns_once_and_falls_back(tmp_path):
    proc, out = run_probe({"GSPN_BACKEND": "auto", "CXX": "/nonexistent/c++", "GSPN_CACHE_DIR": str(tmp_path)})
    assert out is not None, proc.stderr
    assert out["cpu"] == "reference" and out["ok"]
    assert len(out["warnings"]) == 1, out["warnings"]
    message = out["warnings"][0]
    assert "no C++ compiler" in message and "CXX" in message and "GSPN_BACKEND=reference" in message


def test_compiled_mode_refuses_to_fall_back(tmp_path):
    proc, out = run_probe({"GSPN_BACKEND": "compiled", "CXX": "/nonexistent/c++", "GSPN_CACHE_DIR": str(tmp_path)})
    assert proc.returncode != 0
    assert "ExtensionBuildError" in proc.stderr and "no C++ compiler" in proc.stderr


def test_unknown_backend_mode():
    proc, _ = run_probe({"GSPN_BACKEND": "fastest"})
    assert proc.returncode != 0 and "GSPN_BACKEND='fastest'" in proc.stderr


def test_build_is_cached(compiled_cpu):
    """A new process reuses the build: same folder, library file untouched."""
    libs = [p for p in compiled_cpu.build_dir.iterdir() if p.suffix == ".so"]
    assert len(libs) == 1
    before = libs[0].stat().st_mtime_ns
    # build_dir is <cache root>/<torch tag>/<source hash>
    proc, out = run_probe({"GSPN_BACKEND": "compiled", "GSPN_CACHE_DIR": str(compiled_cpu.build_dir.parents[1])})
    assert out is not None, proc.stderr
    assert out["cpu"] == "compiled" and out["ok"] and out["warnings"] == []
    assert out["build_dir"] == str(compiled_cpu.build_dir)
    assert libs[0].stat().st_mtime_ns == before


@pytest.mark.skipif(
    not (sys.platform.startswith("linux") and torch.backends.openmp.is_available()) or shutil.which("ldd") is None,
    reason="OpenMP threading is checked on Linux builds of torch with OpenMP",
)
def test_cpu_kernels_use_torchs_openmp_runtime(compiled_cpu):
    """Built without -fopenmp, at::parallel_for runs serially: the kernels must link
    libgomp, and in-process that must resolve to the runtime torch loaded (one pool)."""
    (lib,) = [p for p in compiled_cpu.build_dir.iterdir() if p.suffix == ".so"]
    assert "libgomp" in subprocess.run(["ldd", str(lib)], capture_output=True, text=True).stdout
    with open("/proc/self/maps") as maps:
        runtimes = {line.split()[-1] for line in maps if "libgomp" in line}
    assert len(runtimes) == 1, runtimes


@pytest.mark.skipif(not (sys.platform.startswith("linux") and torch.backends.openmp.is_available()),
                    reason="-fopenmp is only used on Linux builds of torch with OpenMP")
def test_build_without_openmp_runtime_falls_back_to_one_thread(tmp_path, compiled_cpu):
    """A compiler that cannot do -fopenmp (clang without libomp) still gets working
    kernels, with one warning; later processes do not retry the failing build."""
    log = tmp_path / "openmp-attempts"
    wrapper = tmp_path / "c++"
    wrapper.write_text(textwrap.dedent(f"""\
        #!/bin/sh
        for a in "$@"; do
          if [ "$a" = "-fopenmp" ]; then echo x >> {log}; echo "fatal: no OpenMP runtime" >&2; exit 1; fi
        done
        exec c++ "$@"
        """))
    wrapper.chmod(0o755)
    env = {"GSPN_BACKEND": "compiled", "CXX": str(wrapper), "GSPN_CACHE_DIR": str(tmp_path / "cache")}
    for attempt in range(2):
        proc, out = run_probe(env)
        assert out is not None, proc.stderr
        assert out["cpu"] == "compiled" and out["ok"]
        assert len(out["warnings"]) == 1, out["warnings"]
        assert "without -fopenmp" in out["warnings"][0] and "CXX=g++" in out["warnings"][0]
        assert log.read_text().count("x") == 1  # the first process tried once; the second not at all


def test_cuda_simulator_build_is_its_own_build(monkeypatch):
    """GSPN_CUDA_SIM=1 (CI's run of the kernel tests through the CUDA kernels)
    builds into a folder of its own, from the CPU host code plus the CUDA
    sources, so it never replaces the real kernels in the cache."""
    from gspn_diffusers.ops import build

    monkeypatch.delenv(build.ENV_CUDA_SIM, raising=False)
    real = build._build_dir([])
    assert build._sources(False) == build.SOURCES_CPU
    monkeypatch.setenv(build.ENV_CUDA_SIM, "1")
    sim = build._build_dir([])
    assert sim != real and sim.parent.name.endswith("-cudasim")
    assert build._sources(True) == build.SOURCES_CPU + build.SOURCES_CUDA_SIM
    buildable, reason = build._cuda_buildable()
    assert not buildable and "simulator" in reason


def test_cli_build_reports_backends(compiled_cpu):
    proc = subprocess.run(
        [sys.executable, "-m", "gspn_diffusers.cli", "build"], capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr
    assert "cpu backend:  compiled" in proc.stdout and "cuda backend:" in proc.stdout


@pytest.mark.parametrize("args", [["--help"], ["build", "--help"]])
def test_cli_help(args):
    proc = subprocess.run([sys.executable, "-m", "gspn_diffusers.cli", *args], capture_output=True, text=True)
    assert proc.returncode == 0 and "usage: gspn-diffusers" in proc.stdout
