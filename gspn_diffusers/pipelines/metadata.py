"""Generation settings stored in PNG text chunks, so an image says how it was made."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Union


def save_png(image, path: Union[str, Path], metadata: Dict[str, Any]) -> Path:
    """Save a PIL image as PNG with one text chunk per metadata key
    (strings as they are, anything else as JSON)."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for key, value in metadata.items():
        info.add_text(key, value if isinstance(value, str) else json.dumps(value))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, pnginfo=info)
    return path


def read_png_metadata(path: Union[str, Path]) -> Dict[str, Any]:
    """The text chunks of a PNG, JSON values decoded."""
    from PIL import Image

    with Image.open(path) as image:
        text = dict(image.text)
    out = {}
    for key, value in text.items():
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out
