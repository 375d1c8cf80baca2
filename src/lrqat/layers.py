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

import torch
import torch.nn.functional as F
from torch import nn

from lrqat.downcast import downcast, fractional_bits, upcast
from lrqat.ptq import init_params
from lrqat.quantizer import dequantize, fake_quant, grouped, pack_ints, quantize, round_ste, to_grid, unpack_ints
from lrqat.spec import LRQATSpec, QuantSpec


class _LRQATLinearFunction(torch.autograd.Function):
    """`y = x · Ŵᵀ + bias` with `Ŵ = s ⊙ (clamp(round(Φ0 + c·A·B)) − z)`, storing only
    `x`, `A`, `B`, `s` (never Ŵ) and differentiating by hand in the backward pass.

    With straight-through rounding, `∂Ŵ/∂(c·A·B) = s` where the rounded value lies on
    the grid (the clamp's pass-through mask `m`) and `∂Ŵ/∂s = q − z`. So, from
    `G = dL/dŴ = gᵀx`: `dA = c·(G⊙s⊙m)·Bᵀ`, `dB = c·Aᵀ·(G⊙s⊙m)`, `ds = Σ_group G⊙(q − z)`.
    One recomputation of `q`, no autograd graph over weight-sized tensors.
    """

    @staticmethod
    def forward(ctx, x, layer, A, B, s):
        with torch.no_grad():
            q, _ = layer.grid_integers(A, B)
            weight = dequantize(q, s, layer.zeros).to(x.dtype)
        ctx.layer = layer
        ctx.save_for_backward(x, A, B, s)
        return F.linear(x, weight, layer.bias)

    @staticmethod
    def backward(ctx, grad_out):
        x, A, B, s = ctx.saved_tensors
        layer = ctx.layer
        # Weight-sized temporaries are the transient memory of this layer: at most the
        # integers, the mask and one gradient-sized buffer, updated in place.
        q, on_grid = layer.grid_integers(A, B, with_mask=True)
        g = q.shape[1] // s.shape[1]
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_out @ dequantize(q, s, layer.zeros).to(grad_out.dtype)
        G = (grad_out.reshape(-1, grad_out.shape[-1]).t() @ x.reshape(-1, x.shape[-1])).float()
        need_A, need_B, need_s = ctx.needs_input_grad[2:5]
        grad_A = grad_B = grad_s = None
        if need_s:
            if layer.zeros is not None:
                grouped(q, g).sub_(layer.zeros.unsqueeze(-1))
            grad_s = grouped(q.mul_(G), g).sum(-1)
        del q
        if need_A or need_B:
            grouped(G, g).mul_(s.unsqueeze(-1))
            G.mul_(on_grid).mul_(layer.scaling)
            grad_A = G @ B.float().t() if need_A else None
            grad_B = A.float().t() @ G if need_B else None
        return grad_x, None, grad_A, grad_B, grad_s


def frozen(tensor: torch.Tensor) -> nn.Parameter:
    """A weight-sized tensor that is never trained (Φ0, a LoRA base). A frozen Parameter
    rather than a buffer, because FSDP shards parameters and replicates buffers: this
    is what lets each process hold only its share of the base model."""
    return nn.Parameter(tensor, requires_grad=False)


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
        self.phi = frozen(downcast(grid_weight, lrqat.phi, spec))
        self.register_buffer("zeros", None if zeros is None else zeros.float().clone())
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())
        self.A, self.B = lowrank_factors(self.out_features, self.in_features, self.rank, generator)
        self.s = nn.Parameter(scales.float().clone())

    def base(self) -> torch.Tensor:
        """Φ0 read back from storage as float32 grid values."""
        return upcast(self.phi, self.phi_format, self.spec)

    def grid_integers(self, A: torch.Tensor, B: torch.Tensor, with_mask: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`q = clamp(round(Φ0 + c·A·B))` (for φ = int: `clamp(Φ0 + round(c·A·B))`) and, if
        asked, the mask of entries the clamp let through (where the straight-through
        gradient flows). Weight-sized passes are what LR-QAT's step costs over LoRA, so
        they are done in place, and `fixed8` codes are added without a float copy."""
        with torch.no_grad():
            v = torch.mm(A.float(), B.float()).mul_(self.scaling)
            if self.phi_format == "int":
                v.round_().add_(self.base())
            elif self.phi_format == "fixed8":
                v.add_(self.phi, alpha=2.0 ** -fractional_bits(self.spec)).add_(self.spec.qmin).round_()
            else:
                v.add_(self.phi).round_()
            on_grid = (v >= self.spec.qmin).logical_and_(v <= self.spec.qmax) if with_mask else None
            return v.clamp_(self.spec.qmin, self.spec.qmax), on_grid

    def reference_weight(self, A: torch.Tensor, B: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """Ŵ through plain autograd (straight-through rounding): the specification the
        hand-written backward pass is tested against."""
        C = self.scaling * (A.float() @ B.float())
        if self.phi_format == "int":
            q = torch.clamp(self.base() + round_ste(C), self.spec.qmin, self.spec.qmax)
        else:
            q = torch.clamp(round_ste(self.base() + C), self.spec.qmin, self.spec.qmax)
        return dequantize(q, s, self.zeros)

    def int_weight(self) -> torch.Tensor:
        """The integers the layer computes with now (what `merge()` keeps)."""
        return self.grid_integers(self.A, self.B)[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and any(p.requires_grad for p in (self.A, self.B, self.s)):
            return _LRQATLinearFunction.apply(x, self, self.A, self.B, self.s)
        return F.linear(x, dequantize(self.int_weight(), self.s, self.zeros).to(x.dtype), self.bias)

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
        self.base_weight = frozen(linear.weight.detach() if base_weight is None else base_weight)
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
