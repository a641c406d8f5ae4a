"""Shared test helpers: the compiled backend, seeded generators, comparisons."""

from __future__ import annotations

import os

import pytest
import torch

from gspn_diffusers.ops import load_backend


def pytest_configure(config):
    # Several xdist workers on few cores: more threads than cores makes
    # OpenMP's spin-waiting workers starve each other (tests ran 30x slower).
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    threads = max(1, min(torch.get_num_threads(), (os.cpu_count() or 1) // workers))
    torch.set_num_threads(threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))  # for the subprocesses tests start


@pytest.fixture(scope="session")
def compiled_cpu():
    """Skips when the reference was forced; fails when the kernels should exist but do not."""
    if os.environ.get("GSPN_BACKEND", "auto") == "reference":
        pytest.skip("GSPN_BACKEND=reference: compiled kernels not under test")
    status = load_backend()
    assert status.cpu == "compiled", f"compiled CPU kernels unavailable: {status.reason}"
    # Under GSPN_CUDA_SIM=1 the CPU tests are there to exercise the CUDA kernels.
    assert status.cuda_sim == (os.environ.get("GSPN_CUDA_SIM") == "1"), status
    return status


@pytest.fixture(scope="session")
def compiled_cuda(compiled_cpu):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    assert compiled_cpu.cuda == "compiled", f"compiled CUDA kernels unavailable: {compiled_cpu.reason}"
    return compiled_cpu
