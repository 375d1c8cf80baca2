"""Training data as a `BlockSource`: packed blocks in memory, or a stream of them.

The trainer asks a block source for the blocks of optimizer step `k` and nothing else,
so it does not care where they come from. Both sources are pure functions of (source,
seed, step): a resumed run reads the same blocks, and N processes with the same global
batch read the same blocks as one.

`PackedBlocks`: the training text tokenised and packed once, drawn by a seeded
permutation per epoch. `TokenStream` (corpora larger than memory): files are read one document at a time, tokenised as they are reached and cut into
blocks; a seeded shuffle buffer mixes nearby blocks. Nothing but the buffer is held.
The stream is a pure function of (source, seed): the blocks of step `k` are blocks
`k·B … (k+1)·B − 1` of it, so a resumed run replays the stream up to its step (reading
costs time, not memory) and continues exactly where it stopped. Evaluation documents
(chosen by hash of their id, as in memory mode) never enter the training stream.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from transformers import PreTrainedTokenizerBase

from lrqat.data import (
    document_token_ids,
    is_eval_document,
    iter_documents,
    load_documents,
    pack_blocks,
    split_documents,
)
from lrqat.errors import LrqatError


@runtime_checkable
class BlockSource(Protocol):
    """Where the trainer's token blocks come from."""

    seq_len: int

    def batch(self, step: int, global_batch: int) -> torch.Tensor:
        """The `(global_batch, seq_len)` blocks of optimizer step `step`."""

    def first(self, n: int) -> torch.Tensor:
        """`n` blocks for calibration, without moving the source."""

    def describe(self) -> str:
        """A few words for the log."""


