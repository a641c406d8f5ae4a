"""Training prompts of the shapes world (captions of training-range seeds).

    python -m gspn_diffusers.shapes.prompts --count 512 --out prompts.txt
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import List, Optional, Sequence

from .world import sample_scene


def training_prompts(count: int, offset: int = 5_000_000) -> List[str]:
    """``count`` distinct captions from training seeds (never the held-out range)."""
    seen, out, seed = set(), [], offset
    while len(out) < count:
        caption = sample_scene(seed).caption
        if caption not in seen:
            seen.add(caption)
            out.append(caption)
        seed += 1
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Write one prompt per line."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--count", type=int, default=512)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(training_prompts(args.count)) + "\n")
    print(f"wrote {args.count} prompts to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
