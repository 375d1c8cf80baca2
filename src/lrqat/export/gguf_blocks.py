"""GGUF blocks that hold lrqat's integers exactly, for llama.cpp's converter to write
(`gguf_convert`): the packing, the block type a grid needs, and the smallest exact type
of every float tensor.

GGUF's plain block types hold exactly the integers training produced, one scale per
32 weights in fp16:
- symmetric 4-bit (grid [−8, 7]) → Q4_0, `w = d·(code − 8)`, `code = q + 8`;
- asymmetric 4-bit (grid [0, 15]) → Q4_1, `w = d·code + m` with `m = −d·z`;
- symmetric 8-bit (grid [−128, 127]) → Q8_0, `w = d·q`.
Our scale of a group (or channel) is repeated in each of its 32-blocks, so the group
size must be a multiple of 32 (per-channel needs `in_features % 32 == 0`). The only
loss is rounding scales (and Q4_1's offsets) to fp16; the export measures it.
K-quants tie scales to a super-block grid of their own and cannot hold trained scales
exactly, so other settings (3-bit, asymmetric 8-bit, groups of 16) are refused.

The integers are packed here, block by block; `gguf.quants.quantize` would choose its
own scales and lose the trained ones. Layout changes the converter makes (llama.cpp's
rotary row order for q/k, splits of fused projections) are applied to the integers and
their block scales together, so they stay exact.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import gguf
import torch

from lrqat.errors import LrqatError
from lrqat.export.gguf_packing import BLOCK
from lrqat.export.native import source_model
from lrqat.layers import QuantLinear
from lrqat.spec import QuantSpec

LOSSLESS = "symmetric 4-bit (Q4_0), asymmetric 4-bit (Q4_1) or symmetric 8-bit (Q8_0), per-channel or groups of a multiple of 32"


@dataclasses.dataclass
class GGUFReport:
    """What the export wrote and what it changed: fp16 rounding of scales is its only loss."""

    path: str
    block_type: str
    bytes: int
    quantized_layer_bytes: int
    max_abs_weight_change: float
    max_rel_scale_change: float
    float_tensor_types: dict[str, int]


def block_type_for(spec: QuantSpec) -> gguf.GGMLQuantizationType:
    """The GGUF block type that holds `spec`'s integers exactly, or a clear refusal."""
    if spec.group_size is not None and spec.group_size % BLOCK:
        raise LrqatError(f"GGUF blocks hold 32 weights: group size {spec.group_size} is not a multiple of 32. Lossless GGUF export needs {LOSSLESS}.")
    if spec.bits == 4:
        return gguf.GGMLQuantizationType.Q4_0 if spec.symmetric else gguf.GGMLQuantizationType.Q4_1
    if spec.bits == 8 and spec.symmetric:
        return gguf.GGMLQuantizationType.Q8_0
    raise LrqatError(f"{spec.describe()} has no lossless GGUF block type. Lossless GGUF export needs {LOSSLESS}; use --format compressed-tensors for other settings.")


def block_scales(values: torch.Tensor, in_features: int) -> torch.Tensor:
    """Per-group (or per-channel) values `(out, G)` repeated for every 32-block `(out, in/32)`."""
    return values.repeat_interleave(in_features // BLOCK // values.shape[1], dim=1)


def block_codes(layer: QuantLinear, kind: gguf.GGMLQuantizationType) -> dict[str, torch.Tensor]:
    """A layer's integers `q` (out, in) and, per 32-block, its fp16 scales `d` and (Q4_1)
    offsets `m = −d·z`, all as float tensors: what `pack_codes` packs, and what a row
    permutation or split must move together."""
    q, s, z = layer.int_weight().float(), layer.scales.float(), layer.zeros
    if q.shape[1] % BLOCK:
        raise LrqatError(f"GGUF blocks hold 32 weights: in_features {q.shape[1]} is not a multiple of 32.")
    d = block_scales(s, q.shape[1]).to(torch.float16).float()
    codes = {"q": q, "d": d}
    if kind == gguf.GGMLQuantizationType.Q4_1:
        codes["m"] = (-d * block_scales(z.float(), q.shape[1])).to(torch.float16).float()
    return codes


def pre_tokenizer_name(folder: Path) -> str:
    """llama.cpp's name for the tokenizer's pre-tokenization (how text is split before BPE)."""
    path = folder / "tokenizer.json"
    pre = json.loads(path.read_text()).get("pre_tokenizer") if path.is_file() else None
    if pre and pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"
    return "default"


def model_name(folder: Path) -> str:
    """The model's own name for `general.name`: what the run was started from (a built-in
    name, a hub id, or the name of a local model folder), never a local path, which says
    nothing about the model and shows the user's folders."""
    source = source_model(folder)
    if source is None:
        return "lrqat model"
    path = Path(source).expanduser()
    return path.name if path.is_absolute() or source.startswith((".", "~")) or path.exists() else source
