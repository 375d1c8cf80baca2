"""Atomic training checkpoints.

A checkpoint holds only what cannot be rebuilt: the trainable tensors, the optimizer
and schedule state, the step, and the loss history. The frozen base Φ0 is a pure
function of the model and the spec, so a resumed run rebuilds it instead of reading
it. Files are written to a temporary name and renamed, so a kill at any moment leaves
either the old checkpoint or the new one, never half of one.
"""

from __future__ import annotations

import os
import pickle
import tempfile
from pathlib import Path
from typing import Any

import torch

from lrqat.errors import LrqatError

CHECKPOINT_NAME = "checkpoint.pt"


def atomic_write_bytes(path: Path, write: Any) -> None:
    """Call `write(handle)` on a temporary file beside `path`, fsync, then rename over it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, lambda handle: handle.write(text.encode("utf-8")))


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    atomic_write_bytes(path, lambda handle: torch.save(state, handle))


def load_checkpoint(path: Path) -> dict[str, Any]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError) as err:
        raise LrqatError(
            f"checkpoint {path} is corrupt or unreadable ({type(err).__name__}): "
            "delete it to start the run over."
        ) from None
    if not isinstance(state, dict) or "step" not in state or "trainable" not in state:
        raise LrqatError(f"checkpoint {path} is not an lrqat training checkpoint: delete it to start over.")
    return state
