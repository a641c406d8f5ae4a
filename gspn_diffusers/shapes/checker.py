"""Reads a shapes-world image back and scores it against its caption.

Colour segmentation against the palette, connected components, a shape from
which corners of its bounding box a component fills once its holes are filled
(a square all four, a triangle - apex up - the bottom two, a circle none), and
a grid cell from its centroid. Works at any resolution: images are first
resampled to a canonical size.
"""

from __future__ import annotations

import dataclasses
from collections import Counter, deque
from typing import Dict, List, Sequence

import numpy as np

from .world import COLOURS, ShapeObject, parse_caption

CANONICAL = 96
MIN_AREA = 40  # pixels at the canonical size; smaller blobs are noise
MAX_COLOUR_DISTANCE = 75.0


@dataclasses.dataclass(frozen=True)
class Detection:
    colour: str
    shape: str
    cell: tuple
    area: int


@dataclasses.dataclass(frozen=True)
class Score:
    """How an image matches its caption."""

    correct: bool  # every object right (colour, shape, cell) and nothing else
    count: bool
    colours: bool
    shapes: bool
    positions: bool
    duplicates: int  # detections beyond the caption's count of the same colour and shape


def _resample(image: np.ndarray) -> np.ndarray:
    from PIL import Image

    if image.shape[0] == CANONICAL and image.shape[1] == CANONICAL:
        return image
    return np.asarray(Image.fromarray(image).resize((CANONICAL, CANONICAL), Image.BOX))


def _components(mask: np.ndarray) -> List[np.ndarray]:
    """Pixel coordinates (K, 2) of each 4-connected component of ``mask``."""
    seen = np.zeros_like(mask, dtype=bool)
    height, width = mask.shape
    found = []
    for y0, x0 in zip(*np.nonzero(mask)):
        if seen[y0, x0]:
            continue
        queue, pixels = deque([(y0, x0)]), []
        seen[y0, x0] = True
        while queue:
            y, x = queue.popleft()
            pixels.append((y, x))
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < height and 0 <= nx < width and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    queue.append((ny, nx))
        found.append(np.array(pixels))
    return found


def _fill_holes(mask: np.ndarray) -> np.ndarray:
    """``mask`` with every background region it encloses set."""
    padded = np.pad(mask, 1)
    outside = np.zeros_like(padded)
    for region in _components(~padded):
        if (region == 0).any():  # touches the padding ring, so not enclosed
            outside[region[:, 0], region[:, 1]] = True
    return ~outside[1:-1, 1:-1]


def _corner_fill(box: np.ndarray, fraction: float = 0.2):
    """Mean fill of the two top and the two bottom corner patches of ``box``
    (each ``fraction`` of its height and width)."""
    a, b = max(1, round(box.shape[0] * fraction)), max(1, round(box.shape[1] * fraction))
    top = (box[:a, :b].mean() + box[:a, -b:].mean()) / 2
    bottom = (box[-a:, :b].mean() + box[-a:, -b:].mean()) / 2
    return float(top), float(bottom)


def _classify(pixels: np.ndarray) -> str:
    (y0, x0), (y1, x1) = pixels.min(0), pixels.max(0)
    box = np.zeros((y1 - y0 + 1, x1 - x0 + 1), dtype=bool)
    box[pixels[:, 0] - y0, pixels[:, 1] - x0] = True
    # Holes filled: a generated object's texture (darker strokes, a highlight
    # off the palette) punches holes that would make a square read as a circle.
    # Corners, not the fill of the whole box: generated squares often have
    # pinched sides (box fill 0.80-0.88, where a circle's is 0.70-0.82) but
    # full corners. On 96 held-out prompts of the embedded teacher (seeds
    # 200-295, not the benchmark's), corner patches filled 0.64-0.95 (10th-90th
    # percentile) for squares, 0.03-0.24 for circles; triangles' top corners
    # stay empty. Misread objects: 31 of 191 by box fill, 2 by corners.
    top, bottom = _corner_fill(_fill_holes(box))
    if top < 0.3 and bottom - top > 0.4:
        return "triangle"
    return "square" if (top + bottom) / 2 > 0.45 else "circle"


def detect(image: np.ndarray) -> List[Detection]:
    """The objects in an (H, W, 3) uint8 image."""
    image = _resample(np.asarray(image, dtype=np.uint8)).astype(np.float32)
    names = list(COLOURS)
    palette = np.array([COLOURS[n] for n in names], dtype=np.float32)
    distance = np.linalg.norm(image[:, :, None, :] - palette[None, None], axis=-1)
    nearest = distance.argmin(-1)
    close = distance.min(-1) < MAX_COLOUR_DISTANCE
    cell = CANONICAL / 3
    found = []
    for index, name in enumerate(names):
        for pixels in _components(close & (nearest == index)):
            if len(pixels) < MIN_AREA:
                continue
            cy, cx = pixels.mean(0) + 0.5
            grid = (min(2, int(cy // cell)), min(2, int(cx // cell)))
            found.append(Detection(name, _classify(pixels), grid, len(pixels)))
    return found


def score(image: np.ndarray, caption: str) -> Score:
    """Compare what is in ``image`` with what ``caption`` asks for."""
    wanted: List[ShapeObject] = parse_caption(caption)
    got = detect(image)
    want_keys = Counter((o.colour, o.shape, o.cell) for o in wanted)
    got_keys = Counter((d.colour, d.shape, d.cell) for d in got)
    kinds_wanted = Counter((o.colour, o.shape) for o in wanted)
    kinds_got = Counter((d.colour, d.shape) for d in got)
    return Score(
        correct=want_keys == got_keys,
        count=len(got) == len(wanted),
        colours=Counter(o.colour for o in wanted) == Counter(d.colour for d in got),
        shapes=Counter(o.shape for o in wanted) == Counter(d.shape for d in got),
        positions=Counter(o.cell for o in wanted) == Counter(d.cell for d in got),
        duplicates=sum(max(0, n - kinds_wanted.get(k, 0)) for k, n in kinds_got.items() if k in kinds_wanted),
    )


def adherence(images: Sequence[np.ndarray], captions: Sequence[str]) -> Dict[str, float]:
    """Fractions of images fully correct and right in each aspect, and the mean
    number of duplicated objects per image."""
    scores = [score(i, c) for i, c in zip(images, captions)]
    n = max(1, len(scores))
    return {
        "correct": sum(s.correct for s in scores) / n,
        "count": sum(s.count for s in scores) / n,
        "colours": sum(s.colours for s in scores) / n,
        "shapes": sum(s.shapes for s in scores) / n,
        "positions": sum(s.positions for s in scores) / n,
        "duplicates_per_image": sum(s.duplicates for s in scores) / n,
    }
