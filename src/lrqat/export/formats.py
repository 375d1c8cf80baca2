"""`lrqat export`: one merged model in, one deployable artifact out, with its size.

Every writer produces its output beside the destination and moves it into place at
the end, so an interrupted export never leaves a half-written artifact behind.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from lrqat.activations import ActSpec
from lrqat.errors import LrqatError
from lrqat.rotation import RotationRecord
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


def check_exportable(formats: list[str], spec: QuantSpec, act: ActSpec | None = None,
                     rotation: RotationRecord | None = None) -> None:
    """Refuse formats that cannot hold the model exactly (its grid, its activation/KV
    quantizers, its online rotations), before anything is loaded, naming what does export."""
    formats = parse_choices(",".join(formats), FORMATS, "export format") if formats else []
    act, rotation = act or ActSpec(), rotation or RotationRecord()
    online = [what for what, on in (("the online down_proj rotation (R4)", rotation.online_down_proj),
                                    ("the online Q/K rotation (R3)", rotation.online_qk)) if on]
    for fmt in formats:
        if online:
            raise LrqatError(f"{fmt} cannot hold {' and '.join(online)}: a rotated model exports when its "
                             "activations and KV cache stay float (--act-bits 16 --kv-bits 16: R1/R2 live in the "
                             "weights), or quantize activations without --rotate.")
    if "gguf" in formats:
        from lrqat.export.gguf_blocks import block_type_for

        block_type_for(spec)
        if act.bits < 16:
            raise LrqatError(f"gguf cannot hold {act.bits}-bit activations (llama.cpp quantizes no activations): "
                             "export compressed-tensors for A8, or quantize with --act-bits 16.")
    if "compressed-tensors" in formats:
        if act.bits == 4:
            raise LrqatError("compressed-tensors exports 8-bit activations (dynamic per-token int8, which vLLM runs), "
                             "not 4-bit ones: quantize with --act-bits 8 or 16.")
        if act.kv_bits < 16:
            raise LrqatError(f"compressed-tensors has no dynamic per-token {act.kv_bits}-bit KV-cache scheme: export "
                             "gguf (llama.cpp's own q8_0/q4_0 cache) or quantize with --kv-bits 16.")
    if "hf-dequantized" in formats and act.active:
        raise LrqatError(f"hf-dequantized is a plain float checkpoint and would drop the {act.describe()} quantizers: "
                         "export compressed-tensors (A8) or gguf, or quantize with --act-bits 16 --kv-bits 16.")


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


def export(path: Path, fmt: str, output: Path | None = None, force: bool = False) -> dict[str, Any]:
    """Export the merged model in `path` (run or model folder) as `fmt`; return a report."""
    return export_many(path, [fmt], output, force)[0]


def export_many(path: Path, formats: list[str], output: Path | None = None, force: bool = False) -> list[dict[str, Any]]:
    """Export the merged model in `path` in each of `formats`, loading it once.

    `output` (one destination) needs a single format; by default each goes to
    RUN/export/FORMAT. Settings GGUF cannot hold exactly, and destinations an export
    could lose files in (an existing folder that is not an earlier export of the same
    format, unless `force`; never a run folder, a folder above the model, or home) are
    refused before loading.
    """
    formats = parse_choices(",".join(formats), FORMATS, "export format")
    if output is not None and len(formats) > 1:
        raise LrqatError("--output names one destination: export one format at a time, or leave --output out.")
    from lrqat.export.native import load_quantized, read_grid, read_online
    from lrqat.models import load_tokenizer

    source = merged_model_dir(path)
    spec = read_grid(source)
    act, rotation = read_online(source)
    check_exportable(formats, spec, act, rotation)
    run_dir = RunDir(source.parent if source.name == "model" else source)
    destinations = {fmt: Path(output).expanduser() if output else run_dir.export(fmt) for fmt in formats}
    for fmt, destination in destinations.items():
        check_destination(fmt, destination, source, force)
    model = load_quantized(source)
    tokenizer = load_tokenizer(source)
    n_quantized, n_all = parameter_counts(model)
    reports = []
    for fmt, destination in destinations.items():
        report: dict[str, Any] = {"format": fmt, "source": str(source), "quant": spec.describe()}
        if act.active:
            report["act"] = act.describe()
        written = write_format(fmt, model, tokenizer, source, spec, destination, report, act)
        size = folder_bytes(written)
        report.update(path=str(written), bytes=size, ratio_to_fp32=size / (4 * n_all), ratio_to_bf16=size / (2 * n_all))
        if "quantized_layer_bytes" in report:
            report["bits_per_quantized_weight"] = 8 * report["quantized_layer_bytes"] / n_quantized
            report["quantized_layers_ratio_to_bf16"] = report["quantized_layer_bytes"] / (2 * n_quantized)
        reports.append(report)
    return reports


MARKER = ".lrqat-export.json"
"""Written into every folder an export creates: what kind of export it holds, so a later
export may replace it (and nothing else) without --force."""


def earlier_export(path: Path, fmt: str) -> bool:
    """True if `path` is an export of format `fmt` that lrqat wrote (safe to replace)."""
    try:
        return json.loads((path / MARKER).read_text()).get("format") == fmt
    except (OSError, ValueError, AttributeError):
        return False


def protected_reason(destination: Path, source: Path) -> str | None:
    """Why `destination` must never be replaced by an export, even with --force: the home
    or root folder, the merged model or its run, a folder above them, or another run."""
    dest = destination.expanduser().resolve()
    src = source.resolve()
    if dest in (Path.home().resolve(), Path(dest.anchor)):
        return "it is your home or the root folder"
    if dest == src or dest in src.parents:
        return f"it holds the merged model being exported ({source})"
    if dest.is_dir() and (RunDir(dest).holds_run() or RunDir(dest).results.exists() or (dest / "quantization.json").exists()):
        return "it is an lrqat run or merged model folder"
    return None


def earlier_gguf(path: Path) -> bool:
    """True if `path` is a GGUF file lrqat wrote (it carries the `lrqat.export` key)."""
    from lrqat.export.gguf_read import FastGGUFReader

    try:
        return "lrqat.export" in FastGGUFReader(path).fields
    except Exception:  # noqa: BLE001 - any unreadable file is simply not ours
        return False


def check_destination(fmt: str, destination: Path, source: Path, force: bool) -> None:
    """Refuse, before anything is written, a destination an export could lose files in."""
    if fmt == "gguf" and destination.suffix == ".gguf":
        if destination.is_dir():
            raise LrqatError(f"gguf export destination {destination} is a folder: name a .gguf file, or a folder without .gguf.")
        if destination.exists() and not force and not earlier_gguf(destination):
            raise LrqatError(f"{destination} exists and is not an earlier lrqat GGUF export: choose another --output, "
                             "or pass --force to replace it.")
        return
    reason = protected_reason(destination, source)
    if reason is not None:
        raise LrqatError(f"will not export {fmt} into {destination}: {reason}. Choose another --output.")
    if destination.is_file() and fmt != "gguf":
        raise LrqatError(f"{fmt} export destination {destination} is a file: choose a folder with --output.")
    exists = destination.exists() and not (destination.is_dir() and not any(destination.iterdir()))
    if exists and not force and not earlier_export(destination, fmt):
        raise LrqatError(
            f"{destination} exists and is not an earlier lrqat {fmt} export: choose another --output, "
            "or pass --force to replace it."
        )


def replace_with(staging: Path, destination: Path) -> None:
    """Move the finished `staging` folder to `destination`; an existing destination (already
    checked) is moved aside first and deleted only once the new one is in place."""
    old = None
    if destination.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{destination.name}.old-", dir=destination.parent))
        old.rmdir()
        destination.rename(old)
    staging.rename(destination)
    if old is not None:
        if old.is_dir():
            shutil.rmtree(old)
        else:
            old.unlink()


LLAMA_CPP_CACHE_TYPES = {8: "q8_0", 4: "q4_0"}


def add_cache_types(report: dict[str, Any], act: ActSpec | None) -> None:
    """A KV-quantized model runs in llama.cpp with its own cache types (blocks of 32
    values, one scale each), the nearest it has to lrqat's per-token grid: name them."""
    if act is not None and act.kv_bits < 16:
        kind = LLAMA_CPP_CACHE_TYPES[act.kv_bits]
        report["llama_cpp_cache"] = {"type_k": kind, "type_v": kind,
                                     "flags": f"--cache-type-k {kind} --cache-type-v {kind} --flash-attn on"}


