"""The stage plan of high-resolution generation: which size each stage
denoises at, from how much noise, with how many steps.

Stage 0 generates at the base model's native pixel area with the target's
aspect ratio. Each later stage grows the image by about ``stage_growth`` per
side (2 by default; the first step takes the remainder) until the exact
target, and re-noises the upscaled previous result to a strength that falls
as the image grows: fine detail needs less noise than layout, and a high
strength at 8K would re-invent the layout the earlier stages fixed (the
published recipe: about 0.4 at 2K, down to 0.1-0.3 at 8K-16K).
"""

from __future__ import annotations

import dataclasses
import math
from typing import List, Optional, Sequence, Tuple


@dataclasses.dataclass
class Stage:
    """One stage: output size in pixels, strength (1.0 = from pure noise) and
    the nominal step count whose last ``strength`` share runs."""

    width: int
    height: int
    strength: float
    steps: int

    @property
    def denoising_steps(self) -> int:
        return max(1, min(self.steps, round(self.steps * self.strength)))


def default_strength(scale: float) -> float:
    """Re-noising strength for a stage whose side is ``scale`` x the native side:
    0.5 at 2x, 0.4 at 4x, 0.3 at 8x, 0.2 at 16x, 0.15 from 32x."""
    return float(min(0.6, max(0.15, 0.6 - 0.1 * math.log2(max(scale, 1.0)))))


def round_to_multiple(value: float, multiple: int) -> int:
    """Nearest positive multiple."""
    return max(multiple, int(round(value / multiple)) * multiple)


def plan_stages(
    width: int,
    height: int,
    native: int,
    multiple: int,
    num_inference_steps: int,
    stage_sizes: Optional[Sequence[Tuple[int, int]]] = None,
    stage_strengths: Optional[Sequence[float]] = None,
    stage_steps: Optional[Sequence[int]] = None,
    stage_growth: float = 2.0,
) -> List[Stage]:
    """The stages from the native size to ``width x height``, each about
    ``stage_growth`` x the previous side (fewer, larger steps mean fewer VAE
    round trips with pixel-space upscaling).

    Raises ValueError for a target smaller than the native area, a growth of
    at most 1, or overrides of the wrong length; sizes must already be
    multiples of ``multiple``.
    """
    if not stage_growth > 1:
        raise ValueError(f"stage_growth={stage_growth} must be > 1 (2 doubles the side at each stage)")
    if width * height < native * native * 0.99 and not stage_sizes:
        raise ValueError(
            f"target {width}x{height} is smaller than the base model's native {native}x{native}: "
            "use the base pipeline for it (this pipeline only grows images)"
        )
    if stage_sizes:
        sizes = [tuple(int(v) for v in s) for s in stage_sizes]
        if sizes[-1] != (width, height):
            sizes.append((width, height))
    else:
        aspect = width / height
        base = (round_to_multiple(native * math.sqrt(aspect), multiple),
                round_to_multiple(native / math.sqrt(aspect), multiple))
        growth = max(width / base[0], height / base[1])
        count = max(0, math.ceil(math.log(growth, stage_growth) - 0.1)) if growth > 1.05 else 0
        shrink = [stage_growth ** (count - k) for k in range(count)]
        sizes = [(round_to_multiple(width / f, multiple), round_to_multiple(height / f, multiple)) for f in shrink]
        sizes = [base] + [s for s in sizes if s[0] > base[0] or s[1] > base[1]] + [(width, height)]
        if len(sizes) >= 2 and sizes[0] == sizes[1]:
            sizes = sizes[1:]
    for name, values in (("stage_strengths", stage_strengths), ("stage_steps", stage_steps)):
        if values is not None and len(values) != len(sizes):
            raise ValueError(f"{name} has {len(values)} entries for {len(sizes)} stages {sizes}")
    stages = []
    for k, (w, h) in enumerate(sizes):
        if w % multiple or h % multiple:
            raise ValueError(f"stage size {w}x{h} is not a multiple of {multiple}")
        scale = math.sqrt(w * h) / native
        strength = 1.0 if k == 0 else default_strength(scale)
        if stage_strengths is not None:
            strength = float(stage_strengths[k])
        if not 0 < strength <= 1:
            raise ValueError(f"stage {k} strength {strength} must be in (0, 1]")
        steps = int(stage_steps[k]) if stage_steps is not None else num_inference_steps
        stages.append(Stage(w, h, strength, steps))
    return stages
