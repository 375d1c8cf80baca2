"""The method: `LRQATLinear`, trained with LR-QAT (docs/METHOD.md §2–6).

It holds the frozen base Φ0 (`phi0`) in its φ storage format and the trainable `A`,
`B`, `s`; its forward pass follows §4. The quantized weight Ŵ is never kept for the
backward pass: a custom autograd function saves only the input and the small trainable
tensors and recomputes Ŵ from them when gradients are needed (§5). `merge()` gives the
deployed `QuantLinear`, which computes bit for bit what training computed.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from lrqat.layers.quant import QuantLinear, frozen, lowrank_factors, trainable
from lrqat.phi import PhiFormat, phi_format
from lrqat.quantizer import dequantize, dequantize_, grouped, round_ste, to_grid
from lrqat.ranges import init_params

if TYPE_CHECKING:
    from lrqat.spec import LRQATSpec, QuantSpec


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
        weight, _ = layer.w_hat(A, B, s, x.dtype)
        ctx.layer = layer
        y = F.linear(x, weight, layer.bias)
        ctx.low_rank = layer.sparse_correction_max_density >= 0 and s.shape[1] == 1 and layer.bias is None
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
            weight, on_grid = layer.w_hat(A, B, s, grad_out.dtype, with_mask=True)
            clamped = (~on_grid).nonzero(as_tuple=True)
            del on_grid
            if clamped[0].numel() <= layer.sparse_correction_max_density * weight.numel():
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
    A: torch.Tensor, B: torch.Tensor, phi0: torch.Tensor, phi: PhiFormat, spec: QuantSpec, scaling: float,
    with_mask: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`q = clamp(round(Φ0 + c·A·B))` (for φ = int: `clamp(Φ0 + round(c·A·B))`) and, if
    asked, the mask of entries the clamp let through (where the straight-through
    gradient flows). Weight-sized passes are what LR-QAT's step costs over LoRA, so
    they are done in place (`PhiFormat.add_into`)."""
    v = phi.add_into(torch.mm(A.float(), B.float()).mul_(scaling), phi0, spec)
    on_grid = (v >= spec.qmin).logical_and_(v <= spec.qmax) if with_mask else None
    return v.clamp_(spec.qmin, spec.qmax), on_grid