def write_format(fmt: str, model, tokenizer, source: Path, spec: QuantSpec, output: Path,
                 report: dict[str, Any], act: ActSpec | None = None) -> Path:
    """Write one format to `output` (a fresh folder beside it, renamed into place at the
    end); add what the writer measured to `report`. The destination was checked."""
    gguf_file = fmt == "gguf" and output.suffix == ".gguf"
    destination = output.parent if gguf_file else output
    destination.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{destination.name}.partial-", dir=destination.parent))
    try:
        if fmt == "gguf":
            from lrqat.export.gguf_convert import export_gguf

            if gguf_file:  # a single file: written beside its destination, then renamed over it
                gguf_report = export_gguf(model, tokenizer, source, spec, staging / output.name)
                (staging / output.name).replace(output)
                shutil.rmtree(staging)
                report.update(dataclasses.asdict(gguf_report), path=str(output))
                add_cache_types(report, act)
                return output
            report.update(dataclasses.asdict(export_gguf(model, tokenizer, source, spec, staging / "model.gguf")))
            add_cache_types(report, act)
        elif fmt == "compressed-tensors":
            from lrqat.export.compressed import save_compressed_tensors

            report["quantized_layer_bytes"] = save_compressed_tensors(model, tokenizer, staging, spec, act)
        else:
            from lrqat.export.dequantized import save_dequantized

            save_dequantized(model, tokenizer, staging)
        (staging / MARKER).write_text(json.dumps({"format": fmt, "source": str(source)}) + "\n")
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    replace_with(staging, destination)
    return destination / "model.gguf" if fmt == "gguf" else destination
