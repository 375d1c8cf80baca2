"""Range setting: the scales s0 (and zero points) every method starts from.

Min-max and the Lp search need only the weight. GPTQ (`gptq.py`) keeps these ranges and
chooses the integers on them with calibration data.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from lrqat.quantizer import fake_quant, group_size_of, grouped

if TYPE_CHECKING:
    from lrqat.spec import QuantSpec

RANGE_INITS = ("minmax", "lp")


def minmax_params(w: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale (and zero point) that map the full range of each group onto the grid."""
    return clipped_params(w, spec, 1.0)


def clipped_params(
    w: torch.Tensor, spec: QuantSpec, ratio: float | torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale (and zero point) for the range of each group shrunk by `ratio` in (0, 1]."""
    wg = grouped(w.detach().float(), group_size_of(spec, w.shape[1]))
    eps = torch.finfo(torch.float32).tiny
    if spec.symmetric:
        s = (wg.abs().amax(dim=-1) * ratio / spec.qmax).clamp_min(eps)
        return s, None
    lo = (wg.amin(dim=-1).clamp_max(0) * ratio)
    hi = (wg.amax(dim=-1).clamp_min(0) * ratio)
    s = ((hi - lo) / (spec.qmax - spec.qmin)).clamp_min(eps)
    z = torch.round(-lo / s).clamp(spec.qmin, spec.qmax)
    return s, z


def lp_search_params(
    w: torch.Tensor, spec: QuantSpec, p: float = 4.0, candidates: int = 100
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per group, the clipping ratio on a grid in (0, 1] minimising ‖W − Q(W)‖_p.

    This is the reference recipe's range setting: clipping outliers a little trades a
    larger error on few weights for a finer grid on all others.
    """
    best_s, best_z = minmax_params(w, spec)
    best_err = _lp_error(w, spec, best_s, best_z, p)
    for i in range(1, candidates):
        ratio = 1.0 - i / candidates
        s, z = clipped_params(w, spec, ratio)
        err = _lp_error(w, spec, s, z, p)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_s = torch.where(better, s, best_s)
        if z is not None:
            best_z = torch.where(better, z, best_z)
    return best_s, best_z


def _lp_error(
    w: torch.Tensor, spec: QuantSpec, s: torch.Tensor, z: torch.Tensor | None, p: float
) -> torch.Tensor:
    w_hat = fake_quant(w.detach().float(), s, z, spec)
    g = group_size_of(spec, w.shape[1])
    return grouped(w_hat - w.float(), g).abs().pow(p).sum(dim=-1)


def init_params(w: torch.Tensor, spec: QuantSpec, init: str = "lp") -> tuple[torch.Tensor, torch.Tensor | None]:
    """The range setting `init` (`minmax` or `lp`) of one weight on `spec`'s grid."""
    if init == "minmax":
        return minmax_params(w, spec)
    if init == "lp":
        return lp_search_params(w, spec)
    raise ValueError(f"unknown range init {init!r}: choose one of {', '.join(RANGE_INITS)}")
