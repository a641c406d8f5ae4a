"""The GSPN adapter file format: a folder with

- ``gspn_adapter.safetensors``: the weights of every GSPN layer, keyed
  ``<attention module name>.<parameter name>``;
- ``gspn_adapter.json``: the options the layers were built with and the layer
  layout of the base model they belong to (names and channel widths), which is
  checked before anything is loaded.

Weights are read with safetensors only: nothing is ever unpickled. This module
knows files, not models; :mod:`gspn_diffusers.integration` applies them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Tuple, Union

import torch
from safetensors.torch import load_file, save_file

WEIGHTS_NAME = "gspn_adapter.safetensors"
CONFIG_NAME = "gspn_adapter.json"
FORMAT = "gspn-diffusers-adapter"
FORMAT_VERSION = 1


class AdapterError(ValueError):
    """An adapter is missing, malformed, or made for a different base model."""


def resolve_adapter(adapter: Union[str, Path]) -> Path:
    """A local adapter folder, or a Hugging Face Hub repo id downloaded to the cache."""
    path = Path(adapter).expanduser()
    if path.is_dir():
        if not (path / CONFIG_NAME).is_file() or not (path / WEIGHTS_NAME).is_file():
            raise AdapterError(f"{path} is not a GSPN adapter folder: it needs {CONFIG_NAME} and {WEIGHTS_NAME}")
        return path
    if path.exists() or str(adapter).count("/") != 1:
        raise AdapterError(f"adapter {str(adapter)!r} is neither an adapter folder nor a Hub repo id (owner/name)")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(str(adapter), allow_patterns=[CONFIG_NAME, WEIGHTS_NAME]))
    except Exception as exc:  # offline, missing repo, no permission
        raise AdapterError(f"could not fetch GSPN adapter {str(adapter)!r} from the Hub: {exc}") from exc


def write_adapter(path: Union[str, Path], config: Dict[str, Any], tensors: Dict[str, torch.Tensor]) -> Path:
    """Write the adapter folder; returns its path."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    payload = {"format": FORMAT, "version": FORMAT_VERSION, **config}
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(path / WEIGHTS_NAME))
    (path / CONFIG_NAME).write_text(json.dumps(payload, indent=2) + "\n")
    return path


def read_adapter(adapter: Union[str, Path]) -> Tuple[Dict[str, Any], Dict[str, torch.Tensor]]:
    """``(config, tensors)`` of an adapter folder or Hub repo id."""
    path = resolve_adapter(adapter)
    try:
        config = json.loads((path / CONFIG_NAME).read_text())
    except json.JSONDecodeError as exc:
        raise AdapterError(f"{path / CONFIG_NAME} is not valid JSON: {exc}") from exc
    if config.get("format") != FORMAT:
        raise AdapterError(f"{path / CONFIG_NAME} is not a GSPN adapter config (format={config.get('format')!r})")
    if config.get("version", 0) > FORMAT_VERSION:
        raise AdapterError(
            f"{path} uses adapter format version {config['version']}; this gspn-diffusers reads up to "
            f"{FORMAT_VERSION}. Fix: upgrade gspn-diffusers"
        )
    return config, load_file(str(path / WEIGHTS_NAME))
