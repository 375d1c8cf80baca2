"""Model surgery: find the target linears of a causal LM by name and swap them.

A new architecture needs only a name pattern (`RunSpec.targets`), not new code:
anything matching the pattern that is an `nn.Linear` is quantized; embeddings, the
output head and norms stay float and frozen.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

import torch
from torch import nn

from lrqat.activations import InputQuantizer
from lrqat.errors import LrqatError
from lrqat.layers import LRQATLinear, QuantLinear, TrainableLayer, TrainableQuantLayer
from lrqat.ranges import init_params

if TYPE_CHECKING:
    from lrqat.spec import QuantSpec


def find_targets(model: nn.Module, pattern: str) -> list[tuple[str, nn.Linear]]:
    """The `nn.Linear` modules whose qualified name matches `pattern` (re.search)."""
    regex = re.compile(pattern)
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and regex.search(n)]
    if not found:
        raise LrqatError(
            f"no linear layer of the model matches the target pattern {pattern!r}: "
            "check the model architecture or pass a pattern that names its linears."
        )
    return found


def check_targets(model: nn.Module, quant: QuantSpec, pattern: str) -> list[tuple[str, nn.Linear]]:
    """Find the targets and fail early on any layer the grid cannot tile."""
    targets = find_targets(model, pattern)
    for name, linear in targets:
        quant.check_layer(name, linear.in_features)
        if quant.bits <= 4 and linear.in_features % 2:
            raise LrqatError(f"layer {name} has an odd input dimension {linear.in_features}: 4-bit packing needs it even.")
    return targets


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Swap the submodule `name` for `new`; its input quantizer (and online rotation),
    if any, moves along, so method surgery and merging keep what the forward applies."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, child, None)
    if isinstance(old, nn.Module):
        for hook in old._forward_pre_hooks.values():
            if isinstance(hook, InputQuantizer):
                new.register_forward_pre_hook(hook)
    setattr(parent, child, new)


def freeze(model: nn.Module) -> None:
    for p in model.parameters():
        p.requires_grad_(False)


RangeParams = dict[str, tuple[torch.Tensor, torch.Tensor | None]]


def init_ranges(model: nn.Module, quant: QuantSpec, pattern: str, init: str = "lp") -> RangeParams:
    """The PTQ scales (and zero points) of every target by the range setting `init`,
    computed once and shared by the RTN baseline and the trained methods' start."""
    return {name: init_params(linear.weight.detach(), quant, init) for name, linear in check_targets(model, quant, pattern)}


def merge_model(model: nn.Module) -> nn.Module:
    """Swap every trained layer for its `QuantLinear`, in place. A layer whose scales
    are non-finite or non-positive, or whose integers leave the grid, is refused by name.

    Only names are listed up front: each trained layer (its Φ0 is the bulk of the
    training footprint) is freed as soon as its integer layer replaces it, so merging
    never holds both forms of the whole model."""
    names = [name for name, module in model.named_modules() if isinstance(module, TrainableQuantLayer)]
    for name in names:
        try:
            merged = model.get_submodule(name).merge()
        except LrqatError as err:
            raise LrqatError(f"cannot merge layer {name}: {err} (did training diverge? lower --lr)") from None
        replace_module(model, name, merged)
    return model


def lrqat_layers(model: nn.Module) -> list[tuple[str, LRQATLinear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LRQATLinear)]


def trainable_groups(model: nn.Module) -> dict[str, list[nn.Parameter]]:
    """Trainable tensors by role (`main`: A/B or the weights; `scales`), so each role
    gets its own learning rate. Every trainable layer type reports its own."""
    groups: dict[str, list[nn.Parameter]] = {"main": [], "scales": []}
    for module in model.modules():
        if isinstance(module, TrainableLayer):
            for role, params in module.param_groups().items():
                groups[role] += params
    return groups


def count_rtn_ties(model: nn.Module, reference: nn.Module) -> int:
    """Integers where step 0 of LR-QAT (rounding the stored Φ0) differs from RTN of W0.

    With `fixed8` this happens only at rounding ties of the stored fixed-point value
    (docs/METHOD.md §6); we report the count rather than hide it.
    """
    ref = dict(reference.named_modules())
    diffs = 0
    for name, layer in lrqat_layers(model):
        rtn = ref.get(name)
        if isinstance(rtn, QuantLinear):
            diffs += int((layer.int_weight() != rtn.int_weight()).sum())
    return diffs
