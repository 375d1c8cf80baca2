"""Streaming training data for corpora larger than memory.

Files are read one document at a time, tokenised as they are reached and cut into
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

import torch
from transformers import PreTrainedTokenizerBase

from lrqat.data import document_token_ids, is_eval_document, iter_documents, pack_blocks
from lrqat.errors import LrqatError


class TokenStream:
    """Training blocks of `seq_len` tokens, drawn in order from a lazily read corpus."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, source: str, seq_len: int, eval_fraction: float,
                 seed: int = 0, shuffle_buffer: int = 256) -> None:
        self.tokenizer, self.source, self.seq_len = tokenizer, source, seq_len
        self.eval_fraction, self.seed, self.shuffle_buffer = eval_fraction, seed, shuffle_buffer
        self.shape = (None, seq_len)  # like a block tensor's: unknown length, known width
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


def stream_eval_blocks(tokenizer: PreTrainedTokenizerBase, source: str, eval_context: int, eval_tokens: int,
                       eval_fraction: float) -> torch.Tensor:
    """Eval blocks from the evaluation documents, reading only until `eval_tokens` are found."""
    docs = (d for d in iter_documents(source) if d.text.strip() and is_eval_document(d.id, eval_fraction))
    first = next(docs, None)
    if first is None:
        raise LrqatError(f"data source {source!r} has no evaluation document: streaming splits whole documents (files, "
                         "or .jsonl lines) by a hash of their id, so it needs many of them; use more documents.")
    return pack_blocks(tokenizer, itertools.chain([first], docs), eval_context, eval_tokens)
