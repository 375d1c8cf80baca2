"""Tensor and tokenizer helpers shared by every export format."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from lrqat.export.gguf_packing import exact_in
from lrqat.layers import QuantLinear


def quant_layers(model: nn.Module) -> list[tuple[str, QuantLinear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, QuantLinear)]


def unique_tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop later names of shared storage (tied head = embeddings), keeping the first."""
    seen: set[int] = set()
    out = {}
    for name, tensor in state.items():
        if tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        out[name] = tensor.contiguous()
    return out


def unquantized_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's tensors outside its quantized layers (embeddings, norms, head), each
    stored once: what every format writes as plain tensors beside the packed layers."""
    prefixes = tuple(f"{name}." for name, _ in quant_layers(model))
    return {k: t for k, t in unique_tensors(model.state_dict()).items() if not k.startswith(prefixes)}


def compact_float(tensor: torch.Tensor) -> torch.Tensor:
    """The smallest float dtype (fp16, bf16, else unchanged) that holds `tensor` exactly.

    Unquantized tensors (embeddings, norms) often came from a 16-bit checkpoint: storing
    them in 16 bits halves their size and loses nothing; anything else stays as it is.
    """
    if not tensor.is_floating_point() or tensor.element_size() <= 2:
        return tensor
    for dtype in (torch.float16, torch.bfloat16):
        if exact_in(tensor, dtype):
            return tensor.to(dtype)
    return tensor


def save_tokenizer(tokenizer: PreTrainedTokenizerBase, folder: Path) -> None:
    """`save_pretrained`, plus the SentencePiece model the tokenizer was read from
    (`tokenizer.model`), which transformers 5 no longer writes but llama.cpp's converter
    needs for SentencePiece families (Gemma, Phi-3, Llama 2)."""
    tokenizer.save_pretrained(folder)
    source = getattr(tokenizer, "vocab_file", None)
    if isinstance(source, str) and source.endswith(".model") and Path(source).is_file():
        target = Path(folder) / "tokenizer.model"
        if not target.exists():
            shutil.copyfile(source, target)
