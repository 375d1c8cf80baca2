"""Streaming load (`--load stream`): a model built from its safetensors checkpoint one
tensor at a time, so the float model is never held whole.

`from_pretrained` builds the whole float model first (28 GB in fp32 for a 7B), which a
24 GiB machine cannot hold although LR-QAT's own training footprint is a fraction of
that. Here the model's skeleton is built on the meta device (parameters without
storage; Accelerate's `init_empty_weights`), every tensor that stays float (embeddings,
norms, head) is read from the checkpoint in the compute dtype, and every target linear
is read alone, handed to the method's layer builder (range init, Φ0 in its φ format,
A/B/s) and dropped, so the peak during setup is the training footprint plus one layer.

The float and RTN perplexities of such a model are computed block by block
(`streamed_perplexities`): the hidden states of every evaluation window go through one
decoder block at a time, read from the checkpoint, with the RTN copy of that block beside
it; the model's own forward supplies the blocks' inputs and its tail (`blockwise`).
Calibrated starts (GPTQ, Block-AP) run the same way (`streamed_start`): each block read,
calibrated on the quantized blocks' outputs, turned into the method's layers and its
float weights dropped.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from accelerate import init_empty_weights
from accelerate.utils import set_module_tensor_to_device
from safetensors import safe_open
from torch import nn
from transformers import AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

from lrqat.blockwise import (
    BlockCalibrator,
    BlockResult,
    calibrate_blockwise,
    call_block,
    capture_block_calls,
    decoder_layers,
    tail_logits,
)
from lrqat.errors import LrqatError
from lrqat.evaluate import NLL, Perplexity
from lrqat.gptq import Ranges
from lrqat.layers import LRQATLinear, QuantLinear
from lrqat.methods import METHODS, LayerStart
from lrqat.ranges import init_params
from lrqat.surgery import freeze, replace_module

if TYPE_CHECKING:
    from lrqat.spec import LRQATSpec, QuantSpec

LOADS = ("memory", "stream")
"""`--load`: the whole float model by `from_pretrained`, or this module's streaming load."""

LayerBuilder = Callable[[str, nn.Linear], nn.Module]
"""What a target linear becomes: `build(qualified_name, float_linear)` → the new layer."""


class Checkpoint:
    """A safetensors checkpoint (one file, or shards with an index) read one tensor at a
    time. Each read opens the file and closes it again, so no mapping of the whole file
    stays in the process (mapped pages would count as its memory)."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        index = self.folder / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            self.files = {name: self.folder / file for name, file in weight_map.items()}
        else:
            self.files = {}
            for path in sorted(self.folder.glob("*.safetensors")):
                with safe_open(str(path), framework="pt") as handle:
                    self.files.update(dict.fromkeys(handle.keys(), path))
        if not self.files:
            raise LrqatError(f"{self.folder} holds no safetensors weights: --load stream reads .safetensors "
                             "checkpoints; use --load memory for other formats.")

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def tensor(self, name: str) -> torch.Tensor:
        path = self.files.get(name)
        if path is None:
            raise LrqatError(f"the checkpoint in {self.folder} has no tensor {name!r}: --load stream needs the "
                             "model's own tensor names (as save_pretrained writes them); use --load memory.")
        with safe_open(str(path), framework="pt") as handle:
            return handle.get_tensor(name).clone()


def skeleton(config: PretrainedConfig, dtype: torch.dtype) -> PreTrainedModel:
    """The model with every parameter on the meta device (no storage) and frozen; buffers
    computed from the config (rotary frequencies) are real."""
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.tie_weights()  # a tied head shares the embedding (init_empty_weights leaves them apart)
    freeze(model)
    return model.eval()


def _alias_groups(model: nn.Module) -> list[list[str]]:
    """Names that share one parameter (a tied head and embedding), the first as loaded."""
    groups: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(param), []).append(name)
    return [names for names in groups.values() if len(names) > 1]


def materialize(model: nn.Module, names: list[str], checkpoint: Checkpoint, dtype: torch.dtype) -> None:
    """Read `names` from the checkpoint into the model, floating tensors cast to `dtype`."""
    for name in names:
        set_module_tensor_to_device(model, name, "cpu", value=checkpoint.tensor(name), dtype=dtype)


def _aliases(model: nn.Module, checkpoint: Checkpoint) -> dict[str, str]:
    """Each alias of a tied parameter (a tied head) → the name the checkpoint holds it by;
    aliases are not read, `_tie` points them at the loaded tensor."""
    aliases = {}
    for names in _alias_groups(model):
        stored = next((n for n in names if n in checkpoint), None)
        if stored is None:
            raise LrqatError(f"the checkpoint holds none of the tied tensors {names}: it does not match the model.")
        aliases.update({name: stored for name in names if name != stored})
    return aliases


def _tie(model: nn.Module, aliases: dict[str, str]) -> None:
    for name, stored in aliases.items():
        owner, _, attr = name.rpartition(".")
        setattr(model.get_submodule(owner), attr, model.get_parameter(stored))


def _float_names(model: nn.Module, exclude_prefixes: tuple[str, ...]) -> list[str]:
    """The parameters and persistent buffers to read, in the model's order."""
    return [name for name in model.state_dict() if not name.startswith(exclude_prefixes)]


