"""Export a merged Llama-family model as a llama.cpp GGUF file, losslessly where GGUF allows.

GGUF's plain block types hold exactly the integers training produced, one scale per
32 weights in fp16:
- symmetric 4-bit (grid [−8, 7]) → Q4_0, `w = d·(code − 8)`, `code = q + 8`;
- asymmetric 4-bit (grid [0, 15]) → Q4_1, `w = d·code + m` with `m = −d·z`;
- symmetric 8-bit (grid [−128, 127]) → Q8_0, `w = d·q`.
Our scale of a group (or channel) is repeated in each of its 32-blocks, so the group
size must be a multiple of 32 (per-channel needs `in_features % 32 == 0`). The only
loss is rounding scales (and Q4_1's offsets) to fp16; `export_gguf` measures it.
K-quants tie scales to a super-block grid of their own and cannot hold trained scales
exactly, so other settings (3-bit, asymmetric 8-bit, groups of 16) are refused.

The integers are packed here, block by block; `gguf.quants.quantize` would choose its
own scales and lose the trained ones. llama.cpp's rotary layout wants q_proj/k_proj
rows interleaved per head (what its own converter calls `permute`): integer rows and
their scales are permuted together, so the permutation is exact.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import gguf
import numpy as np
import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from lrqat.errors import LrqatError
from lrqat.export.native import source_model
from lrqat.export.tensors import exact_in, quant_layers, unquantized_tensors
from lrqat.layers import QuantLinear
from lrqat.spec import QuantSpec

BLOCK = 32
LLAMA_TYPES = ("llama", "mistral")
FILE_TYPES = {
    gguf.GGMLQuantizationType.Q4_0: gguf.LlamaFileType.MOSTLY_Q4_0,
    gguf.GGMLQuantizationType.Q4_1: gguf.LlamaFileType.MOSTLY_Q4_1,
    gguf.GGMLQuantizationType.Q8_0: gguf.LlamaFileType.MOSTLY_Q8_0,
}
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


def rotary_permutation(rows: int, heads: int) -> torch.Tensor:
    """Row order llama.cpp expects for q/k projections: per head, the halves interleaved."""
    return torch.arange(rows).reshape(heads, 2, rows // heads // 2).transpose(1, 2).reshape(-1)


def block_scales(values: torch.Tensor, in_features: int) -> torch.Tensor:
    """Per-group (or per-channel) values `(out, G)` repeated for every 32-block `(out, in/32)`."""
    return values.repeat_interleave(in_features // BLOCK // values.shape[1], dim=1)


def fp16_bytes(x: torch.Tensor) -> np.ndarray:
    return x.to(torch.float16).contiguous().numpy().view(np.uint8).reshape(*x.shape, 2)


def nibbles(codes: torch.Tensor) -> np.ndarray:
    """`(out, nb, 32)` codes in [0, 16) → `(out, nb, 16)` bytes: element j low, j+16 high."""
    low, high = codes[..., :16], codes[..., 16:]
    return (low | (high << 4)).to(torch.uint8).numpy()


def pack_blocks(layer: QuantLinear, spec: QuantSpec, kind: gguf.GGMLQuantizationType, rows: torch.Tensor | None) -> tuple[np.ndarray, torch.Tensor]:
    """Raw GGUF block bytes `(out, in/32·block_bytes)` and the weight they decode to."""
    q = layer.int_weight()
    s = layer.scales.float()
    z = layer.zeros
    if rows is not None:
        q, s = q[rows], s[rows]
        z = None if z is None else z[rows]
    out_f, in_f = q.shape
    if in_f % BLOCK:
        raise LrqatError(f"GGUF blocks hold 32 weights: in_features {in_f} is not a multiple of 32.")
    nb = in_f // BLOCK
    d = block_scales(s, in_f).to(torch.float16)
    qb = q.reshape(out_f, nb, BLOCK)
    if kind == gguf.GGMLQuantizationType.Q4_0:
        codes = (qb + 8).to(torch.int64)
        parts = [fp16_bytes(d), nibbles(codes)]
        decoded = d.float().unsqueeze(-1) * (codes - 8).float()
    elif kind == gguf.GGMLQuantizationType.Q4_1:
        m = (-d.float() * block_scales(z, in_f)).to(torch.float16)
        codes = qb.to(torch.int64)
        parts = [fp16_bytes(d), fp16_bytes(m), nibbles(codes)]
        decoded = d.float().unsqueeze(-1) * codes.float() + m.float().unsqueeze(-1)
    else:
        parts = [fp16_bytes(d), qb.to(torch.int8).numpy().view(np.uint8)]
        decoded = d.float().unsqueeze(-1) * qb
    raw = np.concatenate(parts, axis=-1).reshape(out_f, -1)
    return raw, decoded.reshape(out_f, in_f)


def float_tensor(tensor: torch.Tensor, vector: bool) -> tuple[np.ndarray, gguf.GGMLQuantizationType]:
    """Store an unquantized tensor in the smallest GGUF type that holds it exactly.

    Q8_0 is tried first: embeddings that came from a Q8_0 file (the built-in model) are
    exactly Q8_0 and stay a quarter of their fp32 size; then F16, BF16, else F32.
    llama.cpp wants 1-D tensors (norms) in F32.
    """
    x = tensor.detach().float().contiguous()
    if vector:
        return x.numpy(), gguf.GGMLQuantizationType.F32
    arr = x.numpy()
    if arr.shape[-1] % BLOCK == 0:
        packed = gguf.quants.quantize(arr, gguf.GGMLQuantizationType.Q8_0)
        if np.array_equal(gguf.quants.dequantize(packed, gguf.GGMLQuantizationType.Q8_0), arr):
            return packed, gguf.GGMLQuantizationType.Q8_0
    if exact_in(x, torch.float16):
        return arr.astype(np.float16), gguf.GGMLQuantizationType.F16
    if exact_in(x, torch.bfloat16):
        return gguf.quants.quantize(arr, gguf.GGMLQuantizationType.BF16), gguf.GGMLQuantizationType.BF16
    return arr, gguf.GGMLQuantizationType.F32


def pre_tokenizer_name(folder: Path) -> str:
    """llama.cpp's name for the tokenizer's pre-tokenization (how text is split before BPE)."""
    path = folder / "tokenizer.json"
    pre = json.loads(path.read_text()).get("pre_tokenizer") if path.is_file() else None
    if pre and pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"
    return "default"


def add_tokenizer(writer: gguf.GGUFWriter, tokenizer: PreTrainedTokenizerBase, folder: Path, vocab_size: int) -> None:
    """A byte-level BPE vocabulary as llama.cpp's `gpt2` tokenizer model."""
    if not tokenizer.is_fast or json.loads(tokenizer.backend_tokenizer.to_str())["model"]["type"] != "BPE":
        raise LrqatError("GGUF export supports byte-level BPE tokenizers (Llama 3, SmolLM, GPT-2 style) only.")
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        token = by_id.get(i, f"[PAD{i}]")
        tokens.append(token)
        if i not in by_id:
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_tokenizer_name(folder))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    gguf.SpecialVocab(folder, load_merges=True, n_vocab=vocab_size).add_to_gguf(writer, quiet=True)


