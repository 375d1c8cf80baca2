"""GGUF for every family llama.cpp runs, by llama.cpp's own converter.

The converter (`convert_hf_to_gguf.py` and its `conversion` package, with the `gguf-py`
it is versioned with) ships inside the llama-cpp-python source distribution, the same
llama.cpp the tests build; `lrqat setup` fetches it from PyPI once into the cache. It
knows each family's tensor names, metadata, tokenizer (SentencePiece and BPE, added
tokens, chat template) and layout changes; lrqat hands it the dequantized float model
and substitutes its own integers as GGUF blocks (`gguf_convert_driver`), so a new
family costs a test, not a writer. The packing is exact (`gguf_blocks`): the only loss
is fp16 scales.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedTokenizerBase

from lrqat.errors import LrqatError
from lrqat.export.dequantized import save_dequantized
from lrqat.export.gguf_blocks import GGUFReport, block_codes, block_type_for, model_name, pre_tokenizer_name
from lrqat.export.gguf_packing import decode_codes
from lrqat.export.tensors import quant_layers
from lrqat.models import cache_root
from lrqat.spec import QuantSpec

SDIST = "llama-cpp-python==0.3.36"  # the llama.cpp whose converter (and runtime) lrqat uses
MEMBERS = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/")


def converter_dir() -> Path:
    return cache_root() / "llama.cpp-converter" / SDIST.replace("==", "-")


def fetch_converter() -> Path:
    """llama.cpp's converter from the llama-cpp-python sdist on PyPI (once, ~75 MB download)."""
    target = converter_dir()
    if (target / "convert_hf_to_gguf.py").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        proc = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                               SDIST, "-d", tmp], capture_output=True, text=True, check=False)
        archives = list(Path(tmp).glob("*.tar.gz"))
        if proc.returncode != 0 or not archives:
            raise LrqatError(f"could not fetch llama.cpp's converter ({SDIST} sdist from PyPI): "
                             f"{(proc.stderr or '').strip().splitlines()[-1:] or 'no archive'}; GGUF export of "
                             "non-Llama families needs it (Llama and Mistral export without it).")
        staging = Path(tmp) / "converter"
        with tarfile.open(archives[0]) as archive:
            for member in archive.getmembers():
                _, _, inner = member.name.partition("/vendor/llama.cpp/")
                if inner and inner.startswith(MEMBERS) and (member.isfile() or member.isdir()):
                    member.name = inner
                    archive.extract(member, staging, filter="data")
        if not (staging / "convert_hf_to_gguf.py").is_file():
            raise LrqatError(f"the {SDIST} sdist holds no convert_hf_to_gguf.py.")
        os.replace(staging, target)
    return target


def converter_architectures() -> set[str]:
    """The model classes (`architectures` in a config) llama.cpp's converter writes."""
    source = (fetch_converter() / "conversion" / "__init__.py").read_text()
    table = source[source.index("TEXT_MODEL_MAP"):]
    return set(re.findall(r'^\s*"(\w+)":\s*"\w+"', table[: table.index("}")], re.MULTILINE))


def check_gguf_architecture(config: PretrainedConfig, model_class: str | None = None) -> None:
    """Refuse, in one line, a model whose architecture llama.cpp's converter lacks, or
    whose config llama.cpp's graph for it would compute differently."""
    names = getattr(config, "architectures", None) or ([model_class] if model_class else [])
    if names and not any(name in converter_architectures() for name in names):
        raise LrqatError(f"llama.cpp has no {names[0]} (its converter does not know this architecture), so there is "
                         "no GGUF of it: export compressed-tensors or hf-dequantized instead.")
    check_gemma3_attention_scale(config)


def llama_cpp_gemma3_scale_dim(text: PretrainedConfig) -> int:
    """The d in llama.cpp's Gemma 3 attention scale 1/sqrt(d): it reads no
    `query_pre_attn_scalar` but hard-codes the published models' values, head_dim, or
    hidden_size // heads for the 62-layer 27B (`src/models/gemma3.cpp`)."""
    if text.num_hidden_layers == 62:
        return text.hidden_size // text.num_attention_heads
    return text.head_dim


def check_gemma3_attention_scale(config: PretrainedConfig) -> None:
    """Refuse a Gemma 3 whose `query_pre_attn_scalar` is not what llama.cpp assumes: its
    GGUF would load and run with attention logits scaled wrongly, with no error anywhere
    (transformers scales by query_pre_attn_scalar**-0.5, llama.cpp by 1/sqrt(head_dim))."""
    text = config.get_text_config()
    if getattr(text, "model_type", None) != "gemma3_text":
        return
    scalar, dim = text.query_pre_attn_scalar, llama_cpp_gemma3_scale_dim(text)
    if scalar != dim:
        raise LrqatError(f"llama.cpp's Gemma 3 scales attention by 1/sqrt({dim}) and ignores query_pre_attn_scalar "
                         f"({scalar} here), so its GGUF would compute other logits: export compressed-tensors or "
                         "hf-dequantized instead.")


def export_gguf(model: nn.Module, tokenizer: PreTrainedTokenizerBase, folder: Path, spec: QuantSpec, path: Path
                ) -> GGUFReport:
    """Write the merged `model` to `path` through llama.cpp's converter; `folder` is the
    saved model it came from (its source names the GGUF's `general.name`)."""
    kind = block_type_for(spec)
    converter = fetch_converter()
    check_gguf_architecture(model.config, type(model).__name__)
    codes, max_weight_change, max_scale_change, quantized_bytes = {}, 0.0, 0.0, 0
    for name, layer in quant_layers(model):
        layer_codes = block_codes(layer, kind)
        decoded = decode_codes(layer_codes["q"], layer_codes["d"], layer_codes.get("m"))
        max_weight_change = max(max_weight_change, (decoded - layer.w_hat().float()).abs().max().item())
        scales = layer.scales.float()
        max_scale_change = max(max_scale_change, ((scales.half().float() - scales) / scales).abs().max().item())
        codes[f"{name}.weight"] = layer_codes
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        float_dir = save_dequantized(model, tokenizer, Path(tmp) / "float")
        torch.save(codes, Path(tmp) / "codes.pt")
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[2]),
                                                           os.environ.get("PYTHONPATH", "")])}
        # run as a script, not `-m`: importing the lrqat package first would import the installed gguf
        proc = subprocess.run([sys.executable, str(Path(__file__).with_name("gguf_convert_driver.py")), str(converter), str(float_dir),
                               str(Path(tmp) / "codes.pt"), str(partial), kind.name, pre_tokenizer_name(float_dir), model_name(folder)],
                              capture_output=True, text=True, check=False, env=env)
    if proc.returncode != 0:
        partial.unlink(missing_ok=True)
        reason = (proc.stderr.strip().splitlines() or ["no message"])[-1]
        raise LrqatError(f"llama.cpp's converter could not write {model.config.model_type!r} as GGUF ({reason}); "
                         "use --format compressed-tensors or hf-dequantized for this model.")
    partial.replace(path)
    from lrqat.export.gguf_read import FastGGUFReader

    reader = FastGGUFReader(path)
    types: dict[str, int] = {}
    for tensor in reader.tensors:
        if tensor.tensor_type != kind:
            types[tensor.tensor_type.name] = types.get(tensor.tensor_type.name, 0) + 1
        else:
            quantized_bytes += int(tensor.n_bytes)
    return GGUFReport(str(path), kind.name, path.stat().st_size, quantized_bytes, max_weight_change, max_scale_change,
                      types)
