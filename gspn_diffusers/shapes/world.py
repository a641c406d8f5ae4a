"""A procedural world of captioned images whose content can be checked.

One to three objects (a shape in a colour) on a dark plain or textured
background, each in its own cell of a 3x3 grid, with a caption such as "a red
circle at the top left and a blue square at the bottom right". Everything is a
function of an integer seed: training data is unlimited, and the held-out set
(:func:`held_out_scenes`) comes from a seed range training never uses.
"""

from __future__ import annotations

import dataclasses
import random
from typing import Dict, List, Sequence, Tuple

import numpy as np

COLOURS: Dict[str, Tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 190, 60),
    "blue": (50, 80, 230),
    "yellow": (235, 215, 40),
    "magenta": (210, 50, 210),
    "cyan": (40, 210, 220),
    "orange": (245, 140, 30),
    "white": (240, 240, 240),
}
SHAPES = ("circle", "square", "triangle")
# Grid cells (row, column) and how captions name them.
POSITIONS: Dict[Tuple[int, int], str] = {
    (0, 0): "at the top left", (0, 1): "at the top", (0, 2): "at the top right",
    (1, 0): "at the left", (1, 1): "in the center", (1, 2): "at the right",
    (2, 0): "at the bottom left", (2, 1): "at the bottom", (2, 2): "at the bottom right",
}
WORDS = sorted({w for phrase in POSITIONS.values() for w in phrase.split()}
               | set(COLOURS) | set(SHAPES) | {"a", "and"})
HELD_OUT_SEED_OFFSET = 10**9  # training seeds stay below this


@dataclasses.dataclass(frozen=True)
class ShapeObject:
    colour: str
    shape: str
    cell: Tuple[int, int]

    def phrase(self) -> str:
        return f"a {self.colour} {self.shape} {POSITIONS[self.cell]}"


@dataclasses.dataclass(frozen=True)
class Scene:
    objects: Tuple[ShapeObject, ...]
    background: Tuple[int, int, int]
    texture: bool
    seed: int

    @property
    def caption(self) -> str:
        return " and ".join(o.phrase() for o in self.objects)


def sample_scene(seed: int) -> Scene:
    """The scene of ``seed``: 1-3 objects in distinct cells, in reading order."""
    rng = random.Random(seed)
    count = rng.choice((1, 2, 3))
    cells = sorted(rng.sample(sorted(POSITIONS), count))
    objects = tuple(ShapeObject(rng.choice(sorted(COLOURS)), rng.choice(SHAPES), cell) for cell in cells)
    shade = rng.randint(10, 50)
    background = (shade, shade, shade + rng.randint(0, 15))
    return Scene(objects, background, rng.random() < 0.5, seed)


def held_out_scenes(count: int) -> List[Scene]:
    """Scenes from seeds training never uses."""
    return [sample_scene(HELD_OUT_SEED_OFFSET + i) for i in range(count)]


def _shape_mask(shape: str, size: int, cy: float, cx: float, radius: float) -> np.ndarray:
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    if shape == "circle":
        return (y - cy) ** 2 + (x - cx) ** 2 <= radius ** 2
    if shape == "square":
        half = radius * 0.9
        return (np.abs(y - cy) <= half) & (np.abs(x - cx) <= half)
    # isosceles triangle pointing up, apex at the top
    top, bottom = cy - radius, cy + radius * 0.9
    t = np.clip((y - top) / (bottom - top), 0, 1)
    return (y >= top) & (y <= bottom) & (np.abs(x - cx) <= t * radius)


def render(scene: Scene, size: int = 64) -> np.ndarray:
    """The scene as an (size, size, 3) uint8 RGB array."""
    rng = np.random.default_rng(scene.seed)
    image = np.empty((size, size, 3), dtype=np.float32)
    image[:] = scene.background
    if scene.texture:
        image += rng.normal(0, 6, size=(size, size, 1)).astype(np.float32)
    cell = size / 3
    for obj in scene.objects:
        row, col = obj.cell
        jitter = rng.uniform(-0.12, 0.12, size=2) * cell
        radius = rng.uniform(0.28, 0.38) * cell
        cy, cx = (row + 0.5) * cell + jitter[0], (col + 0.5) * cell + jitter[1]
        image[_shape_mask(obj.shape, size, cy, cx, radius)] = COLOURS[obj.colour]
    return np.clip(image, 0, 255).astype(np.uint8)


def parse_caption(caption: str) -> List[ShapeObject]:
    """The objects a caption asks for (inverse of :attr:`Scene.caption`)."""
    by_phrase = {phrase: cell for cell, phrase in POSITIONS.items()}
    objects = []
    for part in caption.split(" and "):
        words = part.split()
        if len(words) < 4 or words[0] != "a" or words[1] not in COLOURS or words[2] not in SHAPES:
            raise ValueError(f"not a shapes-world phrase: {part!r}")
        where = " ".join(words[3:])
        if where not in by_phrase:
            raise ValueError(f"unknown position {where!r} in {part!r}")
        objects.append(ShapeObject(words[1], words[2], by_phrase[where]))
    return objects


def batch(seeds: Sequence[int], size: int = 64) -> Tuple[np.ndarray, List[str]]:
    """Images (N, size, size, 3) uint8 and captions of the given seeds."""
    scenes = [sample_scene(s) for s in seeds]
    return np.stack([render(s, size) for s in scenes]), [s.caption for s in scenes]