def load_linear(checkpoint: Checkpoint, name: str, template: nn.Linear, dtype: torch.dtype) -> nn.Linear:
    """One target linear, real and frozen, its weight as `from_pretrained` would give it."""
    linear = nn.utils.skip_init(nn.Linear, template.in_features, template.out_features,
                                bias=template.bias is not None, dtype=dtype)
    with torch.no_grad():
        linear.weight.copy_(checkpoint.tensor(f"{name}.weight"))
        if linear.bias is not None:
            linear.bias.copy_(checkpoint.tensor(f"{name}.bias"))
    return linear.requires_grad_(False)


BlockDone = Callable[[int, nn.ModuleList], None]
"""Called with a block's index and the block list once the block is complete (every
tensor read, its targets built): `shard.BlockSharding` shards it there."""


def stream_model(checkpoint: Checkpoint, config: PretrainedConfig, dtype: torch.dtype, targets: list[str],
                 build: LayerBuilder, on_block: BlockDone | None = None) -> PreTrainedModel:
    """The model with every target replaced by `build(name, float_linear)`, read tensor by
    tensor: targets in the model's module order (the order `apply_method` builds them in,
    so seeded adapters come out identical), one float linear in memory at a time. With
    `on_block`, decoder block by decoder block, each handed over when complete."""
    model = skeleton(config, dtype)
    aliases = _aliases(model, checkpoint)
    done = tuple(f"{t}." for t in targets)

    def build_target(name: str) -> None:
        linear = load_linear(checkpoint, name, model.get_submodule(name), dtype)
        replace_module(model, name, build(name, linear))

    if on_block is None:
        for name in targets:
            build_target(name)
    else:
        prefix, layers = decoder_layers(model, targets)
        outside = [t for t in targets if not t.startswith(f"{prefix}.")]
        if outside:
            raise LrqatError(f"targets {outside[:3]} lie outside the decoder blocks, which a block-by-block "
                             "(sharded) streaming load cannot take: narrow --targets to the blocks.")
        for index, layer in enumerate(layers):
            local = f"{prefix}.{index}."
            for name in [t for t in targets if t.startswith(local)]:
                build_target(name)
            materialize(model, [n for n in _block_names(layer, local) if not n.startswith(done) and n not in aliases],
                        checkpoint, dtype)
            on_block(index, layers)
        done += (f"{prefix}.",)
    materialize(model, [n for n in _float_names(model, done) if n not in aliases], checkpoint, dtype)
    _tie(model, aliases)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.device.type == "meta"]
    if left:
        raise LrqatError(f"tensors {left[:3]} are still unread after the streaming load: the checkpoint does not "
                         "match the model's config.")
    return model


def _without_blocks(checkpoint: Checkpoint, config: PretrainedConfig, dtype: torch.dtype, targets: list[str]
                    ) -> tuple[PreTrainedModel, str, nn.ModuleList]:
    """The skeleton with every tensor outside the decoder blocks read (embeddings, final
    norm, head), its blocks still on the meta device."""
    model = skeleton(config, dtype)
    prefix, layers = decoder_layers(model, targets)
    aliases = _aliases(model, checkpoint)
    materialize(model, [n for n in _float_names(model, (f"{prefix}.",)) if n not in aliases], checkpoint, dtype)
    _tie(model, aliases)
    return model, prefix, layers


def _block_names(layer: nn.Module, local: str) -> list[str]:
    """The checkpoint names of one decoder block's tensors (`local`: the block's prefix,
    dot included), from the block alone: the whole model's state dict per block would
    cost a walk of every module for each of them."""
    return [f"{local}{name}" for name in layer.state_dict()]


def _perplexities(model: nn.Module, layers: nn.ModuleList, windows: dict[str, torch.Tensor],
                  final: dict[str, list[torch.Tensor]]) -> dict[str, Perplexity]:
    """Perplexity on each set of windows from the hidden states its last block output."""
    result = {}
    for set_name, ids in windows.items():
        total = NLL()
        for row, hidden in zip(ids, final[set_name], strict=True):
            total.add(tail_logits(model, layers, row[None], hidden), row[None])
        result[set_name] = total.perplexity(int(ids.shape[1]))
    return result


