"""Names of the decoder's weight quantisations: one list for flags, fingerprints and the model (torch-free).

The scheme itself lives in `services/language_decoder/quantize.py`.
"""

from __future__ import annotations

NO_QUANTIZATION = "none"  # every weight in the compute dtype
INT8 = "int8"  # decoder-block linear weights as int8 with per-output-channel scales, weight-only
QUANTIZE_CHOICES = (NO_QUANTIZATION, INT8)


def check_quantize(mode: str) -> str:
    if mode not in QUANTIZE_CHOICES:
        raise ValueError(f"unknown weight quantisation {mode!r}; use one of {', '.join(QUANTIZE_CHOICES)}")
    return mode