def step_indices(step: int, n_blocks: int, global_batch: int, seed: int) -> torch.Tensor:
    """The block indices of one optimizer step: epochs of a seeded permutation."""
    steps_per_epoch = max(1, n_blocks // global_batch)
    epoch, offset = divmod(step, steps_per_epoch)
    perm = torch.randperm(n_blocks, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    positions = torch.arange(offset * global_batch, (offset + 1) * global_batch) % n_blocks
    return perm[positions]


class PackedBlocks:
    """Blocks `(n, seq_len)` held in memory, drawn in seeded epochs (`step_indices`)."""

    def __init__(self, blocks: torch.Tensor, seed: int = 0) -> None:
        self.blocks, self.seed = blocks, seed
        self.seq_len = int(blocks.shape[1])

    def batch(self, step: int, global_batch: int) -> torch.Tensor:
        return self.blocks[step_indices(step, self.blocks.shape[0], global_batch, self.seed)]

    def first(self, n: int) -> torch.Tensor:
        return self.blocks[:n]

    def describe(self) -> str:
        return f"{self.blocks.shape[0]} train blocks of {self.seq_len}"


class TokenStream:
    """Training blocks of `seq_len` tokens, drawn in order from a lazily read corpus."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, source: str, seq_len: int, eval_fraction: float,
                 seed: int = 0, shuffle_buffer: int = 256) -> None:
        self.tokenizer, self.source, self.seq_len = tokenizer, source, seq_len
        self.eval_fraction, self.seed, self.shuffle_buffer = eval_fraction, seed, shuffle_buffer
        self._blocks: Iterator[torch.Tensor] | None = None
        self._position = 0

    def _epoch_blocks(self) -> Iterator[torch.Tensor]:
        docs = (d for d in iter_documents(self.source) if d.text.strip() and not is_eval_document(d.id, self.eval_fraction))
        ids: list[int] = []
        for doc_ids in document_token_ids(self.tokenizer, docs):
            ids.extend(doc_ids)
            while len(ids) >= self.seq_len:
                yield torch.tensor(ids[: self.seq_len], dtype=torch.long)
                ids = ids[self.seq_len :]

    def _shuffled(self) -> Iterator[torch.Tensor]:
        epoch = 0
        while True:
            rng = random.Random(self.seed * 100_003 + epoch)
            buffer: list[torch.Tensor] = []
            produced = 0
            for block in self._epoch_blocks():
                buffer.append(block)
                if len(buffer) >= self.shuffle_buffer:
                    yield buffer.pop(rng.randrange(len(buffer)))
                    produced += 1
            rng.shuffle(buffer)
            produced += len(buffer)
            yield from buffer
            if produced == 0:
                raise LrqatError(f"data source {self.source!r} holds no training text of {self.seq_len} tokens.")
            epoch += 1

    def batch(self, step: int, global_batch: int) -> torch.Tensor:
        """The `(global_batch, seq_len)` blocks of optimizer step `step`."""
        start = step * global_batch
        if self._blocks is None or self._position > start:
            self._blocks, self._position = self._shuffled(), 0
        while self._position < start:  # replay after a resume
            next(self._blocks)
            self._position += 1
        out = torch.stack([next(self._blocks) for _ in range(global_batch)])
        self._position += global_batch
        return out

    def first(self, n: int) -> torch.Tensor:
        """The first `n` blocks (calibration data), without moving the stream."""
        return TokenStream(self.tokenizer, self.source, self.seq_len, self.eval_fraction, self.seed,
                           self.shuffle_buffer).batch(0, n)

    def describe(self) -> str:
        return f"streaming train blocks of {self.seq_len}"


def stream_eval_blocks(tokenizer: PreTrainedTokenizerBase, source: str, eval_context: int, eval_tokens: int,
                       eval_fraction: float) -> torch.Tensor:
    """Eval blocks from the evaluation documents, reading only until `eval_tokens` are found."""
    docs = (d for d in iter_documents(source) if d.text.strip() and is_eval_document(d.id, eval_fraction))
    first = next(docs, None)
    if first is None:
        raise LrqatError(f"data source {source!r} has no evaluation document: streaming splits whole documents (files, "
                         "or .jsonl lines) by a hash of their id, so it needs many of them; use more documents.")
    return pack_blocks(tokenizer, itertools.chain([first], docs), eval_context, eval_tokens)


@dataclass
class TokenData:
    train: BlockSource  # blocks in memory, or a lazily read stream of them
    eval: torch.Tensor

    def describe(self) -> str:
        return f"{self.train.describe()}, {self.eval.shape[0]} eval blocks of {self.eval.shape[1]}"


def prepare_data(
    tokenizer: PreTrainedTokenizerBase,
    source: str,
    seq_len: int,
    eval_context: int,
    eval_tokens: int,
    eval_fraction: float,
    max_train_tokens: int | None = None,
    seed: int = 0,
) -> TokenData:
    """Train blocks of `seq_len` and eval blocks of `eval_context` from disjoint documents.

    Training documents are shuffled by `seed` first, so a token budget smaller than the
    corpus still samples all of it (the Brown files are ordered by genre).
    """
    train_docs, eval_docs = split_documents(load_documents(source), eval_fraction)
    random.Random(seed).shuffle(train_docs)
    eval_blocks = pack_blocks(tokenizer, eval_docs, eval_context, eval_tokens)
    train_blocks = pack_blocks(tokenizer, train_docs, seq_len, max_train_tokens)
    return TokenData(train=PackedBlocks(train_blocks, seed), eval=eval_blocks)


def load_token_data(
    tokenizer: PreTrainedTokenizerBase, source: str, seq_len: int, eval_context: int, eval_tokens: int,
    eval_fraction: float, max_train_tokens: int | None, seed: int, streaming: bool,
) -> TokenData:
    """The run's data: packed in memory, or with `streaming` read lazily (same split)."""
    if not streaming:
        return prepare_data(tokenizer, source, seq_len, eval_context, eval_tokens, eval_fraction, max_train_tokens, seed)
    return TokenData(train=TokenStream(tokenizer, source, seq_len, eval_fraction, seed),
                     eval=stream_eval_blocks(tokenizer, source, eval_context, eval_tokens, eval_fraction))
