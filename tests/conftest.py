"""Shared test helpers: the compiled backend, seeded generators, comparisons."""

from __future__ import annotations

import os

import pytest
import torch

from gspn_diffusers.ops import load_backend


def pytest_configure(config):
    torch.set_num_threads(min(torch.get_num_threads(), 2))


@pytest.fixture(scope="session")
def compiled_cpu():
    """Skips when the reference was forced; fails when the kernels should exist but do not."""
    if os.environ.get("GSPN_BACKEND", "auto") == "reference":
        pytest.skip("GSPN_BACKEND=reference: compiled kernels not under test")
    status = load_backend()
    assert status.cpu == "compiled", f"compiled CPU kernels unavailable: {status.reason}"
    return status


@pytest.fixture(scope="session")
def compiled_cuda(compiled_cpu):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    assert compiled_cpu.cuda == "compiled", f"compiled CUDA kernels unavailable: {compiled_cpu.reason}"
    return compiled_cpu