@torch.no_grad()
def streamed_perplexities(checkpoint: Checkpoint, config: PretrainedConfig, dtype: torch.dtype, targets: list[str],
                          windows: dict[str, torch.Tensor], variants: dict[str, LayerBuilder | None]
                          ) -> dict[str, dict[str, Perplexity]]:
    """Perplexity of each variant of the model on each set of windows, one decoder block
    in memory at a time (`result[variant][windows_name]`). A variant is the float model
    (`None`) or the float model with its targets replaced by `build(name, linear)` (RTN)."""
    model, prefix, layers = _without_blocks(checkpoint, config, dtype, targets)
    calls, hidden = {}, {}
    for set_name, ids in windows.items():
        first, calls[set_name] = capture_block_calls(model, layers, ids)
        for variant in variants:
            hidden[variant, set_name] = [h.clone() for h in first]
    for index, layer in enumerate(layers):
        local = f"{prefix}.{index}."
        materialize(model, _block_names(layer, local), checkpoint, dtype)
        for variant, build in variants.items():
            block = layer if build is None else _replaced(layer, local, targets, build)
            for set_name in windows:
                states = hidden[variant, set_name]
                hidden[variant, set_name] = [call_block(block, h, kw)
                                             for h, kw in zip(states, calls[set_name][index], strict=True)]
            del block
        layer.to("meta")  # free the float block before reading the next
    return {variant: _perplexities(model, layers, windows, {w: hidden[variant, w] for w in windows})
            for variant in variants}


@torch.no_grad()
def streamed_start(checkpoint: Checkpoint, config: PretrainedConfig, dtype: torch.dtype, targets: list[str],
                   quant: QuantSpec, calib: torch.Tensor, calibrate: BlockCalibrator, float_path: bool,
                   build: MethodBuilder | None, windows: dict[str, torch.Tensor], on_block: BlockDone | None = None
                   ) -> tuple[PreTrainedModel | None, dict[str, Perplexity]]:
    """A calibrated start (GPTQ, Block-AP: `calibrate`) block by block from the checkpoint
    (`calibrate_blockwise`), one float block in memory at a time, and the start's
    perplexity on each set of `windows`.

    With `build`, every target becomes the method's layer started from the calibrated
    integers and scales (`--init gptq`, `--method gptq`, ...) as soon as its block is
    done, and the model is returned (each block handed to `on_block` when built);
    without, the blocks are dropped again (the start as a baseline only)."""
    model, _prefix, layers = _without_blocks(checkpoint, config, dtype, targets)

    def load_block(local: str) -> None:
        materialize(model, _block_names(model.get_submodule(local.rstrip(".")), local), checkpoint, dtype)

    def done(index: int, results: BlockResult) -> None:
        if build is None:
            layers[index].to("meta")
            return
        for name, start in results.items():
            replace_module(model, name, build(name, model.get_submodule(name), start))
        if on_block is not None:
            on_block(index, layers)

    final = calibrate_blockwise(model, targets, quant, calib, calibrate, done, float_path=float_path,
                                load_block=load_block, windows=windows)
    return (model if build is not None else None), _perplexities(model, layers, windows, final)


def _replaced(layer: nn.Module, local: str, targets: list[str], build: LayerBuilder) -> nn.Module:
    """A copy of one block with its targets replaced by `build`."""
    block = copy.deepcopy(layer)
    for name in targets:
        if name.startswith(local):
            relative = name[len(local):]
            replace_module(block, relative, build(name, block.get_submodule(relative)))
    return block


def rtn_builder(quant: QuantSpec, init: str) -> LayerBuilder:
    """A target's RTN layer on its range-init grid (the baseline)."""
    def build(_name: str, linear: nn.Linear) -> nn.Module:
        return QuantLinear.from_linear(linear, quant, *init_params(linear.weight.detach(), quant, init))
    return build


class MethodBuilder:
    """A target's layer for `method`, built as `apply_method` builds it (range init, then
    the method's layer, adapters drawn from one seeded generator in module order), and
    the count of LR-QAT's step-0 integers that differ from RTN's on the range-init grid
    (`rtn_tie_differences`). `range_grid(name, linear)` gives that grid: the range init
    (lp by default) is the one expensive part, so a calibrated start that computed it
    already passes its own."""

    def __init__(self, method: str, quant: QuantSpec, adapter: LRQATSpec | None, init: str, seed: int,
                 range_grid: Ranges | None = None) -> None:
        self.method, self.quant, self.adapter, self.init = METHODS[method], quant, adapter, init
        self.generator = torch.Generator().manual_seed(seed)
        self.range_grid = range_grid or (lambda _name, linear: init_params(linear.weight.detach(), quant, init))
        self.ties = 0

    def __call__(self, name: str, linear: nn.Linear,
                 start: tuple[torch.Tensor, torch.Tensor | None, torch.Tensor] | None = None) -> nn.Module:
        """`start`: a calibrated start's (scales, zero points, integers) for this target."""
        grid = self.range_grid(name, linear)
        s0, z0, integers = start if start is not None else (*grid, None)
        layer = self.method.build(LayerStart(linear, self.quant, self.adapter, s0, z0, integers, self.generator,
                                             self.init))
        if isinstance(layer, LRQATLinear):
            rtn = QuantLinear.from_linear(linear, self.quant, *grid)
            self.ties += int((layer.int_weight() != rtn.int_weight()).sum())
        return layer
