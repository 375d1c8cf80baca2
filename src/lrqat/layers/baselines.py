"""The baselines LR-QAT is measured against, each a small trainable layer:
full QAT, PEQA (scales only), plain LoRA (no quantization: the memory/speed reference)
and naive LoRA-QAT (a float adapter beside a fake-quantized base)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from lrqat.layers.quant import QuantLinear, frozen, lowrank_factors, trainable
from lrqat.phi import PHI_FORMATS
from lrqat.quantizer import dequantize, fake_quant, grouped, quantize
from lrqat.ranges import init_params

if TYPE_CHECKING:
    from lrqat.spec import LRQATSpec, QuantSpec


class QATLinear(nn.Module):
    """Full-model QAT baseline: every weight trainable, fake-quantized with learnable
    scales (LSQ-style: the straight-through rounding lets `s` receive the LSQ gradient).
    The float weight and its optimizer state cost 12+ bytes per weight: the memory
    LR-QAT avoids."""

    def __init__(
        self, linear: nn.Linear, spec: QuantSpec, scales: torch.Tensor | None = None, zeros: torch.Tensor | None = None,
        init: str = "lp",
    ) -> None:
        super().__init__()
        self.spec = spec
        self.out_features, self.in_features = linear.weight.shape
        if scales is None:
            scales, zeros = init_params(linear.weight.detach(), spec, init)
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
        return trainable({"main": [self.weight], "scales": [self.s]})


class _ScaledIntegersFunction(torch.autograd.Function):
    """`y = x · (s ⊙ (q − z))ᵀ + bias`, saving `x` and `s` only: the integers are
    unpacked again in the backward pass, so no weight-sized tensor outlives the forward."""

    @staticmethod
    def forward(ctx, x, layer, s):
        ctx.layer = layer
        ctx.save_for_backward(x, s)
        return F.linear(x, dequantize(layer.int_weight(), s, layer.zeros).to(x.dtype), layer.bias)

    @staticmethod
    def backward(ctx, grad_out):
        x, s = ctx.saved_tensors
        layer = ctx.layer
        q = layer.int_weight()
        grad_x = grad_out @ dequantize(q, s, layer.zeros).to(grad_out.dtype) if ctx.needs_input_grad[0] else None
        grad_s = None
        if ctx.needs_input_grad[2]:
            G = grad_out.reshape(-1, grad_out.shape[-1]).t().float() @ x.reshape(-1, x.shape[-1]).float()
            g = q.shape[1] // s.shape[1]
            if layer.zeros is not None:
                grouped(q, g).sub_(layer.zeros.unsqueeze(-1))
            grad_s = grouped(q.mul_(G), g).sum(-1)
        return grad_x, None, grad_s


class PEQALinear(nn.Module):
    """PEQA (Kim et al. 2023): the integers are frozen (packed, as φ = int stores them)
    and only the scales train. `y = x · (s ⊙ (q − z))ᵀ`; merging keeps `q` and the
    learned `s`, so the merged model computes what training computed."""

    def __init__(
        self, linear: nn.Linear, spec: QuantSpec, scales: torch.Tensor, zeros: torch.Tensor | None,
        integers: torch.Tensor | None = None,
    ) -> None:
        """`integers` (e.g. GPTQ's) default to round-to-nearest on the grid of `scales`."""
        super().__init__()
        self.spec = spec
        self.out_features, self.in_features = linear.weight.shape
        q = quantize(linear.weight.detach().float(), scales, zeros, spec) if integers is None else integers
        self.qweight = frozen(PHI_FORMATS["int"].store(q, spec))
        self.register_buffer("zeros", None if zeros is None else zeros.float().clone())
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())
        self.s = nn.Parameter(scales.float().clone())

    def int_weight(self) -> torch.Tensor:
        return PHI_FORMATS["int"].load(self.qweight, self.spec)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _ScaledIntegersFunction.apply(x, self, self.s)

    def merge(self) -> QuantLinear:
        return QuantLinear(self.spec, self.int_weight(), self.s.detach(), self.zeros, self.bias)

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        return trainable({"scales": [self.s]})

    def frozen_quantized_base(self) -> list[torch.Tensor]:
        return [t for t in (self.qweight, self.zeros) if t is not None]

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, {self.spec.describe()}, scales only"


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
        return trainable({"main": [self.A, self.B]})


class NaiveLoRALinear(LoRALinear):
    """The baseline LR-QAT improves on: a float LoRA beside a fake-quantized frozen base,
    `y = x·Ŵ0ᵀ + (α/r)·x·(A·B)ᵀ`. Merging must add `A·B` to the weight and quantize
    again (fresh ranges by the run's range setting `init`), which rounds away most of
    what the adapter learned: the merged model does not compute what training computed
    (that gap is what this baseline shows)."""

    def __init__(
        self,
        linear: nn.Linear,
        spec: QuantSpec,
        lrqat: LRQATSpec,
        scales: torch.Tensor | None = None,
        zeros: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        init: str = "lp",
    ) -> None:
        # the fake-quantized base in the model's compute dtype, as the float weight it replaces
        # (bf16 under --dtype bf16: the baseline's memory is that of a bf16 LoRA, not fp32's)
        base = QuantLinear.from_linear(linear, spec, scales, zeros, init=init).w_hat().to(linear.weight.dtype)
        super().__init__(linear, lrqat, generator, base_weight=base)
        self.spec = spec
        self.init = init

    def merge(self) -> QuantLinear:
        """Fold the adapter into the float weight, then RTN with fresh ranges."""
        with torch.no_grad():
            merged = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
            merged.weight.copy_(self.base_weight + self.scaling * self.A @ self.B)
            if self.bias is not None:
                merged.bias.copy_(self.bias)
        return QuantLinear.from_linear(merged, self.spec, init=self.init)
