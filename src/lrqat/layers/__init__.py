"""The layers lrqat swaps into a model: the method (`lrqat.py`), the deployed integer
layer (`quant.py`) and the baselines (`baselines.py`).

Every trainable quantized layer follows one protocol, `TrainableQuantLayer`: it names
its trainable tensors by role (`param_groups`, each role gets its own learning rate)
and `merge()`s into a `QuantLinear`.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import nn

from lrqat.layers.baselines import LoRALinear, NaiveLoRALinear, PEQALinear, QATLinear
from lrqat.layers.lrqat import LRQATLinear
from lrqat.layers.quant import QuantLinear


@runtime_checkable
class TrainableQuantLayer(Protocol):
    """A layer the trainer trains and the merge replaces."""

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """Trainable tensors by role: `main` (A/B, or weights) and `scales`."""

    def merge(self) -> QuantLinear:
        """The deployed integer layer computing this layer's current function."""


@runtime_checkable
class TrainableLayer(Protocol):
    """Anything with trainable tensors by role (also plain LoRA, which has no merge)."""

    def param_groups(self) -> dict[str, list[nn.Parameter]]: ...


@runtime_checkable
class HoldsQuantizedBase(Protocol):
    """A layer whose frozen base is stored compactly (Φ0, PEQA's integers): the memory
    bill counts these tensors apart from the other frozen ones."""

    def frozen_quantized_base(self) -> list[torch.Tensor]: ...


__all__ = ["HoldsQuantizedBase", "LRQATLinear", "LoRALinear", "NaiveLoRALinear", "PEQALinear", "QATLinear", "QuantLinear",
           "TrainableLayer", "TrainableQuantLayer"]
