"""GPTQ (Frantar et al. 2022) in its paper's symbols: integers on given ranges that
minimise the layer's output error on calibration data. A PTQ baseline, and a start
for LR-QAT (Φ0 = the GPTQ integers)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from lrqat.blockwise import BlockCalibrator, BlockData, BlockResult, call_block
from lrqat.quantizer import group_size_of

if TYPE_CHECKING:
    from lrqat.spec import QuantSpec


def gptq_quantize(
    W: torch.Tensor,
    H: torch.Tensor,
    s: torch.Tensor,
    z: torch.Tensor | None,
    spec: QuantSpec,
    damp: float = 0.01,
    act_order: bool = False,
    block_size: int = 128,
) -> torch.Tensor:
    """GPTQ (Frantar et al. 2022): integers that minimise ‖(W − Ŵ) X‖² given H = X Xᵀ.

    Columns are quantized one at a time and the error of each is spread over the
    columns not yet quantized, weighted by the inverse Hessian. The scales (and zero
    points) are given and static per group, so `act_order` (quantizing columns by
    decreasing Hessian diagonal) keeps every column on its own group's grid, and the
    result can seed LR-QAT: Φ0 = these integers, s0 = `s`.
    Returns the integers `(out, in)` as float32, in the original column order.
    """
    W = W.detach().float().clone()
    H = H.detach().float().clone()
    n_in = W.shape[1]
    g = group_size_of(spec, n_in)
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    perm = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(n_in)
    W, H = W[:, perm], H[perm][:, perm]
    H += damp * torch.mean(torch.diag(H)) * torch.eye(n_in)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    col_group = perm // g
    Q = torch.zeros_like(W)
    for i1 in range(0, n_in, block_size):
        i2 = min(i1 + block_size, n_in)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            w, d = W1[:, i], Hinv1[i, i]
            scale = s[:, col_group[i1 + i]]
            zero = z[:, col_group[i1 + i]] if z is not None else 0.0
            q = torch.clamp(torch.round(w / scale + zero), spec.qmin, spec.qmax)
            Q[:, i1 + i] = q
            err = (w - scale * (q - zero)) / d
            W1[:, i:] -= err.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return Q[:, torch.argsort(perm)]


GPTQ_INPUTS = ("quantized", "float")
"""What each block's Hessians are collected on (`--gptq-inputs`): the outputs of the blocks
already quantized (GPTQ's reference code and its successors: each block corrects for the
error of those before it), or the float model's own hidden states (every block calibrated
independently; lrqat's GPTQ before block-sequential calibration, kept to reproduce it)."""

Ranges = Callable[[str, nn.Linear], tuple[torch.Tensor, torch.Tensor | None]]
"""A target's grid (scales, zero points) from its qualified name and float linear."""


@torch.no_grad()
def block_hessians(block: nn.Module, linears: dict[str, nn.Linear], inputs: list[torch.Tensor],
                   calls: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """`H = 2/n · Σ x xᵀ` of the inputs of each of `linears` (inside `block`) while the
    block runs on `inputs` with the keyword arguments it is called with."""
    hessians = {name: torch.zeros(lin.in_features, lin.in_features) for name, lin in linears.items()}
    counts = dict.fromkeys(hessians, 0)

    def hook(name: str):
        def accumulate(_module: nn.Module, args: tuple[torch.Tensor, ...], _output: torch.Tensor) -> None:
            x = args[0].reshape(-1, args[0].shape[-1]).float()
            n = counts[name]
            hessians[name].mul_(n / (n + x.shape[0])).add_(x.t() @ x, alpha=2.0 / (n + x.shape[0]))
            counts[name] = n + x.shape[0]
        return accumulate

    handles = [lin.register_forward_hook(hook(name)) for name, lin in linears.items()]
    try:
        for hidden, kw in zip(inputs, calls, strict=True):
            call_block(block, hidden, kw)
    finally:
        for handle in handles:
            handle.remove()
    return hessians


def gptq_calibrator(spec: QuantSpec, ranges: Ranges, damp: float = 0.01, act_order: bool = True,
                    inputs: str = "quantized") -> BlockCalibrator:
    """GPTQ as a block calibrator (`blockwise.calibrate_blockwise`): the Hessians of a
    block's targets on its `inputs` (`GPTQ_INPUTS`), then each target's integers on the
    grid `ranges` gives it. The float path is needed for `inputs="float"`."""
    if inputs not in GPTQ_INPUTS:
        raise ValueError(f"inputs must be one of {GPTQ_INPUTS}, not {inputs!r}")

    def calibrate(_index: int, _local: str, layer: nn.Module, linears: dict[str, nn.Linear], data: BlockData
                  ) -> BlockResult:
        seen = data.quantized if inputs == "quantized" else data.float_inputs
        hessians = block_hessians(layer, linears, seen, data.calls)
        results: BlockResult = {}
        for name, linear in linears.items():
            s, z = ranges(name, linear)
            results[name] = (s, z, gptq_quantize(linear.weight, hessians.pop(name), s, z, spec, damp=damp,
                                                 act_order=act_order))
        return results

    return calibrate
