"""Quantized linear layers: `LRQATLinear` (the method) and `QuantLinear` (its merge).

`LRQATLinear` holds the frozen base Φ0 in its φ storage format and the trainable
`A`, `B`, `s`; its forward pass follows METHOD.md §4. The quantized weight Ŵ is never
kept for the backward pass: a custom autograd function saves only the input and the
small trainable tensors and recomputes Ŵ from them when gradients are needed (§5).

`QuantLinear` is the deployed layer: packed integers, scales (and zero points).
`LRQATLinear.merge()` produces one that computes bit for bit what training computed.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from lrqat.downcast import downcast, upcast
from lrqat.ptq import init_params
from lrqat.quantizer import dequantize, fake_quant, pack_ints, quantize, round_ste, to_grid, unpack_ints
from lrqat.spec import LRQATSpec, QuantSpec


class _RecomputedWeightLinear(torch.autograd.Function):
    """`y = x · weight_fn(*params)ᵀ + bias`, storing `params` instead of the weight.

    The backward pass rebuilds the weight under autograd (one layer at a time, so the
    full-size temporaries live only briefly) and pushes `dL/dŴ = gᵀ x` through it.
    """

    @staticmethod
    def forward(ctx, x, weight_fn, bias, *params):
        with torch.no_grad():
            weight = weight_fn(*params).to(x.dtype)
        ctx.weight_fn = weight_fn
        ctx.save_for_backward(x, *params)
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_out):
        x, *params = ctx.saved_tensors
        needs = ctx.needs_input_grad[3:]
        with torch.enable_grad():
            leaves = [p.detach().requires_grad_(n) for p, n in zip(params, needs)]
            weight = ctx.weight_fn(*leaves)
        grad_x = grad_out @ weight.to(grad_out.dtype) if ctx.needs_input_grad[0] else None
        grad_w = grad_out.reshape(-1, grad_out.shape[-1]).t() @ x.reshape(-1, x.shape[-1])
        wanted = [leaf for leaf in leaves if leaf.requires_grad]
        found = iter(torch.autograd.grad(weight, wanted, grad_w.to(weight.dtype)) if wanted else ())
        grads = [next(found) if leaf.requires_grad else None for leaf in leaves]
        return (grad_x, None, None, *grads)


def lowrank_factors(
    out_features: int, in_features: int, rank: int, generator: torch.Generator | None
) -> tuple[nn.Parameter, nn.Parameter]:
    """`A = 0` `(out, r)` and `B ~ U(±1/√in)` `(r, in)`: the product starts at zero, so
    step 0 is exactly the model the adapter was added to."""
    bound = 1.0 / math.sqrt(in_features)
    B = torch.rand(rank, in_features, generator=generator) * 2 * bound - bound
    return nn.Parameter(torch.zeros(out_features, rank)), nn.Parameter(B)


class QuantLinear(nn.Module):
    """An integer linear layer: `y = x · (s ⊙ (q − z))ᵀ + bias`, dequantized on the fly.

    Stores `qweight` as packed unsigned codes (`q − qmin`, two per byte for b ≤ 4),
    `scales` `(out, G)` and, for asymmetric grids, integer-valued `zeros` `(out, G)`.
    """

    def __init__(
        self,
        spec: QuantSpec,
        q: torch.Tensor,
        scales: torch.Tensor,
        zeros: torch.Tensor | None,
        bias: torch.Tensor | None,
    ) -> None:
        super().__init__()
        self.spec = spec
        self.out_features, self.in_features = q.shape
        self.register_buffer("qweight", pack_ints(q, spec))
        self.register_buffer("scales", scales.detach().float().clone())
        self.register_buffer("zeros", None if zeros is None else zeros.detach().float().clone())
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        spec: QuantSpec,
        scales: torch.Tensor | None = None,
        zeros: torch.Tensor | None = None,
        q: torch.Tensor | None = None,
    ) -> QuantLinear:
        """Round-to-nearest quantization of a float layer (the RTN baseline).

        `scales`/`zeros` default to the range init of `spec`; `q` (integers chosen by
        another algorithm such as GPTQ) defaults to rounding `W / s + z`.
        """
        w = linear.weight.detach().float()
        if scales is None:
            scales, zeros = init_params(w, spec)
        if q is None:
            q = quantize(w, scales, zeros, spec)
        return cls(spec, q, scales, zeros, linear.bias)

    def int_weight(self) -> torch.Tensor:
        """The integers on the grid, as float32."""
        return unpack_ints(self.qweight, self.spec)

    def weight(self) -> torch.Tensor:
        return dequantize(self.int_weight(), self.scales, self.zeros)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight().to(x.dtype), self.bias)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, {self.spec.describe()}"


class LRQATLinear(nn.Module):
    """A linear layer trained with LR-QAT (METHOD.md §2–6).

    Frozen: `phi` (Φ0 in its storage format), `zeros`, `bias`.
    Trainable: `A` `(out, r)` starting at zero, `B` `(r, in)` ~ U(±1/√in), scales `s`.
    """

    def __init__(
        self,
        linear: nn.Linear,
        spec: QuantSpec,
        lrqat: LRQATSpec,
        scales: torch.Tensor | None = None,
        zeros: torch.Tensor | None = None,
        grid_weight: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        """Build from a float layer. `scales`/`zeros` default to `spec.init` on the
        weight; `grid_weight` (Φ0 before downcasting) defaults to `clamp(W/s0 + z)`."""
        super().__init__()
        self.spec = spec
        self.phi_format = lrqat.phi
        self.rank = lrqat.rank
        self.scaling = lrqat.alpha / lrqat.rank
        self.out_features, self.in_features = linear.weight.shape
        w0 = linear.weight.detach().float()
        if scales is None:
            scales, zeros = init_params(w0, spec)
        if grid_weight is None:
            grid_weight = to_grid(w0, scales, zeros, spec)
        self.register_buffer("phi", downcast(grid_weight, lrqat.phi, spec))
        self.register_buffer("zeros", None if zeros is None else zeros.float().clone())
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())
        self.A, self.B = lowrank_factors(self.out_features, self.in_features, self.rank, generator)
        self.s = nn.Parameter(scales.float().clone())

    def base(self) -> torch.Tensor:
        """Φ0 read back from storage as float32 grid values."""
        return upcast(self.phi, self.phi_format, self.spec)

    def _int_weight(self, A: torch.Tensor, B: torch.Tensor, rounding: Callable) -> torch.Tensor:
        C = self.scaling * (A.float() @ B.float())
        if self.phi_format == "int":
            return torch.clamp(self.base() + rounding(C), self.spec.qmin, self.spec.qmax)
        return torch.clamp(rounding(self.base() + C), self.spec.qmin, self.spec.qmax)

    def _weight(self, A: torch.Tensor, B: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        return dequantize(self._int_weight(A, B, round_ste), s, self.zeros)

    def int_weight(self) -> torch.Tensor:
        """The integers the layer computes with now (what `merge()` keeps)."""
        with torch.no_grad():
            return self._int_weight(self.A, self.B, torch.round)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        params = (self.A, self.B, self.s)
        if torch.is_grad_enabled() and any(p.requires_grad for p in params):
            return _RecomputedWeightLinear.apply(x, self._weight, self.bias, *params)
        return F.linear(x, self._weight(*params).to(x.dtype), self.bias)

    def merge(self) -> QuantLinear:
        """The deployed integer layer: same function, no adapter."""
        return QuantLinear(self.spec, self.int_weight(), self.s.detach(), self.zeros, self.bias)

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """Trainable tensors by role (each role has its own learning rate)."""
        return _trainable({"main": [self.A, self.B], "scales": [self.s]})

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features}, out={self.out_features}, {self.spec.describe()}, "
            f"rank={self.rank}, phi={self.phi_format}"
        )


def _trainable(groups: dict[str, list[nn.Parameter]]) -> dict[str, list[nn.Parameter]]:
    return {role: [p for p in params if p.requires_grad] for role, params in groups.items()}


class QATLinear(nn.Module):
    """Full-model QAT baseline: every weight trainable, fake-quantized with learnable
    scales (LSQ-style: the straight-through rounding lets `s` receive the LSQ gradient).
    The float weight and its optimizer state cost 12+ bytes per weight: the memory
    LR-QAT avoids."""

    def __init__(
        self, linear: nn.Linear, spec: QuantSpec, scales: torch.Tensor | None = None, zeros: torch.Tensor | None = None
    ) -> None:
        super().__init__()
        self.spec = spec
        self.out_features, self.in_features = linear.weight.shape
        if scales is None:
            scales, zeros = init_params(linear.weight.detach(), spec)
        self.weight = nn.Parameter(linear.weight.detach().float().clone())
        self.s = nn.Parameter(scales.float().clone())
        self.register_buffer("zeros", None if zeros is None else zeros.float().clone())
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())

    def int_weight(self) -> torch.Tensor:
        with torch.no_grad():
            return quantize(self.weight, self.s, self.zeros, self.spec)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, fake_quant(self.weight, self.s, self.zeros, self.spec).to(x.dtype), self.bias)

    def merge(self) -> QuantLinear:
        return QuantLinear(self.spec, self.int_weight(), self.s.detach(), self.zeros, self.bias)

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        return _trainable({"main": [self.weight], "scales": [self.s]})


class LoRALinear(nn.Module):
    """Plain LoRA: a frozen base weight (kept in the layer's own dtype, e.g. bf16) beside
    a trainable low-rank update, `y = x·W0ᵀ + (α/r)·x·(A·B)ᵀ`. No quantization: the
    reference point for memory and speed (what LR-QAT costs over ordinary LoRA)."""

    def __init__(
        self,
        linear: nn.Linear,
        lrqat: LRQATSpec,
        generator: torch.Generator | None = None,
        base_weight: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        self.out_features, self.in_features = linear.weight.shape
        self.scaling = lrqat.alpha / lrqat.rank
        self.register_buffer("base_weight", linear.weight.detach() if base_weight is None else base_weight)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())
        self.A, self.B = lowrank_factors(self.out_features, self.in_features, lrqat.rank, generator)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        update = F.linear(F.linear(x, self.B.to(x.dtype)), self.A.to(x.dtype)) * self.scaling
        return F.linear(x, self.base_weight.to(x.dtype), self.bias) + update

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        return _trainable({"main": [self.A, self.B]})


class NaiveLoRALinear(LoRALinear):
    """The baseline LR-QAT improves on: a float LoRA beside a fake-quantized frozen base,
    `y = x·Ŵ0ᵀ + (α/r)·x·(A·B)ᵀ`. Merging must add `A·B` to the weight and quantize
    again, which rounds away most of what the adapter learned: the merged model does not
    compute what training computed (that gap is what this baseline shows)."""

    def __init__(
        self,
        linear: nn.Linear,
        spec: QuantSpec,
        lrqat: LRQATSpec,
        scales: torch.Tensor | None = None,
        zeros: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__(linear, lrqat, generator, base_weight=QuantLinear.from_linear(linear, spec, scales, zeros).weight())
        self.spec = spec

    def merge(self) -> QuantLinear:
        """Fold the adapter into the float weight, then RTN with fresh ranges."""
        with torch.no_grad():
            merged = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
            merged.weight.copy_(self.base_weight + self.scaling * self.A @ self.B)
            if self.bias is not None:
                merged.bias.copy_(self.bias)
        return QuantLinear.from_linear(merged, self.spec)
