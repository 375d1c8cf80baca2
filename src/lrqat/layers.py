"""Quantized linear layers: `LRQATLinear` (the method) and `QuantLinear` (its merge).

`LRQATLinear` holds the frozen base Φ0 in its φ storage format and the trainable
`A`, `B`, `s`; its forward pass follows METHOD.md §4. The quantized weight Ŵ is never
kept for the backward pass: a custom autograd function saves only the input and the
small trainable tensors and recomputes Ŵ from them when gradients are needed (§5).

`QuantLinear` is the deployed layer: packed integers, scales (and zero points).
`LRQATLinear.merge()` produces one that computes bit for bit what training computed.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from lrqat.downcast import downcast, fractional_bits, upcast
from lrqat.ptq import init_params
from lrqat.quantizer import (
    dequantize,
    dequantize_,
    fake_quant,
    grouped,
    pack_ints,
    quantize,
    round_ste,
    to_grid,
    unpack_ints,
)
from lrqat.spec import LRQATSpec, QuantSpec

SPARSE_CORRECTION_MAX_DENSITY = 0.01
"""Above this fraction of clamped weights the low-rank backward's correction (a gather per
clamped weight) costs more than forming `G = gᵀx` densely, and the dense form is used.
A negative value always takes the dense form (for comparisons)."""


class _LRQATLinearFunction(torch.autograd.Function):
    """`y = x · Ŵᵀ + bias` with `Ŵ = s ⊙ (clamp(round(Φ0 + c·A·B)) − z)`, storing only
    `x`, `A`, `B`, `s` (and `y`) but never Ŵ, and differentiating by hand.

    With straight-through rounding, `∂Ŵ/∂(c·A·B) = s` where the rounded value lies on
    the grid (the clamp's pass-through mask `m`) and `∂Ŵ/∂s = q − z`. So, from
    `G = dL/dŴ = gᵀx`: `dA = c·(G⊙s⊙m)·Bᵀ`, `dB = c·Aᵀ·(G⊙s⊙m)`, `ds = Σ_group G⊙(q − z)`.

    Forming `G` is a third weight-sized matrix product that LoRA does not pay. With one
    scale per output channel it is avoidable, exactly: writing `m = 1 − m̄`,
    `(G⊙s⊙m)·Bᵀ = s⊙(gᵀ·(x·Bᵀ)) − (G⊙s⊙m̄)·Bᵀ` (likewise for `dB`), where the first term
    costs what LoRA's gradients cost and the second needs `G` only where the clamp is
    active, rarely (none of 106M weights after the benchmark's runs); and
    `ds_i = Σ_t g_ti·y_ti / s_i` from the saved output. Per-group scales, biases
    (`y − bias` would cancel in bf16), a zero scale, or many clamped weights take the
    dense form. Either way: one recomputation of `q`, no autograd graph over
    weight-sized tensors.
    """

    @staticmethod
    def forward(ctx, x, layer, A, B, s):
        weight, _ = layer.weight(A, B, s, x.dtype)
        ctx.layer = layer
        y = F.linear(x, weight, layer.bias)
        ctx.low_rank = SPARSE_CORRECTION_MAX_DENSITY >= 0 and s.shape[1] == 1 and layer.bias is None
        ctx.save_for_backward(x, A, B, s, y if ctx.low_rank else None)
        return y

    @staticmethod
    def backward(ctx, grad_out):
        x, A, B, s, y = ctx.saved_tensors
        layer = ctx.layer
        # Weight-sized temporaries are the transient memory of this layer: at most the
        # integers, the mask and one gradient-sized buffer, updated in place.
        need_x, need_A, need_B, need_s = ctx.needs_input_grad[0], *ctx.needs_input_grad[2:5]
        g2, x2 = grad_out.reshape(-1, grad_out.shape[-1]), x.reshape(-1, x.shape[-1])
        if ctx.low_rank and bool((s != 0).all()):  # `ds` divides by s
            weight, on_grid = layer.weight(A, B, s, grad_out.dtype, with_mask=True)
            clamped = (~on_grid).nonzero(as_tuple=True)
            del on_grid
            if clamped[0].numel() <= SPARSE_CORRECTION_MAX_DENSITY * weight.numel():
                grad_x = grad_out @ weight if need_x else None
                del weight
                grads = _low_rank_grads(g2.float(), x2.float(), y, A.float(), B.float(), s, layer.scaling, clamped,
                                        need_A, need_B, need_s)
                return grad_x, None, *grads
            del weight, clamped
        q, on_grid = layer.grid_integers(A, B, with_mask=True)
        grad_x = grad_out @ dequantize(q, s, layer.zeros).to(grad_out.dtype) if need_x else None
        return grad_x, None, *_dense_grads(g2, x2, q, on_grid, A, B, s, layer, need_A, need_B, need_s)


def _dense_grads(g2, x2, q, on_grid, A, B, s, layer, need_A, need_B, need_s):
    """`dA`, `dB`, `ds` from `G = gᵀx` formed in full (the general case)."""
    g = q.shape[1] // s.shape[1]
    G = (g2.t() @ x2).float()
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
    return grad_A, grad_B, grad_s


def _low_rank_grads(g2, x2, y, A, B, s, scaling, clamped, need_A, need_B, need_s, chunk=4096):
    """`dA`, `dB`, `ds` for per-channel scales without forming `G` (see the class above):
    low-rank products, minus `G`'s entries at the `clamped` (row, column) pairs."""
    grad_s = (g2 * y.reshape(-1, y.shape[-1]).float()).sum(0).unsqueeze(1) / s if need_s else None
    grad_A = (g2.t() @ (x2 @ B.t())).mul_(s * scaling) if need_A else None
    grad_B = ((g2 @ (A * s)).t() @ x2).mul_(scaling) if need_B else None
    rows, cols = clamped
    for start in range(0, rows.numel(), chunk):
        r, c = rows[start:start + chunk], cols[start:start + chunk]
        G_rc = (g2[:, r] * x2[:, c]).sum(0) * s[r, 0] * scaling  # G⊙s·c where the clamp is active
        if need_A:
            grad_A.index_add_(0, r, B.t()[c] * G_rc.unsqueeze(1), alpha=-1)
        if need_B:
            grad_B.index_add_(1, c, (A[r] * G_rc.unsqueeze(1)).t(), alpha=-1)
    return grad_A, grad_B, grad_s


def grid_integers(
    A: torch.Tensor, B: torch.Tensor, phi: torch.Tensor, phi_format: str, spec: QuantSpec, scaling: float,
    with_mask: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`q = clamp(round(Φ0 + c·A·B))` (for φ = int: `clamp(Φ0 + round(c·A·B))`) and, if
    asked, the mask of entries the clamp let through (where the straight-through
    gradient flows). Weight-sized passes are what LR-QAT's step costs over LoRA, so
    they are done in place, and `fixed8` codes are added without a float copy."""
    v = torch.mm(A.float(), B.float()).mul_(scaling)
    if phi_format == "int":
        v.round_().add_(upcast(phi, phi_format, spec))
    elif phi_format == "fixed8":
        v.add_(phi, alpha=2.0 ** -fractional_bits(spec)).add_(spec.qmin).round_()
    else:
        v.add_(phi).round_()
    on_grid = (v >= spec.qmin).logical_and_(v <= spec.qmax) if with_mask else None
    return v.clamp_(spec.qmin, spec.qmax), on_grid


def quantized_weight(
    A: torch.Tensor, B: torch.Tensor, phi: torch.Tensor, s: torch.Tensor, zeros: torch.Tensor | None, phi_format: str,
    spec: QuantSpec, scaling: float, dtype: torch.dtype, with_mask: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Ŵ in the compute dtype and, if asked, the clamp's pass-through mask (`grid_integers`)."""
    q, on_grid = grid_integers(A, B, phi, phi_format, spec, scaling, with_mask)
    return dequantize_(q, s, zeros).to(dtype), on_grid


@functools.cache
def compiled(fn: Callable) -> Callable:
    """`fn` compiled by torch.compile: its weight-sized passes fused into one kernel per
    function (C++/OpenMP on CPU, Triton on GPU). Compiled once per shape and φ format."""
    return torch.compile(fn, dynamic=False)


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
        self.fused = False  # True: Ŵ's weight-sized passes run as one compiled kernel (`compiled`)
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
        """This layer's `q` (and pass-through mask) for the given `A`, `B`: see `grid_integers`."""
        with torch.no_grad():
            return grid_integers(A, B, self.phi, self.phi_format, self.spec, self.scaling, with_mask)

    def weight(
        self, A: torch.Tensor, B: torch.Tensor, s: torch.Tensor, dtype: torch.dtype, with_mask: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`quantized_weight` for this layer: compiled when `fused`, plain PyTorch otherwise
        (the reference, and the fallback where no compiler is available)."""
        fn = compiled(quantized_weight) if self.fused else quantized_weight
        return fn(A, B, self.phi, s, self.zeros, self.phi_format, self.spec, self.scaling, dtype, with_mask)

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
