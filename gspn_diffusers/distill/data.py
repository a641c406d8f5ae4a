"""Training data for distillation: prompts and captioned images in, cached
latents and text embeddings out, and a batch sampler whose randomness is a
pure function of (seed, step, micro-step, process) so a resumed run draws
exactly the batches an uninterrupted one would.

Latents come from one of three sources, all cached under
``<output_dir>/cache`` and reused on resume:

- data-free ``trajectory`` (default): the teacher itself generates a latent
  per prompt (``--teacher_steps``, CFG ``--teacher_guidance_scale``); training
  re-noises it at random timesteps, i.e. the student learns on the teacher's
  own sampling distribution;
- data-free ``noise``: no generation; samples are pure noise at random
  timesteps (cheapest, least faithful at low noise levels);
- images: VAE-encoded captioned images (a folder, or a datasets folder).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import zlib
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from safetensors.torch import load_file, save_file

from .config import IMAGE_SUFFIXES


@dataclasses.dataclass
class Bucket:
    """Latents of one training size: ``latents`` (N, C, h, w) or None for pure
    noise, and the prompt index of each."""

    width: int
    height: int
    prompt_ids: torch.Tensor
    latents: Optional[torch.Tensor] = None


@dataclasses.dataclass
class TrainingData:
    prompts: List[str]
    embeds: Dict[str, torch.Tensor]  # per prompt, row i = prompts[i]; the empty prompt is the last row
    buckets: List[Bucket]
    has_images: bool

    @property
    def num_samples(self) -> int:
        return sum(len(b.prompt_ids) for b in self.buckets)


def read_captioned_images(folder: Path, image_column: str = "image", caption_column: str = "text"):
    """``[(PIL image, caption)]`` from a folder of images with same-name .txt
    captions or a metadata.jsonl, or from a datasets folder (save_to_disk)."""
    from PIL import Image

    if (folder / "dataset_info.json").exists() or (folder / "state.json").exists():
        try:
            import datasets
        except ImportError as exc:
            raise SystemExit(f"{folder} is a datasets folder: `pip install datasets` to read it") from exc
        ds = datasets.load_from_disk(str(folder))
        missing = {image_column, caption_column} - set(ds.column_names)
        if missing:
            raise SystemExit(f"{folder}: no column(s) {sorted(missing)}; columns are {ds.column_names}")
        return [(row[image_column].convert("RGB"), str(row[caption_column])) for row in ds]
    captions: Dict[str, str] = {}
    meta = folder / "metadata.jsonl"
    if meta.exists():
        for line in meta.read_text().splitlines():
            if line.strip():
                entry = json.loads(line)
                captions[entry["file_name"]] = str(entry.get(caption_column, entry.get("text", "")))
    items = []
    for path in sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
        caption = captions.get(path.name)
        if caption is None and path.with_suffix(".txt").exists():
            caption = path.with_suffix(".txt").read_text().strip()
        if caption is None:
            raise SystemExit(f"{path}: no caption (add {path.with_suffix('.txt').name} or a metadata.jsonl entry)")
        items.append((Image.open(path).convert("RGB"), caption))
    if not items:
        raise SystemExit(f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)})")
    return items


def fit_image(image, width: int, height: int) -> torch.Tensor:
    """Resize to cover (width, height), centre-crop, to a (3, h, w) tensor in [-1, 1]."""
    import numpy as np
    from PIL import Image

    scale = max(width / image.width, height / image.height)
    size = (max(width, round(image.width * scale)), max(height, round(image.height * scale)))
    image = image.resize(size, Image.BICUBIC)
    left, top = (image.width - width) // 2, (image.height - height) // 2
    image = image.crop((left, top, left + width, top + height))
    array = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0)
    return array.permute(2, 0, 1)


def nearest_bucket(image, sizes: Sequence[Tuple[int, int]]) -> int:
    """Index of the training size closest to the image: aspect ratio first,
    then, among sizes of that aspect, pixel count (so 64 and 128 px squares
    are two buckets, not one)."""
    import math

    aspect = math.log(image.width / image.height)
    area = math.log(image.width * image.height)
    return min(range(len(sizes)), key=lambda i: (round(abs(math.log(sizes[i][0] / sizes[i][1]) - aspect), 6),
                                                 abs(math.log(sizes[i][0] * sizes[i][1]) - area)))


def cache_key(args, model_fingerprint: str) -> str:
    """What the cached latents and embeddings depend on."""
    fields = {
        "model": model_fingerprint,
        "prompts": getattr(args, "prompts", None),
        "train_data_dir": args.train_data_dir,
        "resolutions": args.resolutions,
        "data_free_latents": args.data_free_latents,
        "teacher_steps": args.teacher_steps,
        "teacher_guidance_scale": args.teacher_guidance_scale,
        "num_teacher_latents": args.num_teacher_latents,
        "seed": args.seed,
    }
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:16]


def save_cache(folder: Path, key: str, data: TrainingData) -> None:
    """Write the data to ``folder`` (safetensors + JSON), atomically enough for a resume."""
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {f"embeds.{k}": v.contiguous() for k, v in data.embeds.items()}
    for i, b in enumerate(data.buckets):
        tensors[f"bucket{i}.prompt_ids"] = b.prompt_ids.contiguous()
        if b.latents is not None:
            tensors[f"bucket{i}.latents"] = b.latents.contiguous()
    save_file(tensors, str(folder / "data.safetensors"))
    meta = {"key": key, "prompts": data.prompts, "has_images": data.has_images,
            "buckets": [[b.width, b.height] for b in data.buckets]}
    (folder / "data.json.tmp").write_text(json.dumps(meta))
    (folder / "data.json.tmp").replace(folder / "data.json")


def load_cache(folder: Path, key: str) -> Optional[TrainingData]:
    """The cached data if it was made for ``key``, else None."""
    try:
        meta = json.loads((folder / "data.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if meta.get("key") != key:
        return None
    tensors = load_file(str(folder / "data.safetensors"))
    buckets = [
        Bucket(w, h, tensors[f"bucket{i}.prompt_ids"], tensors.get(f"bucket{i}.latents"))
        for i, (w, h) in enumerate(meta["buckets"])
    ]
    embeds = {k[len("embeds."):]: v for k, v in tensors.items() if k.startswith("embeds.")}
    return TrainingData(meta["prompts"], embeds, buckets, meta["has_images"])


def _seeded(*key) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


@dataclasses.dataclass
class Batch:
    bucket: Bucket
    prompt_rows: torch.Tensor  # rows into TrainingData.embeds (the last row: empty prompt)
    latents: Optional[torch.Tensor]  # clean latents, or None (pure-noise mode)
    noise: torch.Tensor
    timesteps: torch.Tensor


def sample_batch(data: TrainingData, batch_size: int, latent_shape, num_timesteps: int, seed: int, step: int,
                 micro: int, rank: int, uncond_prob: float) -> Batch:
    """The batch of (step, micro-step) for process ``rank``.

    The bucket depends on (seed, step, micro) only, so all processes train the
    same size at once; samples, noise and timesteps also depend on the rank,
    so each process sees different data."""
    sizes = torch.tensor([len(b.prompt_ids) for b in data.buckets], dtype=torch.float64)
    bucket = data.buckets[int(torch.multinomial(sizes, 1, generator=_seeded(seed, step, micro)))]
    gen = _seeded(seed, step, micro, rank)
    idx = torch.randint(len(bucket.prompt_ids), (batch_size,), generator=gen)
    rows = bucket.prompt_ids[idx].clone()
    rows[torch.rand(batch_size, generator=gen) < uncond_prob] = len(data.prompts)  # empty prompt
    channels, factor = latent_shape
    shape = (batch_size, channels, bucket.height // factor, bucket.width // factor)
    noise = torch.randn(shape, generator=gen)
    timesteps = torch.randint(0, num_timesteps, (batch_size,), generator=gen)
    latents = bucket.latents[idx] if bucket.latents is not None else None
    return Batch(bucket, rows, latents, noise, timesteps)


def image_files(folder: Path) -> List[Path]:
    """The image files of a folder (for argument checks)."""
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
