"""gspn-diffusers: GSPN linear-time spatial propagation for diffusers.

- :func:`apply_gspn` / :func:`remove_gspn`: swap a pipeline's self-attention
  for GSPN layers and back.
- :func:`save_gspn_adapter`: GSPN weights as an adapter folder that
  ``apply_gspn(pipe, adapter=...)`` loads.
- :mod:`gspn_diffusers.ops`: the scan operator (``gspn_scan``, ``gspn_scan_4dir``).

Names are imported on first use, so ``gspn_diffusers.ops`` works (and loads
fast) without diffusers installed.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0.dev0"

_EXPORTS = {
    "AdapterError": "adapter",
    "GSPNHighResPipeline": "pipelines",
    "GSPNLayer": "layer",
    "GSPNOptions": "integration",
    "UnsupportedModelError": "integration",
    "apply_gspn": "integration",
    "gspn_layers": "integration",
    "remove_gspn": "integration",
    "save_gspn_adapter": "integration",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
