"""Timing shared by the benchmark scripts."""

from __future__ import annotations

import statistics
import time

import torch


def median_ms(device: torch.device, fn, repeats: int, warmup: int = 1) -> float:
    """Median milliseconds of ``fn()`` after ``warmup`` calls; CUDA events on a GPU."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            samples.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples)
