"""What the benchmark scripts share: timing and writing results."""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

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


def save_json(path: Path, results: dict) -> None:
    """Write the results (creating the folder) and say where."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1))
    print(f"wrote {path}")
