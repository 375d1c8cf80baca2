"""Run llama.cpp's own HF → GGUF converter with lrqat's integers substituted (a subprocess).

Started by `gguf_convert.export_gguf_converted` as
`python gguf_convert_driver.py CONVERTER_DIR FLOAT_DIR CODES.pt OUT.gguf BLOCK_TYPE PRE NAME`
with the converter's own `gguf-py` first on the path (the converter and its gguf
package are versioned together; lrqat's process keeps the installed `gguf`).

The converter reads the dequantized float folder and does everything it knows per
family: tensor names, metadata, tokenizer, rotary permutations, fused or split
projections. Two of its steps are wrapped:
- `modify_tensors`: for each quantized weight, the same transform is applied to the
  integer matrix and to its per-block scales (and offsets), so a row permutation or a
  split moves integers and scales together, exactly;
- `gguf_writer.add_tensor`: a quantized weight is written as GGUF blocks packed from
  those integers (Q4_0/Q4_1/Q8_0, `gguf_packing.pack_codes`), every other tensor in the
  smallest type that holds it exactly (`gguf_packing.float_tensor`).
One metadata key is added where the converter leaves llama.cpp to guess (`add_layer_pattern`).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

# families whose llama.cpp graph reads `{arch}.attention.sliding_window_pattern` but whose
# converter does not write it from the config's `layer_types` (llama.cpp then assumes a pattern)
LAYER_PATTERN_ARCHS = ("GEMMA3",)


def add_layer_pattern(model: Any, writer: Any, gguf: Any) -> None:
    """Write which layers use sliding-window attention, from the config's `layer_types`.

    The converter's Gemma 3 writes a sliding window but no layer pattern, and llama.cpp
    then hard-codes Gemma 3's own (five sliding layers, then one global: layer i is global
    iff i % 6 == 5). A config whose `layer_types` say otherwise would get the wrong mask
    and the wrong rotary base on some layers; llama.cpp reads the per-layer list when it
    is there, as the converter writes it for Mellum and EXAONE 4.
    """
    layer_types = model.hparams.get("layer_types")
    key = gguf.Keys.Attention.SLIDING_WINDOW_PATTERN.format(arch=writer.arch)
    if (model.model_arch.name in LAYER_PATTERN_ARCHS and layer_types
            and not any(key in kv for kv in writer.kv_data)):
        writer.add_sliding_window_pattern([kind == "sliding_attention" for kind in layer_types])


def main(converter: str, float_dir: str, quantized: str, out: str, block_type: str, pre_tokenizer: str,
         name: str) -> None:
    sys.path[:] = [converter, str(Path(converter) / "gguf-py"), *sys.path[1:]]  # not this script's folder
    import importlib.util

    import gguf
    import torch
    from conversion import ModelBase, ModelType, get_model_architecture, get_model_class

    # the packing module alone, by its path: not the lrqat package (see gguf_packing)
    spec = importlib.util.spec_from_file_location("gguf_packing", Path(__file__).with_name("gguf_packing.py"))
    packing = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(packing)
    FILE_TYPES, float_tensor, pack_codes = packing.FILE_TYPES, packing.float_tensor, packing.pack_codes

    kind = gguf.GGMLQuantizationType[block_type]
    layers: dict[str, dict[str, torch.Tensor]] = torch.load(quantized, weights_only=True)
    hparams = ModelBase.load_hparams(Path(float_dir), False)
    model_class = get_model_class(get_model_architecture(hparams, ModelType.TEXT), mmproj=False)
    model = model_class(Path(float_dir), gguf.LlamaFileType.ALL_F32, Path(out), eager=True, model_name=name)
    writer = model.gguf_writer
    replacements: dict[str, object] = {}
    original_modify = model.modify_tensors

    def modify(data_torch: torch.Tensor, name: str, bid: int | None):
        results = list(original_modify(data_torch, name, bid))
        layer = layers.get(name)
        if layer is not None:
            parts = {key: [t for _, t in original_modify(value, name, bid)] for key, value in layer.items()}
            for index, (new_name, _) in enumerate(results):
                replacements[new_name] = pack_codes(*(parts[key][index] if key in parts else None
                                                      for key in ("q", "d", "m")), kind)
        return results

    model.modify_tensors = modify
    original_pre = model.get_vocab_base_pre

    def vocab_base_pre(tokenizer) -> str:
        # The converter names a BPE pre-tokenizer by hashing its output on a test text and
        # knows only the hashes of published tokenizers; one rebuilt from a GGUF (the
        # built-in model's) hashes differently, so lrqat's reading of tokenizer.json decides.
        try:
            return original_pre(tokenizer)
        except NotImplementedError:
            return pre_tokenizer

    model.get_vocab_base_pre = vocab_base_pre
    original_add, original_file_type = writer.add_tensor, writer.add_file_type

    def add_tensor(name: str, tensor, raw_shape=None, raw_dtype=None, **kwargs):
        if name in replacements:
            return original_add(name, replacements.pop(name), raw_dtype=kind)
        if raw_dtype == gguf.GGMLQuantizationType.F32 and tensor.dtype.kind == "f":
            data, dtype = float_tensor(torch.from_numpy(tensor.copy()), tensor.ndim == 1)
            return original_add(name, data, raw_dtype=dtype)
        return original_add(name, tensor, raw_shape=raw_shape, raw_dtype=raw_dtype, **kwargs)

    writer.add_tensor = add_tensor
    original_parameters = model.set_gguf_parameters

    def set_gguf_parameters() -> None:
        original_parameters()
        add_layer_pattern(model, writer, gguf)

    model.set_gguf_parameters = set_gguf_parameters
    writer.add_file_type = lambda _ftype: original_file_type(FILE_TYPES[kind])
    writer.add_string("lrqat.export", "gguf")  # marks the file as ours: a later export may replace it
    with torch.inference_mode():
        model.write()
    if replacements:
        raise SystemExit(f"quantized tensors never written: {sorted(replacements)[:3]}")


if __name__ == "__main__":
    main(*sys.argv[1:8])
