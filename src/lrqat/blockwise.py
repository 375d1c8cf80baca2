"""Running a causal LM one decoder block at a time, through the model's own forward.

Block-wise reconstruction (Block-AP), block-sequential calibration and the evaluation of
models that do not fit in memory all need the same three things: the hidden states that
enter the first block, the keyword arguments the model calls each block with (position
embeddings, masks: these differ per block in models with sliding-window layers), and the
model's own tail (final norm, head, logit soft-capping) applied to hidden states computed
elsewhere. All three come from the model's forward with its blocks made pass-through, so
no architecture's decoder loop is re-implemented, and blocks that are not in memory
(still on the meta device) are never run.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from lrqat.errors import LrqatError


def decoder_layers(model: nn.Module, target_names: list[str]) -> tuple[str, nn.ModuleList]:
    """The ModuleList of decoder blocks that holds the targets (its qualified name)."""
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) and any(t.startswith(f"{name}.") for t in target_names):
            return name, module
    raise LrqatError("this model has no module list of decoder blocks holding the target linears, which block-wise "
                     "work (GPTQ, Block-AP, --load stream) needs; use --init lp or minmax, and --load memory.")


@contextlib.contextmanager
def replaced_forwards(layers: nn.ModuleList, forward: Callable[[int, torch.Tensor, dict[str, Any]], torch.Tensor]
                      ) -> Iterator[None]:
    """Every block's forward replaced by `forward(index, hidden, kwargs)` (restored after).
    The blocks stay in place with their attributes, which some decoder loops read."""
    for index, layer in enumerate(layers):
        def call(hidden: torch.Tensor | None = None, *args: Any, _index: int = index, **kw: Any) -> torch.Tensor:
            if hidden is None:
                hidden = kw.pop("hidden_states")
            return forward(_index, hidden, kw)
        layer.forward = call
    try:
        yield
    finally:
        for layer in layers:
            del layer.forward


class _Stop(Exception):
    """Raised after the last block of a capture pass: the tail is not needed there."""


@torch.no_grad()
def capture_block_calls(model: nn.Module, layers: nn.ModuleList, sequences: torch.Tensor
                        ) -> tuple[list[torch.Tensor], list[list[dict[str, Any]]]]:
    """The first block's input hidden states per sequence, and the keyword arguments every
    block is called with (`kwargs[block][sequence]`). No block runs (they may be on the
    meta device): each passes its input through while its call is recorded."""
    first_inputs: list[torch.Tensor] = []
    kwargs: list[list[dict[str, Any]]] = [[] for _ in layers]
    last = len(layers) - 1

    def record(index: int, hidden: torch.Tensor, kw: dict[str, Any]) -> torch.Tensor:
        if index == 0:
            first_inputs.append(hidden.detach().clone())
        kwargs[index].append(dict(kw))
        if index == last:
            raise _Stop
        return hidden

    device = _device(model)
    with replaced_forwards(layers, record):
        for row in sequences:
            with contextlib.suppress(_Stop):
                model(input_ids=row[None].to(device), use_cache=False)
    return first_inputs, kwargs


def call_block(block: nn.Module, hidden: torch.Tensor, kw: dict[str, Any]) -> torch.Tensor:
    """One block's output hidden states (blocks of some versions return a tuple)."""
    out = block(hidden, **kw)
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def tail_logits(model: nn.Module, layers: nn.ModuleList, input_ids: torch.Tensor, final_hidden: torch.Tensor
                ) -> torch.Tensor:
    """The model's logits when its last block outputs `final_hidden`: the model's own final
    norm, head and soft-capping, run by its forward with the blocks bypassed."""
    def bypass(index: int, hidden: torch.Tensor, _kw: dict[str, Any]) -> torch.Tensor:
        return final_hidden if index == 0 else hidden

    with replaced_forwards(layers, bypass):
        return model(input_ids=input_ids.to(_device(model)), use_cache=False).logits


def _device(model: nn.Module) -> torch.device:
    for tensor in (*model.parameters(), *model.buffers()):
        if tensor.device.type != "meta":
            return tensor.device
    return torch.device("cpu")
