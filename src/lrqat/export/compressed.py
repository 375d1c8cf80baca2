"""Export a merged model as a compressed-tensors checkpoint (what vLLM and transformers load).

The trained integers are packed as they are, with the library's own `pack_to_int32`
(dense packing, 32 values in `bits` int32 words): nothing is re-quantized, so the
checkpoint holds exactly the integers and fp32 scales training produced.
compressed-tensors stores integers as signed int8 and dequantizes `(q − zp)·s`; an
asymmetric grid `[0, 2^b)` is shifted by `2^(b−1)` on both `q` and `zp`, which leaves
`q − zp` unchanged.
"""

from __future__ import annotations

from pathlib import Path

import torch
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme
from safetensors.torch import save_file
from torch import nn
from transformers import PreTrainedTokenizerBase

from lrqat.activations import ActSpec
from lrqat.errors import LrqatError
from lrqat.export.tensors import compact_float, quant_layers, save_tokenizer, unquantized_tensors
from lrqat.spec import QuantSpec


def quantization_config(model: nn.Module, spec: QuantSpec, act: ActSpec | None = None) -> dict:
    """The `quantization_config` block of `config.json`, built with the library's classes.

    8-bit activations are written as compressed-tensors' dynamic per-token asymmetric
    int8 input scheme: min–max per token, the grid lrqat trained with (compressed-tensors
    computes the same scale (max − min)/255 and zero point)."""
    weights = QuantizationArgs(
        num_bits=spec.bits,
        type="int",
        symmetric=spec.symmetric,
        strategy="channel" if spec.group_size is None else "group",
        group_size=spec.group_size,
        scale_dtype=torch.float32,
    )
    inputs = None
    if act is not None and act.bits < 16:
        if act.bits != 8:
            raise LrqatError(f"compressed-tensors exports 8-bit activations, not {act.bits}-bit ones.")
        inputs = QuantizationArgs(num_bits=8, type="int", symmetric=False, strategy="token", dynamic=True)
    quantized = {name for name, _ in quant_layers(model)}
    ignore = sorted(n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in quantized)
    config = QuantizationConfig(
        config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=weights, input_activations=inputs,
                                                       format="pack-quantized")},
        format="pack-quantized",
        quantization_status="compressed",
        ignore=ignore,
    )
    return config.to_dict()


def signed_codes(q: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Our grid integers as compressed-tensors' signed int8 (asymmetric grids shifted)."""
    shift = 0 if spec.symmetric else 2 ** (spec.bits - 1)
    return (q - shift).round().to(torch.int8)


def save_compressed_tensors(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase | None, folder: Path, spec: QuantSpec,
    act: ActSpec | None = None,
) -> int:
    """Write `model` (merged: its targets are `QuantLinear`) as a pack-quantized HF folder.

    Returns the bytes the quantized layers take (packed integers, scales, zero points)."""
    if not 1 <= spec.bits <= 8:
        raise LrqatError(f"compressed-tensors packs 1 to 8 bits, not {spec.bits}.")
    layers = quant_layers(model)
    quantized_state = {}
    for name, layer in layers:
        quantized_state[f"{name}.weight_packed"] = pack_to_int32(signed_codes(layer.int_weight(), spec), spec.bits)
        quantized_state[f"{name}.weight_scale"] = layer.scales.float().contiguous()
        quantized_state[f"{name}.weight_shape"] = torch.tensor([layer.out_features, layer.in_features])
        if layer.zeros is not None:
            zp = signed_codes(layer.zeros, spec)
            quantized_state[f"{name}.weight_zero_point"] = pack_to_int32(zp, spec.bits, packed_dim=0)
        if layer.bias is not None:
            quantized_state[f"{name}.bias"] = layer.bias.detach().contiguous()
    rest = {k: compact_float(v) for k, v in unquantized_tensors(model).items()}
    folder.mkdir(parents=True, exist_ok=True)
    config = model.config.__class__.from_dict(model.config.to_dict())
    config.quantization_config = quantization_config(model, spec, act)
    config.save_pretrained(folder)
    if tokenizer is not None:
        save_tokenizer(tokenizer, folder)
    save_file({**rest, **quantized_state}, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return sum(t.numel() * t.element_size() for k, t in quantized_state.items() if not k.endswith(".bias"))
