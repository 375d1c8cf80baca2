"""`lrqat export`: one merged model in, one deployable artifact out, with its size.

Every writer produces its output beside the destination and moves it into place at
the end, so an interrupted export never leaves a half-written artifact behind.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from typing import Any

from lrqat.errors import LrqatError
from lrqat.rundir import RunDir
from lrqat.spec import EXPORT_FORMATS as FORMATS
from lrqat.spec import QuantSpec, parse_choices


def merged_model_dir(path: Path) -> Path:
    """A run folder (holding `model/`) or the merged model folder itself."""
    path = Path(path)
    for candidate in (path, path / "model"):
        if (candidate / "quantization.json").is_file():
            return candidate
    raise LrqatError(f"{path} is neither an lrqat run folder nor a merged model folder (no quantization.json): run `lrqat quantize` first.")


def check_exportable(formats: list[str], spec: QuantSpec) -> None:
    """Refuse formats that cannot hold `spec`'s grid exactly, before anything is loaded."""
    formats = parse_choices(",".join(formats), FORMATS, "export format") if formats else []
    if "gguf" in formats:
        from lrqat.export.gguf_llama import block_type_for

        block_type_for(spec)


def folder_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and p.suffix in {".safetensors", ".gguf", ".bin"})


def parameter_counts(model) -> tuple[int, int]:
    """(weights of the quantized layers, all weights) of the model as a float checkpoint holds them."""
    from lrqat.export.tensors import quant_layers, unquantized_tensors

    layers = [layer for _, layer in quant_layers(model)]
    n_quantized = sum(layer.in_features * layer.out_features for layer in layers)
    biases = sum(layer.bias.numel() for layer in layers if layer.bias is not None)
    rest = sum(t.numel() for t in unquantized_tensors(model).values())
    return n_quantized, n_quantized + biases + rest


def export(path: Path, fmt: str, output: Path | None = None) -> dict[str, Any]:
    """Export the merged model in `path` (run or model folder) as `fmt`; return a report."""
    return export_many(path, [fmt], output)[0]


def export_many(path: Path, formats: list[str], output: Path | None = None) -> list[dict[str, Any]]:
    """Export the merged model in `path` in each of `formats`, loading it once.

    `output` (one destination) needs a single format; by default each goes to
    RUN/export/FORMAT. Settings GGUF cannot hold exactly are refused before loading.
    """
    formats = parse_choices(",".join(formats), FORMATS, "export format")
    if output is not None and len(formats) > 1:
        raise LrqatError("--output names one destination: export one format at a time, or leave --output out.")
    from transformers import AutoTokenizer

    from lrqat.export.native import load_quantized, read_grid

    source = merged_model_dir(path)
    spec = read_grid(source)
    check_exportable(formats, spec)
    model = load_quantized(source)
    tokenizer = AutoTokenizer.from_pretrained(source)
    run_dir = RunDir(source.parent if source.name == "model" else source)
    n_quantized, n_all = parameter_counts(model)
    reports = []
    for fmt in formats:
        destination = Path(output) if output else run_dir.export(fmt)
        report: dict[str, Any] = {"format": fmt, "source": str(source), "quant": spec.describe()}
        written = write_format(fmt, model, tokenizer, source, spec, destination, report)
        size = folder_bytes(written)
        report.update(path=str(written), bytes=size, ratio_to_fp32=size / (4 * n_all), ratio_to_bf16=size / (2 * n_all))
        if "quantized_layer_bytes" in report:
            report["bits_per_quantized_weight"] = 8 * report["quantized_layer_bytes"] / n_quantized
            report["quantized_layers_ratio_to_bf16"] = report["quantized_layer_bytes"] / (2 * n_quantized)
        reports.append(report)
    return reports


def write_format(fmt: str, model, tokenizer, source: Path, spec: QuantSpec, output: Path,
                 report: dict[str, Any]) -> Path:
    """Write one format to `output` (atomically); add what the writer measured to `report`."""
    if fmt == "gguf":
        from lrqat.export.gguf_llama import export_gguf

        target = output if output.suffix == ".gguf" else output / "model.gguf"
        report.update(dataclasses.asdict(export_gguf(model, tokenizer, source, spec, target)))
        return target
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
    return output
