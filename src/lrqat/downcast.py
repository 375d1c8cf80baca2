"""The downcasting operator φ: how the frozen base Φ0 is stored during training.

Φ0 = clamp(W0 / s0 + z) is the pretrained weight in grid units. Keeping it in a compact
format is half of LR-QAT's memory saving (METHOD.md §2):

- `fp32` / `bf16` / `fp16`: the float value, 4 or 2 bytes per weight;
- `fixed8`: one byte per weight with `8 - b` fractional bits. We store the offset
  `(Φ0 − qmin) · 2^(8−b)` as uint8, which holds the same information as the signed
  int8 of the paper and serves symmetric and asymmetric grids alike;
- `int`: only the rounded integers, packed two per byte when b ≤ 4.
"""

from __future__ import annotations

import torch

from lrqat.quantizer import pack_ints, unpack_ints
from lrqat.spec import QuantSpec

_FLOAT_FORMATS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def fractional_bits(spec: QuantSpec) -> int:
    return 8 - spec.bits


def downcast(v: torch.Tensor, phi: str, spec: QuantSpec) -> torch.Tensor:
    """Store the clamped grid value `v` (shape `(out, in)`) in format `phi`."""
    if phi in _FLOAT_FORMATS:
        return v.to(_FLOAT_FORMATS[phi]).contiguous()
    if phi == "fixed8":
        unit = 2 ** fractional_bits(spec)
        return torch.round((v - spec.qmin) * unit).clamp(0, 255).to(torch.uint8)
    if phi == "int":
        return pack_ints(torch.round(v), spec)
    raise ValueError(f"unknown phi format {phi!r}")


def upcast(stored: torch.Tensor, phi: str, spec: QuantSpec) -> torch.Tensor:
    """Read Φ0 back as float32 grid values."""
    if phi in _FLOAT_FORMATS:
        return stored.float()
    if phi == "fixed8":
        return stored.float() / 2 ** fractional_bits(spec) + spec.qmin
    if phi == "int":
        return unpack_ints(stored, spec)
    raise ValueError(f"unknown phi format {phi!r}")


def bytes_per_weight(phi: str, spec: QuantSpec) -> float:
    if phi in _FLOAT_FORMATS:
        return torch.finfo(_FLOAT_FORMATS[phi]).bits / 8
    if phi == "int" and spec.bits <= 4:
        return 0.5
    return 1.0
