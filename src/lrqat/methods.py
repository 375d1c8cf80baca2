"""The quantization methods lrqat can run, all on the same primitives and evaluation.

| method | trains | merged model |
|---|---|---|
| `rtn` | nothing | round-to-nearest on the range-init grid |
| `gptq` | nothing (uses calibration data) | GPTQ integers on the range-init grid |
| `peqa` | scales only | RTN integers, learned scales |
| `naive-lora` | float LoRA beside a fake-quantized base | base + A·B re-quantized (lossy merge) |
| `qat` | every weight and scale (LSQ-style) | round(W/s) with learned scales |
| `lrqat` | A, B inside the rounding, and scales | clamp(round(Φ0 + A·B)) with learned scales |
"""

from __future__ import annotations

import torch
from torch import nn

from lrqat.layers import LoRALinear, LRQATLinear, NaiveLoRALinear, QATLinear, QuantLinear
from lrqat.ptq import gptq_integers
from lrqat.spec import LRQATSpec, QuantSpec
from lrqat.surgery import RangeParams, check_targets, find_targets, freeze, init_ranges, replace_module

TRAINED = ("peqa", "naive-lora", "qat", "lrqat")


def apply_method(
    method: str,
    model: nn.Module,
    quant: QuantSpec,
    lrqat: LRQATSpec,
    ranges: RangeParams,
    seed: int = 0,
    integers: dict[str, torch.Tensor] | None = None,
) -> nn.Module:
    """Freeze `model` and swap its targets for the layers of `method`, in place.

    `integers` (from GPTQ) replace rounding as the integer start of `rtn`/`gptq`,
    `peqa` and `lrqat` (Φ0 = the GPTQ integers).
    """
    targets = check_targets(model, quant, lrqat.targets)
    freeze(model)
    generator = torch.Generator().manual_seed(seed)
    for name, linear in targets:
        s0, z0 = ranges[name]
        grid = None if integers is None else integers[name]
        replace_module(model, name, _layer(method, linear, quant, lrqat, s0, z0, grid, generator))
    return model


def _layer(method: str, linear: nn.Linear, quant: QuantSpec, lrqat: LRQATSpec, s0: torch.Tensor,
           z0: torch.Tensor | None, grid: torch.Tensor | None, generator: torch.Generator) -> nn.Module:
    if method in ("rtn", "gptq"):
        return QuantLinear.from_linear(linear, quant, s0, z0, q=grid)
    if method == "lrqat":
        return LRQATLinear(linear, quant, lrqat, s0, z0, grid_weight=grid, generator=generator)
    if method == "peqa":
        layer = LRQATLinear(linear, quant, LRQATSpec(rank=1, phi="int", targets=lrqat.targets), s0, z0,
                            grid_weight=grid, generator=generator)
        layer.A.requires_grad_(False)
        layer.B.requires_grad_(False)
        return layer
    if method == "qat":
        return QATLinear(linear, quant, s0, z0)
    if method == "naive-lora":
        return NaiveLoRALinear(linear, quant, lrqat, s0, z0, generator=generator)
    raise ValueError(f"unknown method {method!r}")


def gptq_start(model: nn.Module, quant: QuantSpec, pattern: str, ranges: RangeParams,
               calib_blocks: torch.Tensor) -> dict[str, torch.Tensor]:
    """GPTQ integers for every target of the float `model`."""
    targets = check_targets(model, quant, pattern)
    return gptq_integers(model, targets, ranges, quant, calib_blocks, damp=quant.damp, act_order=quant.act_order)


def apply_lrqat(
    model: nn.Module, quant: QuantSpec, lrqat: LRQATSpec, seed: int = 0, ranges: RangeParams | None = None,
    integers: dict[str, torch.Tensor] | None = None,
) -> nn.Module:
    """Freeze the model and swap every target linear for an `LRQATLinear`, in place.

    The seed fixes the random init of every `B`, so a rebuilt model (on resume, or in
    another process) starts identical.
    """
    ranges = ranges if ranges is not None else init_ranges(model, quant, lrqat.targets)
    return apply_method("lrqat", model, quant, lrqat, ranges, seed, integers)


def apply_lora(model: nn.Module, lrqat: LRQATSpec, seed: int = 0) -> nn.Module:
    """Plain LoRA on the targets, no quantization: the reference for memory and speed."""
    targets = find_targets(model, lrqat.targets)
    freeze(model)
    generator = torch.Generator().manual_seed(seed)
    for name, linear in targets:
        replace_module(model, name, LoRALinear(linear, lrqat, generator))
    return model


def apply_rtn(model: nn.Module, quant: QuantSpec, pattern: str, ranges: RangeParams | None = None) -> nn.Module:
    """Round-to-nearest PTQ of every target linear, in place (the baseline and start point)."""
    ranges = ranges if ranges is not None else init_ranges(model, quant, pattern)
    return apply_method("rtn", model, quant, LRQATSpec(targets=pattern), ranges)
