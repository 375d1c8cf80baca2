"""lrqat's own checkpoint of a merged integer model: what `lrqat` reloads itself.

A folder with the model's `config.json`, its tokenizer, `model.safetensors` and
`quantization.json`. Each quantized linear `NAME` is stored as plain data:
- `NAME.qweight` uint8 `(out, in/2)` for b ≤ 4, else `(out, in)`: codes `q − qmin`,
  element 2k in the low nibble and 2k+1 in the high nibble of byte k;
- `NAME.scales` float32 `(out, in/g)`; `NAME.zeros` float32 integer values
  (asymmetric grids only); `NAME.bias` if the layer has one.
Everything else (embeddings, norms, head) is stored as float, as it was trained.
`quantization.json` also records what the forward pass applies beyond the weights: the
activation/KV bit widths (`act`) and the online rotations (`rotation`); R1/R2 rotations
are already in the weights. `load_quantized` installs them again.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedTokenizerBase
from transformers.initialization import no_init_weights

from lrqat.activations import ActSpec
from lrqat.checkpoint import atomic_write_text
from lrqat.errors import LrqatError
from lrqat.export.tensors import quant_layers, save_tokenizer, unique_tensors
from lrqat.layers import QuantLinear
from lrqat.models import load_config
from lrqat.online import apply_online
from lrqat.rotation import RotationRecord
from lrqat.spec import QuantSpec
from lrqat.surgery import replace_module

FORMAT = "lrqat-int"
FORMAT_VERSION = 1


def save_quantized(model: nn.Module, tokenizer: PreTrainedTokenizerBase | None, folder: Path, spec: QuantSpec,
                   source: str | None = None, act: ActSpec | None = None, rotation: RotationRecord | None = None) -> Path:
    """Write a merged model (its target linears already `QuantLinear`) to `folder`;
    `source` is the model the run started from (a built-in name, hub id or folder);
    `act` and `rotation` what its forward applies beyond the weights."""
    layers = quant_layers(model)
    if not layers:
        raise ValueError("the model has no QuantLinear layers: merge it before saving")
    folder.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(folder)  # (its attention implementation is not serialised)
    if tokenizer is not None:
        save_tokenizer(tokenizer, folder)
    save_file(unique_tensors(model.state_dict()), str(folder / "model.safetensors"), metadata={"format": "pt"})
    meta = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "quant": dataclasses.asdict(spec),
        "layers": [name for name, _ in layers],
        "source_model": source,
        "act": dataclasses.asdict(act or ActSpec()),
        "rotation": dataclasses.asdict(rotation or RotationRecord()),
    }
    atomic_write_text(folder / "quantization.json", json.dumps(meta, indent=2))
    return folder


def read_meta(model_dir: Path) -> dict:
    """A merged model's `quantization.json`, refused clearly when missing or damaged."""
    path = Path(model_dir) / "quantization.json"
    if not path.is_file():
        raise LrqatError(f"{model_dir} holds no quantization.json: it is not a merged lrqat model.")
    try:
        meta = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise LrqatError(f"{path} is damaged ({err}): re-run or re-export the model.") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("quant"), dict) or not isinstance(meta.get("layers"), list):
        raise LrqatError(f"{path} is damaged (not the structure lrqat writes): re-run or re-export the model.")
    if meta.get("format") != FORMAT:
        raise LrqatError(f"{path} has format {meta.get('format')!r}, expected {FORMAT!r}.")
    return meta


def source_model(model_dir: Path) -> str | None:
    """The model a merged model was quantized from, as its run named it (None if unrecorded)."""
    return read_meta(model_dir).get("source_model")


def read_grid(model_dir: Path) -> QuantSpec:
    """The integer grid recorded in a merged model's `quantization.json` (files written
    before the grid and the PTQ options were separated also held `init`, `act_order`,
    `damp`: those are not part of the grid and are ignored)."""
    raw = read_meta(model_dir)["quant"]
    return QuantSpec(**{f.name: raw[f.name] for f in dataclasses.fields(QuantSpec) if f.name in raw})


def read_online(model_dir: Path) -> tuple[ActSpec, RotationRecord]:
    """The activation/KV bits and online rotations a merged model's forward applies
    (models written before these existed: none)."""
    meta = read_meta(model_dir)
    raw = meta.get("act") or {}
    act = ActSpec(**{f.name: raw[f.name] for f in dataclasses.fields(ActSpec) if f.name in raw})
    try:
        act.validate()
    except LrqatError as err:
        raise LrqatError(f"{Path(model_dir) / 'quantization.json'} is damaged ({err})") from None
    return act, RotationRecord.from_dict(meta.get("rotation"))


def load_quantized(folder: Path) -> nn.Module:
    """Rebuild the integer model written by `save_quantized`."""
    folder = Path(folder)
    meta = read_meta(folder)
    spec = read_grid(folder)
    config = load_config(str(folder))
    # Uninitialised float weights are never touched (so never resident): the quantized
    # layers replace them and everything else is assigned from the file.
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    try:
        state = load_file(str(folder / "model.safetensors"))
    except (SafetensorError, OSError) as err:
        raise LrqatError(f"{folder / 'model.safetensors'} is unreadable ({err}): re-export the model.") from None
    absent = [f"{name}.{part}" for name in meta["layers"] for part in ("qweight", "scales") if f"{name}.{part}" not in state]
    if absent:
        raise LrqatError(f"{folder / 'model.safetensors'} lacks {len(absent)} tensors of its quantized layers "
                         f"(first: {absent[0]}): re-export the model.")
    for name in meta["layers"]:
        linear = model.get_submodule(name)
        out_f, in_f = linear.weight.shape
        groups = state[f"{name}.scales"].shape[1]
        zeros = torch.zeros(out_f, groups) if f"{name}.zeros" in state else None
        shell = QuantLinear(spec, torch.zeros(out_f, in_f), torch.ones(out_f, groups), zeros, linear.bias)
        replace_module(model, name, shell)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    tied = {k for k in missing if k.endswith("lm_head.weight") and getattr(config, "tie_word_embeddings", False)}
    if set(missing) - tied or unexpected:
        raise LrqatError(f"{folder} does not match its config: missing {sorted(set(missing) - tied)[:5]}, unexpected {unexpected[:5]}.")
    model.tie_weights()
    act, rotation = read_online(folder)
    apply_online(model, act, rotation, meta["layers"])
    model.eval()
    return model
