"""Range setting: the scales s0 (and zero points) every method starts from.

Min-max and the Lp search need only the weight. GPTQ (`gptq.py`) keeps these ranges and
chooses the integers on them with calibration data.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from lrqat.quantizer import group_size_of, grouped

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
    return _clipped(_extremes(grouped(w.detach().float(), group_size_of(spec, w.shape[1])), spec), spec, ratio)


def _extremes(wg: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per group of the grouped weight `wg`: its largest magnitude (symmetric grid), or
    its range widened to contain zero (asymmetric grid)."""
    if spec.symmetric:
        return wg.abs().amax(dim=-1), None
    return wg.amin(dim=-1).clamp_max(0), wg.amax(dim=-1).clamp_min(0)


def _clipped(extremes: tuple[torch.Tensor, torch.Tensor | None], spec: QuantSpec, ratio: float | torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor | None]:
    eps = torch.finfo(torch.float32).tiny
    low, high = extremes
    if high is None:
        return (low * ratio / spec.qmax).clamp_min(eps), None
    lo, hi = low * ratio, high * ratio
    s = ((hi - lo) / (spec.qmax - spec.qmin)).clamp_min(eps)
    z = torch.round(-lo / s).clamp(spec.qmin, spec.qmax)
    return s, z


def lp_search_params(
    w: torch.Tensor, spec: QuantSpec, p: float = 4.0, candidates: int = 100
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per group, the clipping ratio on a grid in (0, 1] minimising ‖W − Q(W)‖_p.

    This is the reference recipe's range setting: clipping outliers a little trades a
    larger error on few weights for a finer grid on all others. The group extremes are
    found once and each candidate's error is computed in two weight-sized buffers: the
    search was the slowest part of setting up a run.
    """
    wg = grouped(w.detach().float(), group_size_of(spec, w.shape[1]))
    extremes = _extremes(wg, spec)
    best_s, best_z = _clipped(extremes, spec, 1.0)
    best_err = _lp_error(wg, spec, best_s, best_z, p)
    for i in range(1, candidates):
        s, z = _clipped(extremes, spec, 1.0 - i / candidates)
        err = _lp_error(wg, spec, s, z, p)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_s = torch.where(better, s, best_s)
        if z is not None:
            best_z = torch.where(better, z, best_z)
    return best_s, best_z


def _lp_error(wg: torch.Tensor, spec: QuantSpec, s: torch.Tensor, z: torch.Tensor | None, p: float) -> torch.Tensor:
    """Per group, ‖Q(W) − W‖_p^p of the grouped weight `wg`: `fake_quant`'s operations in
    its order, in place. The 4th power by squaring twice: torch's general `pow` kernel
    costs twice the rest of the search (the two may differ in the last bit)."""
    v = wg / s.unsqueeze(-1)
    if z is not None:
        v.add_(z.unsqueeze(-1))
    step = torch.round(v).sub_(v)  # round_ste's forward: v + (round(v) − v)
    q = v.add_(step).clamp_(spec.qmin, spec.qmax)
    del step
    if z is not None:
        q.sub_(z.unsqueeze(-1))
    err = q.mul_(s.unsqueeze(-1)).sub_(wg).abs_()
    return (err.square_().square_() if p == 4.0 else err.pow_(p)).sum(dim=-1)


def init_params(w: torch.Tensor, spec: QuantSpec, init: str = "lp") -> tuple[torch.Tensor, torch.Tensor | None]:
    """The range setting `init` (`minmax` or `lp`) of one weight on `spec`'s grid."""
    if init == "minmax":
        return minmax_params(w, spec)
    if init == "lp":
        return lp_search_params(w, spec)
    raise ValueError(f"unknown range init {init!r}: choose one of {', '.join(RANGE_INITS)}")
