"""The downcasting operator φ: how the frozen base Φ0 is stored during training.

Φ0 = clamp(W0 / s0 + z) is the pretrained weight in grid units. Keeping it in a compact
format is half of LR-QAT's memory saving (docs/METHOD.md §2). One small class per
format, registered by name in `PHI_FORMATS`; adding a format is one class:

- `fp32` / `bf16` / `fp16`: the float value, 4 or 2 bytes per weight;
- `fixed8`: one byte per weight with `8 - b` fractional bits. We store the offset
  `(Φ0 − qmin) · 2^(8−b)` as uint8, which holds the same information as the signed
  int8 of the paper and serves symmetric and asymmetric grids alike;
- `int`: only the rounded integers, packed two per byte when b ≤ 4.

Each format knows how to store Φ0, read it back, and form `Φ0 + c·A·B` in the
accumulator the LR-QAT layer rounds (`add_into`): the weight-sized pass of every step,
done in place and without a float copy of Φ0 where the format allows.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import torch

from lrqat.quantizer import pack_ints, unpack_ints

if TYPE_CHECKING:
    from lrqat.spec import QuantSpec


class PhiFormat:
    """A storage format of Φ0. Subclasses set `name` and override what differs."""

    name: ClassVar[str]

    def store(self, v: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
        """Φ0 in this format, from the clamped grid value `v` `(out, in)`."""
        raise NotImplementedError

    def load(self, stored: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
        """Φ0 read back as float32 grid values."""
        raise NotImplementedError

    def add_into(self, acc: torch.Tensor, stored: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
        """`round(Φ0 + acc)` in place in the float32 accumulator `acc = c·A·B`, unclamped."""
        return acc.add_(self.load(stored, spec)).round_()

    def bytes_per_weight(self, spec: QuantSpec) -> float:
        raise NotImplementedError

    def __repr__(self) -> str:
        return self.name


class FloatPhi(PhiFormat):
    """Φ0 kept as a float of `dtype` (fp32 is the paper's uncompressed reference)."""

    dtype: ClassVar[torch.dtype]

    def store(self, v: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
        return v.to(self.dtype).contiguous()

    def load(self, stored: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
        return stored.float()

    def add_into(self, acc: torch.Tensor, stored: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
        return acc.add_(stored).round_()  # mixed-dtype add in place: no float32 copy of Φ0

    def bytes_per_weight(self, spec: QuantSpec) -> float:
        return torch.finfo(self.dtype).bits / 8


class Fp32Phi(FloatPhi):
    name, dtype = "fp32", torch.float32


class Bf16Phi(FloatPhi):
    name, dtype = "bf16", torch.bfloat16


class Fp16Phi(FloatPhi):
    name, dtype = "fp16", torch.float16


def fractional_bits(spec: QuantSpec) -> int:
    """Fractional bits of `fixed8` at `spec.bits`: the byte's bits the integer part leaves."""
    return 8 - spec.bits


class Fixed8Phi(PhiFormat):
    """One byte per weight: `(Φ0 − qmin)` in fixed point with `8 − b` fractional bits."""

    name = "fixed8"

    def store(self, v: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
        unit = 2 ** fractional_bits(spec)
        return torch.round((v - spec.qmin) * unit).clamp(0, 255).to(torch.uint8)

    def load(self, stored: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
        return stored.float() / 2 ** fractional_bits(spec) + spec.qmin

    def add_into(self, acc: torch.Tensor, stored: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
        return acc.add_(stored, alpha=2.0 ** -fractional_bits(spec)).add_(spec.qmin).round_()

    def bytes_per_weight(self, spec: QuantSpec) -> float:
        return 1.0


class IntPhi(PhiFormat):
    """Only the rounded integers, packed. The update is rounded on its own:
    `Φ0 + round(c·A·B)` (the paper's φ = int variant)."""

    name = "int"

    def store(self, v: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
        return pack_ints(torch.round(v), spec)

    def load(self, stored: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
        return unpack_ints(stored, spec)

    def add_into(self, acc: torch.Tensor, stored: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
        return acc.round_().add_(self.load(stored, spec))

    def bytes_per_weight(self, spec: QuantSpec) -> float:
        return 0.5 if spec.bits <= 4 else 1.0


PHI_FORMATS: dict[str, PhiFormat] = {cls.name: cls() for cls in (Fp32Phi, Bf16Phi, Fp16Phi, Fixed8Phi, IntPhi)}


def phi_format(name: str) -> PhiFormat:
    """The registered format called `name`."""
    try:
        return PHI_FORMATS[name]
    except KeyError:
        raise ValueError(f"unknown phi format {name!r}: choose one of {', '.join(PHI_FORMATS)}") from None
