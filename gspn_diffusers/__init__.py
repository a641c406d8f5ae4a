"""gspn-diffusers: GSPN linear-time spatial propagation for diffusers.

The operator lives in :mod:`gspn_diffusers.ops` (``gspn_scan``,
``gspn_scan_4dir``, ``normalize_gates``).
"""

__version__ = "0.1.0.dev0"
