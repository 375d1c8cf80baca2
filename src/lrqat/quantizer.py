"""Quantizer primitives: pure tensor functions, no modules, no state.

Shapes follow one convention everywhere: a weight is `(out, in)`; its scales `s`
and zero points `z` are `(out, G)` with `G = in / g` groups (`G = 1` per channel).
Grouped arithmetic views the weight as `(out, G, g)` so nothing is repeated.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from lrqat.spec import QuantSpec


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round in the forward pass, identity gradient in the backward pass."""
    return x + (torch.round(x) - x).detach()


def group_size_of(spec: QuantSpec, in_features: int) -> int:
    return in_features if spec.group_size is None else spec.group_size


def grouped(w: torch.Tensor, g: int) -> torch.Tensor:
    """View `(out, in)` as `(out, in/g, g)`."""
    return w.reshape(w.shape[0], w.shape[1] // g, g)


def to_grid(w: torch.Tensor, s: torch.Tensor, z: torch.Tensor | None, spec: QuantSpec) -> torch.Tensor:
    """The weight measured in grid steps and clamped: `clamp(W / s + z)`, not rounded."""
    g = group_size_of(spec, w.shape[1])
    v = grouped(w.float(), g) / s.unsqueeze(-1)
    if z is not None:
        v = v + z.unsqueeze(-1)
    return v.clamp(spec.qmin, spec.qmax).reshape(w.shape)


def quantize(w: torch.Tensor, s: torch.Tensor, z: torch.Tensor | None, spec: QuantSpec) -> torch.Tensor:
    """Round-to-nearest integers on the grid (returned as float tensor holding integers)."""
    return torch.round(to_grid(w, s, z, spec))


def dequantize(q: torch.Tensor, s: torch.Tensor, z: torch.Tensor | None) -> torch.Tensor:
    """`s ⊙ (q − z)` with per-group broadcasting. Training and the merged layer both call
    this one function, which is what makes the merged model bit-exact."""
    return dequantize_(q.clone(), s, z)


def dequantize_(q: torch.Tensor, s: torch.Tensor, z: torch.Tensor | None) -> torch.Tensor:
    """`dequantize` in place, for a float `q` the caller no longer needs (the same
    operations in the same order: the same bits)."""
    qg = grouped(q, q.shape[1] // s.shape[1])
    if z is not None:
        qg.sub_(z.unsqueeze(-1))
    qg.mul_(s.unsqueeze(-1))
    return q


def fake_quant(w: torch.Tensor, s: torch.Tensor, z: torch.Tensor | None, spec: QuantSpec) -> torch.Tensor:
    """Quantize-dequantize with straight-through rounding (differentiable in w and s)."""
    g = group_size_of(spec, w.shape[1])
    v = grouped(w, g) / s.unsqueeze(-1)
    if z is not None:
        v = v + z.unsqueeze(-1)
    q = torch.clamp(round_ste(v), spec.qmin, spec.qmax)
    if z is not None:
        q = q - z.unsqueeze(-1)
    return (q * s.unsqueeze(-1)).reshape(w.shape)


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned codes in [0, 2^bits) into bytes: two per byte when bits <= 4.

    Layout: element 2k goes to the low nibble and 2k+1 to the high nibble of byte k,
    along the last dimension (which must be even for 4-bit packing).
    """
    codes = codes.to(torch.uint8)
    if bits > 4:
        return codes.contiguous()
    if codes.shape[-1] % 2:
        raise ValueError(f"4-bit packing needs an even last dimension, got {codes.shape[-1]}")
    low, high = codes[..., 0::2], codes[..., 1::2]
    return (low | (high << 4)).contiguous()


def unpack_codes(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of `pack_codes`: unsigned codes as uint8."""
    if bits > 4:
        return packed
    low = packed & 0x0F
    high = packed >> 4
    return torch.stack((low, high), dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)


def pack_ints(q: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Integers on the grid `[qmin, qmax]` → packed bytes (offset by `qmin`)."""
    return pack_codes((q - spec.qmin).round().to(torch.int16), spec.bits)


def unpack_ints(packed: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Packed bytes → integers on the grid, as float32."""
    return unpack_codes(packed, spec.bits).float() + spec.qmin
