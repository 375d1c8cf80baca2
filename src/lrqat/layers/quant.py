"""The deployed integer layer `QuantLinear`, what every method merges into, and the
checks that make a merge safe."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from lrqat.errors import LrqatError
from lrqat.quantizer import dequantize, pack_ints, quantize, unpack_ints
from lrqat.ranges import init_params

if TYPE_CHECKING:
    from lrqat.spec import QuantSpec


def merge_problem(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, spec: QuantSpec) -> str | None:
    """Why `(q, scales, zeros)` is not a valid integer layer on `spec`'s grid, or None.

    A diverged run leaves NaN/inf or non-positive scales, and nothing downstream (packing
    casts to uint8) would notice: the saved model would silently compute garbage.
    """
    if not bool(torch.isfinite(scales).all()):
        return f"{int((~torch.isfinite(scales)).sum())} of its {scales.numel()} scales are not finite"
    if not bool((scales > 0).all()):
        return f"{int((scales <= 0).sum())} of its {scales.numel()} scales are not positive (min {float(scales.min()):.3g})"
    if zeros is not None and not bool(torch.isfinite(zeros).all()):
        return "its zero points are not finite"
    if not bool(torch.isfinite(q).all()) or not bool((q == torch.round(q)).all()):
        return "its weights are not integers"
    if q.numel() and (float(q.min()) < spec.qmin or float(q.max()) > spec.qmax):
        return f"its integers span [{float(q.min()):.0f}, {float(q.max()):.0f}], outside the grid [{spec.qmin}, {spec.qmax}]"
    return None


class QuantLinear(nn.Module):
    """An integer linear layer: `y = x · (s ⊙ (q − z))ᵀ + bias`, dequantized on the fly.

    Stores `qweight` as packed unsigned codes (`q − qmin`, two per byte for b ≤ 4),
    `scales` `(out, G)` and, for asymmetric grids, integer-valued `zeros` `(out, G)`.
    Refuses (LrqatError) integers off the grid and non-finite or non-positive scales.
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
        problem = merge_problem(q, scales.detach(), zeros, spec)
        if problem is not None:
            raise LrqatError(f"not a valid integer layer: {problem}")
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
        init: str = "lp",
    ) -> QuantLinear:
        """Round-to-nearest quantization of a float layer (the RTN baseline).

        `scales`/`zeros` default to the range setting `init` on the weight; `q`
        (integers chosen by another algorithm such as GPTQ) defaults to rounding `W / s + z`.
        """
        w = linear.weight.detach().float()
        if scales is None:
            scales, zeros = init_params(w, spec, init)
        if q is None:
            q = quantize(w, scales, zeros, spec)
        return cls(spec, q, scales, zeros, linear.bias)

    def int_weight(self) -> torch.Tensor:
        """The integers on the grid, as float32."""
        return unpack_ints(self.qweight, self.spec)

    def w_hat(self) -> torch.Tensor:
        """The dequantized weight `s ⊙ (q − z)`, float32."""
        return dequantize(self.int_weight(), self.scales, self.zeros)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.w_hat().to(x.dtype), self.bias)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, {self.spec.describe()}"


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


def trainable(groups: dict[str, list[nn.Parameter]]) -> dict[str, list[nn.Parameter]]:
    """Keep the tensors of each role that are trainable now."""
    return {role: [p for p in params if p.requires_grad] for role, params in groups.items()}
