"""Perplexity over non-overlapping blocks of held-out text.

Each block is scored on its own (no sliding window), as in the paper's protocol with
shorter windows: the first token of a block has no context and is not scored, so a
block of `T` tokens contributes `T − 1` predictions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class Perplexity:
    ppl: float
    nll: float
    tokens: int
    context: int


@dataclass
class NLL:
    """Summed next-token negative log-likelihood over scored windows: every evaluation
    path (in memory, block by block) scores logits the same way."""

    total: float = 0.0
    tokens: int = 0

    def add(self, logits: torch.Tensor, ids: torch.Tensor) -> None:
        logits = logits.float()
        nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum")
        self.total += nll.item()
        self.tokens += ids[:, 1:].numel()

    def perplexity(self, context: int) -> Perplexity:
        mean = self.total / self.tokens
        return Perplexity(ppl=math.exp(mean), nll=mean, tokens=self.tokens, context=context)


@torch.no_grad()
def perplexity(model: nn.Module, blocks: torch.Tensor, batch_size: int = 1) -> Perplexity:
    was_training = model.training
    model.eval()
    total = NLL()
    device = next(model.parameters()).device
    for start in range(0, blocks.shape[0], batch_size):
        ids = blocks[start : start + batch_size].to(device)
        total.add(model(input_ids=ids, use_cache=False).logits, ids)
    model.train(was_training)
    return total.perplexity(int(blocks.shape[1]))


def llama_cpp_perplexity(gguf_path: str, blocks: torch.Tensor, threads: int = 2, cache_type: str = "f16") -> Perplexity:
    """The same measure computed by llama.cpp (llama-cpp-python) on a GGUF file: each block
    in a fresh context, with llama.cpp's own kernels, so an export is judged by its engine.
    `cache_type` is llama.cpp's KV-cache type for K and V (`f16`, `q8_0`, `q4_0`); a
    quantized V cache needs flash attention, which is then switched on."""
    import llama_cpp
    import numpy as np

    kind = getattr(llama_cpp, f"GGML_TYPE_{cache_type.upper()}")
    llm = llama_cpp.Llama(model_path=str(gguf_path), n_ctx=blocks.shape[1], logits_all=True, verbose=False,
                          n_threads=threads, type_k=kind, type_v=kind, flash_attn=cache_type != "f16")
    total = NLL()
    for block in blocks.tolist():
        llm.reset()
        llm.eval(block)
        total.add(torch.tensor(np.array(llm.scores[: len(block)]))[None], torch.tensor(block)[None])
    return total.perplexity(int(blocks.shape[1]))
