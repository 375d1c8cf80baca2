"""Reading GGUF files back, fast: the `gguf` package's own reader on plain arrays.

`gguf.GGUFReader` parses every metadata value element by element through a `numpy.memmap`,
whose per-access overhead dominates: a 49k-token vocabulary with its merges took ~10 s
per file on 2 cores, paid by every export's check of what llama.cpp's converter wrote.
The same parser over a plain `ndarray` view of the same mapped bytes (no copy) reads it
several times faster. `_get` is the reader's one accessor of the file's bytes; `gguf` is
pinned in pyproject.toml, and a test checks that this class reads every field and tensor
of an export as `GGUFReader` does.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGUFReader


class FastGGUFReader(GGUFReader):
    """`GGUFReader` whose byte accesses go to an `ndarray` view of its memory map."""

    def __init__(self, path: str | Path) -> None:
        self._plain: np.ndarray | None = None
        super().__init__(path)

    def _get(self, offset: int, dtype: Any, count: int = 1, override_order: Any = None) -> np.ndarray:
        if self._plain is None:
            self._plain = self.data.view(np.ndarray)
        count = int(count)
        end = offset + np.dtype(dtype).itemsize * count
        array = self._plain[offset:end].view(dtype=dtype)[:count]
        return array.view(array.dtype.newbyteorder(self.byte_order if override_order is None else override_order))
