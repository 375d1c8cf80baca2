"""Running a causal LM one decoder block at a time, through the model's own forward.

Block-wise reconstruction (Block-AP), block-sequential calibration (GPTQ) and the
evaluation of models that do not fit in memory all need the same three things: the hidden states that
enter the first block, the keyword arguments the model calls each block with (position
embeddings, masks: these differ per block in models with sliding-window layers), and the
model's own tail (final norm, head, logit soft-capping) applied to hidden states computed
elsewhere. All three come from the model's forward with its blocks made pass-through, so
no architecture's decoder loop is re-implemented, and blocks that are not in memory
(still on the meta device) are never run.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from lrqat.errors import LrqatError
from lrqat.layers import QuantLinear
from lrqat.surgery import replace_module

if TYPE_CHECKING:
    from lrqat.spec import QuantSpec


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


BlockResult = dict[str, tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]]
"""One block's targets → (scales, zero points, integers): a calibrated start's result."""


@dataclass
class BlockData:
    """What a block is calibrated on: the keyword arguments it is called with, its inputs
    through the quantized blocks before it, and (when asked for) its inputs through the
    float blocks and the float block's outputs on those."""

    calls: list[dict[str, Any]]
    quantized: list[torch.Tensor]
    float_inputs: list[torch.Tensor] | None = None
    float_outputs: list[torch.Tensor] | None = None


BlockCalibrator = Callable[[int, str, nn.Module, dict[str, nn.Linear], BlockData], BlockResult]
"""`calibrate(index, prefix, block, targets, data)`: a calibrated start (GPTQ, Block-AP)
for the targets (qualified name → float linear) of one float block."""


@torch.no_grad()
def calibrate_blockwise(
    model: nn.Module,
    targets: list[str],
    spec: QuantSpec,
    calib: torch.Tensor,
    calibrate: BlockCalibrator,
    on_block: Callable[[int, BlockResult], None],
    float_path: bool = False,
    load_block: Callable[[str], None] | None = None,
    windows: dict[str, torch.Tensor] | None = None,
) -> dict[str, list[torch.Tensor]]:
    """A calibrated start, one decoder block at a time, as GPTQ's and EfficientQAT's code
    run: each block is calibrated on the outputs of the blocks already quantized, so the
    error each leaves is what the next one sees.

    Per block: `load_block(prefix)` (the streaming load reads it from disk), the float
    block's outputs on float inputs (`float_path`: Block-AP's targets, GPTQ's float
    variant), `calibrate`, then the quantized block (its targets as integer layers)
    carries the calibration sequences, and the sequences of `windows`, to the next
    block; `on_block(index, results)` last (keep the integers, or build the method's
    layers and drop the float ones). Returns each window set's hidden states after the
    last block (the start's perplexity without holding its model: `tail_logits`)."""
    prefix, layers = decoder_layers(model, targets)
    quantized, calls = capture_block_calls(model, layers, calib)
    floats = [h.clone() for h in quantized] if float_path else None
    followed = {name: capture_block_calls(model, layers, ids) for name, ids in (windows or {}).items()}
    for index, layer in enumerate(layers):
        local = f"{prefix}.{index}."
        if load_block is not None:
            load_block(local)
        linears = {t: layer.get_submodule(t[len(local):]) for t in targets if t.startswith(local)}
        float_outputs = None if floats is None else [call_block(layer, h, kw)
                                                     for h, kw in zip(floats, calls[index], strict=True)]
        data = BlockData(calls[index], quantized, floats, float_outputs)
        results = calibrate(index, local, layer, linears, data) if linears else {}
        block = quantized_block(layer, local, results, spec)
        quantized = [call_block(block, h, kw) for h, kw in zip(quantized, calls[index], strict=True)]
        for name, (hidden, window_calls) in followed.items():
            followed[name] = ([call_block(block, h, kw) for h, kw in zip(hidden, window_calls[index], strict=True)],
                              window_calls)
        floats = float_outputs
        del block, data
        on_block(index, results)
    return {name: hidden for name, (hidden, _) in followed.items()}


def quantized_block(layer: nn.Module, local: str, results: BlockResult, spec: QuantSpec) -> nn.Module:
    """A copy of `layer` with its calibrated targets as integer layers (the block itself
    when none are)."""
    if not results:
        return layer
    block = copy.deepcopy(layer)
    for name, (s, z, q) in results.items():
        relative = name[len(local):]
        replace_module(block, relative, QuantLinear.from_linear(block.get_submodule(relative), spec, s, z, q=q))
    return block