def quantized_weight(
    A: torch.Tensor, B: torch.Tensor, phi0: torch.Tensor, s: torch.Tensor, zeros: torch.Tensor | None, phi: PhiFormat,
    spec: QuantSpec, scaling: float, dtype: torch.dtype, with_mask: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Ŵ in the compute dtype and, if asked, the clamp's pass-through mask (`grid_integers`)."""
    q, on_grid = grid_integers(A, B, phi0, phi, spec, scaling, with_mask)
    return dequantize_(q, s, zeros).to(dtype), on_grid


@functools.cache
def compiled(fn: Callable) -> Callable:
    """`fn` compiled by torch.compile: its weight-sized passes fused into one kernel per
    function (C++/OpenMP on CPU, Triton on GPU). Compiled once per shape and φ format."""
    return torch.compile(fn, dynamic=False)


class LRQATLinear(nn.Module):
    """A linear layer trained with LR-QAT (docs/METHOD.md §2–6).

    Frozen: `phi0` (Φ0 in the storage format `phi`), `zeros`, `bias`.
    Trainable: `A` `(out, r)` starting at zero, `B` `(r, in)` ~ U(±1/√in), scales `s`.
    """

    sparse_correction_max_density: float = 0.01
    """Above this fraction of clamped weights the low-rank backward's correction (a gather
    per clamped weight) costs more than forming `G = gᵀx` densely, and the dense form is
    used. A negative value always takes the dense form (for comparisons)."""

    def __init__(
        self,
        linear: nn.Linear,
        spec: QuantSpec,
        lrqat: LRQATSpec,
        scales: torch.Tensor | None = None,
        zeros: torch.Tensor | None = None,
        grid_weight: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        init: str = "lp",
    ) -> None:
        """Build from a float layer. `scales`/`zeros` default to the range setting `init`
        on the weight; `grid_weight` (Φ0 before downcasting) defaults to `clamp(W/s0 + z)`."""
        super().__init__()
        self.spec = spec
        self.phi = phi_format(lrqat.phi)
        self.rank = lrqat.rank
        self.scaling = lrqat.alpha / lrqat.rank
        self.fused = lrqat.fused  # True: Ŵ's weight-sized passes run as one compiled kernel (`compiled`)
        self.out_features, self.in_features = linear.weight.shape
        w0 = linear.weight.detach().float()
        if scales is None:
            scales, zeros = init_params(w0, spec, init)
        if grid_weight is None:
            grid_weight = to_grid(w0, scales, zeros, spec)
        self.phi0 = frozen(self.phi.store(grid_weight, spec))
        self.register_buffer("zeros", None if zeros is None else zeros.float().clone())
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())
        self.A, self.B = lowrank_factors(self.out_features, self.in_features, self.rank, generator)
        self.s = nn.Parameter(scales.float().clone())
        # the initial scales: with Φ0 unrounded they give the near-float weight the `phi0`
        # distillation teacher computes with (`teacher`: set by `distill.phi0_teacher_mode`)
        self.register_buffer("s0", scales.float().clone())
        self.teacher = False

    def teacher_weight(self) -> torch.Tensor:
        """s₀·(Φ0 − z) without rounding: W0 to within Φ0's storage precision, except
        where the range init clipped it."""
        return dequantize(self.base(), self.s0, self.zeros)

    def base(self) -> torch.Tensor:
        """Φ0 read back from storage as float32 grid values."""
        return self.phi.load(self.phi0, self.spec)

    def grid_integers(self, A: torch.Tensor, B: torch.Tensor, with_mask: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """This layer's `q` (and pass-through mask) for the given `A`, `B`: see `grid_integers`."""
        with torch.no_grad():
            return grid_integers(A, B, self.phi0, self.phi, self.spec, self.scaling, with_mask)

    def w_hat(
        self, A: torch.Tensor, B: torch.Tensor, s: torch.Tensor, dtype: torch.dtype, with_mask: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Ŵ (`quantized_weight`) for this layer: compiled when `fused`, plain PyTorch
        otherwise (the reference, and the fallback where no compiler is available)."""
        fn = compiled(quantized_weight) if self.fused else quantized_weight
        return fn(A, B, self.phi0, s, self.zeros, self.phi, self.spec, self.scaling, dtype, with_mask)

    def reference_w_hat(self, A: torch.Tensor, B: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """Ŵ through plain autograd (straight-through rounding): the specification the
        hand-written backward pass is tested against."""
        C = self.scaling * (A.float() @ B.float())
        if self.phi.name == "int":
            q = torch.clamp(self.base() + round_ste(C), self.spec.qmin, self.spec.qmax)
        else:
            q = torch.clamp(round_ste(self.base() + C), self.spec.qmin, self.spec.qmax)
        return dequantize(q, s, self.zeros)

    def int_weight(self) -> torch.Tensor:
        """The integers the layer computes with now (what `merge()` keeps)."""
        return self.grid_integers(self.A, self.B)[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.teacher:
            return F.linear(x, self.teacher_weight().to(x.dtype), self.bias)
        if torch.is_grad_enabled() and any(p.requires_grad for p in (self.A, self.B, self.s)):
            return _LRQATLinearFunction.apply(x, self, self.A, self.B, self.s)
        return F.linear(x, dequantize(self.int_weight(), self.s, self.zeros).to(x.dtype), self.bias)

    def merge(self) -> QuantLinear:
        """The deployed integer layer: same function, no adapter."""
        return QuantLinear(self.spec, self.int_weight(), self.s.detach(), self.zeros, self.bias)

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """Trainable tensors by role (each role has its own learning rate)."""
        return trainable({"main": [self.A, self.B], "scales": [self.s]})

    def frozen_quantized_base(self) -> list[torch.Tensor]:
        """What the memory bill counts as the compact frozen base: Φ0 and zero points."""
        return [t for t in (self.phi0, self.zeros) if t is not None]

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features}, out={self.out_features}, {self.spec.describe()}, "
            f"rank={self.rank}, phi={self.phi.name}"
        )