def add_llama_metadata(writer: gguf.GGUFWriter, config, file_type: gguf.LlamaFileType, name: str) -> None:
    rope = getattr(config, "rope_parameters", None) or {}
    scaling = rope.get("rope_type", "default") if rope else (getattr(config, "rope_scaling", None) or {}).get("rope_type", "default")
    if scaling != "default":
        raise LrqatError(f"GGUF export handles plain RoPE only; this model uses rope scaling {scaling!r}.")
    theta = rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    heads = config.num_attention_heads
    writer.add_name(name)
    writer.add_string("lrqat.export", "gguf")  # marks the file as ours: a later export may replace it
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(getattr(config, "head_dim", None) or config.hidden_size // heads)
    writer.add_rope_freq_base(float(theta))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def export_gguf(model: nn.Module, tokenizer: PreTrainedTokenizerBase, folder: Path, spec: QuantSpec, path: Path) -> GGUFReport:
    """Write `model` (merged, Llama family) to `path`; `folder` holds its tokenizer files."""
    config = model.config
    if config.model_type not in LLAMA_TYPES:
        raise LrqatError(f"GGUF export supports Llama-family models ({', '.join(LLAMA_TYPES)}), not {config.model_type!r}.")
    kind = block_type_for(spec)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    writer = gguf.GGUFWriter(None, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    add_llama_metadata(writer, config, FILE_TYPES[kind], model_name(folder))
    add_tokenizer(writer, tokenizer, folder, config.vocab_size)
    heads = {"q_proj": config.num_attention_heads, "k_proj": config.num_key_value_heads}
    max_weight_change = max_scale_change = 0.0
    quantized_bytes = 0
    layers = dict(quant_layers(model))
    for name, layer in layers.items():
        role = name.rsplit(".", 1)[-1]
        rows = rotary_permutation(layer.out_features, heads[role]) if role in heads else None
        raw, decoded = pack_blocks(layer, spec, kind, rows)
        ours = layer.w_hat() if rows is None else layer.w_hat()[rows]
        max_weight_change = max(max_weight_change, (decoded - ours).abs().max().item())
        max_scale_change = max(max_scale_change, ((layer.scales.half().float() - layer.scales) / layer.scales).abs().max().item())
        writer.add_tensor(gguf_name(names, f"{name}.weight"), raw, raw_dtype=kind)
        quantized_bytes += raw.nbytes
        if layer.bias is not None:
            writer.add_tensor(gguf_name(names, f"{name}.bias"), layer.bias.detach().float().numpy())
    float_types: dict[str, int] = {}
    for key, tensor in unquantized_tensors(model).items():
        data, dtype = float_tensor(tensor, tensor.dim() == 1)
        float_types[dtype.name] = float_types.get(dtype.name, 0) + 1
        writer.add_tensor(gguf_name(names, key), data, raw_dtype=dtype)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    writer.write_header_to_file(partial)
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    partial.replace(path)
    return GGUFReport(str(path), kind.name, path.stat().st_size, quantized_bytes, max_weight_change, max_scale_change, float_types)


def model_name(folder: Path) -> str:
    """The model's own name for `general.name`: what the run was started from (a built-in
    name, a hub id, or the name of a local model folder), never a local path, which says
    nothing about the model and shows the user's folders."""
    source = source_model(folder)
    if source is None:
        return "lrqat model"
    path = Path(source).expanduser()
    return path.name if path.is_absolute() or source.startswith((".", "~")) or path.exists() else source


def gguf_name(names: gguf.TensorNameMap, hf_name: str) -> str:
    mapped = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
    if mapped is None:
        raise LrqatError(f"GGUF export does not know where tensor {hf_name!r} goes in a llama.cpp model.")
    return mapped
