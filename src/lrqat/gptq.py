"""GPTQ (Frantar et al. 2022) in its paper's symbols: integers on given ranges that
minimise the layer's output error on calibration data. A PTQ baseline, and a start
for LR-QAT (Φ0 = the GPTQ integers)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

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


@torch.no_grad()
def collect_hessians(model: nn.Module, targets: list[tuple[str, nn.Linear]], calib_blocks: torch.Tensor,
                     batch_size: int = 4) -> dict[str, torch.Tensor]:
    """`H = 2/n · Σ x xᵀ` of the inputs of every target linear, from one pass of the
    float model over the calibration blocks (all layers at once: each layer sees float
    inputs, not the outputs of already-quantized layers before it)."""
    device = next(model.parameters()).device
    hessians = {name: torch.zeros(lin.in_features, lin.in_features, device=device) for name, lin in targets}
    counts = dict.fromkeys(hessians, 0)

    def hook(name: str):
        def accumulate(_module: nn.Module, inputs: tuple[torch.Tensor, ...], _output: torch.Tensor) -> None:
            x = inputs[0].reshape(-1, inputs[0].shape[-1]).float()
            n = counts[name]
            hessians[name].mul_(n / (n + x.shape[0])).add_(x.t() @ x, alpha=2.0 / (n + x.shape[0]))
            counts[name] = n + x.shape[0]
        return accumulate

    handles = [lin.register_forward_hook(hook(name)) for name, lin in targets]
    try:
        for start in range(0, calib_blocks.shape[0], batch_size):
            model(input_ids=calib_blocks[start : start + batch_size].to(device), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return hessians


def gptq_integers(
    model: nn.Module,
    targets: list[tuple[str, nn.Linear]],
    ranges: dict[str, tuple[torch.Tensor, torch.Tensor | None]],
    spec: QuantSpec,
    calib_blocks: torch.Tensor,
    damp: float = 0.01,
    act_order: bool = True,
) -> dict[str, torch.Tensor]:
    """GPTQ integers of every target, on the grids given by `ranges`."""
    hessians = collect_hessians(model, targets, calib_blocks)
    return {
        name: gptq_quantize(lin.weight, hessians.pop(name), *ranges[name], spec, damp=damp, act_order=act_order)
        for name, lin in targets
    }
