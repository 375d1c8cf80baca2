"""`lrqat export`: one merged model in, one deployable artifact out, with its size.

Every writer produces its output beside the destination and moves it into place at
the end, so an interrupted export never leaves a half-written artifact behind.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

from lrqat.errors import LrqatError
from lrqat.spec import QuantSpec

FORMATS = ("compressed-tensors", "gguf", "hf-dequantized")


def merged_model_dir(path: Path) -> Path:
    """A run folder (holding `model/`) or the merged model folder itself."""
    path = Path(path)
    for candidate in (path, path / "model"):
        if (candidate / "quantization.json").is_file():
            return candidate
    raise LrqatError(f"{path} is neither an lrqat run folder nor a merged model folder (no quantization.json): run `lrqat quantize` first.")


def folder_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and p.suffix in {".safetensors", ".gguf", ".bin"})


def parameter_counts(model) -> tuple[int, int]:
    """(weights of the quantized layers, all weights) of the model as a float checkpoint holds them."""
    from lrqat.export.tensors import quant_layers, unique_tensors

    quantized = dict(quant_layers(model))
    n_quantized = sum(layer.in_features * layer.out_features for layer in quantized.values())
    prefixes = tuple(f"{name}." for name in quantized)
    rest = sum(t.numel() for k, t in unique_tensors(model.state_dict()).items() if not k.startswith(prefixes) or k.endswith(".bias"))
    return n_quantized, n_quantized + rest


def export(path: Path, fmt: str, output: Path | None = None) -> dict[str, Any]:
    """Export the merged model in `path` (run or model folder) as `fmt`; return a report."""
    if fmt not in FORMATS:
        raise LrqatError(f"unknown export format {fmt!r}: choose one of {', '.join(FORMATS)}.")
    from transformers import AutoTokenizer

    from lrqat.export.native import load_quantized

    source = merged_model_dir(path)
    spec = QuantSpec(**json.loads((source / "quantization.json").read_text())["quant"])
    if fmt == "gguf":
        from lrqat.export.gguf_llama import block_type_for

        block_type_for(spec)  # refuse before loading anything
    model = load_quantized(source)
    tokenizer = AutoTokenizer.from_pretrained(source)
    run_dir = source.parent if source.name == "model" else source
    output = Path(output) if output else run_dir / "export" / fmt
    report: dict[str, Any] = {"format": fmt, "source": str(source), "quant": spec.describe()}
    if fmt == "gguf":
        from lrqat.export.gguf_llama import export_gguf

        target = output if output.suffix == ".gguf" else output / "model.gguf"
        details = export_gguf(model, tokenizer, source, spec, target)
        report.update(dataclasses.asdict(details))
        written = target
    else:
        partial = output.with_name(output.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        if fmt == "compressed-tensors":
            from lrqat.export.compressed import save_compressed_tensors

            report["quantized_layer_bytes"] = save_compressed_tensors(model, tokenizer, partial, spec)
        else:
            from lrqat.export.dequantized import save_dequantized

            save_dequantized(model, tokenizer, partial)
        shutil.rmtree(output, ignore_errors=True)
        partial.rename(output)
        written = output
    size = folder_bytes(written)
    n_quantized, n_all = parameter_counts(model)
    report.update(path=str(written), bytes=size, ratio_to_fp32=size / (4 * n_all), ratio_to_bf16=size / (2 * n_all))
    if "quantized_layer_bytes" in report:
        report["bits_per_quantized_weight"] = 8 * report["quantized_layer_bytes"] / n_quantized
        report["quantized_layers_ratio_to_bf16"] = report["quantized_layer_bytes"] / (2 * n_quantized)
    return report
