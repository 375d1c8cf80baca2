"""Atomic writes, and the train state a checkpoint holds.

Every file lrqat writes goes through `atomic_write_bytes`. A checkpoint holds only what
cannot be rebuilt: the trainable tensors, the optimizer and schedule state, the step,
and the loss history. The frozen base Φ0 is a pure
function of the model and the spec, so a resumed run rebuilds it instead of reading
it. Files are written to a temporary name and renamed, so a kill at any moment leaves
either the old checkpoint or the new one, never half of one.
"""

from __future__ import annotations

import os
import pickle
import tempfile
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from lrqat.errors import LrqatError
from lrqat.shard import full_tensor

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


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable tensors whole, also from a sharded model (then every process must call)."""
    return {n: full_tensor(p.detach()).cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load whole tensors into a plain or sharded model (each process keeps its share)."""
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    if names != set(state):
        raise LrqatError("the checkpoint's trainable tensors do not match this model: was it written by another run?")
    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, strict=False))


def optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """AdamW state keyed by parameter name and whole (gathered to the main process when
    sharded), so a checkpoint resumes under any number of processes, sharded or not."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_optimizer_state_dict(model, getattr(optimizer, "optimizer", optimizer), options=options)


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    if any(not isinstance(key, str) for key in state.get("state", {})):
        raise LrqatError("this checkpoint was written by an older lrqat (optimizer state by position, not by name): "
                         "start the run again in a new --output.")
    options = StateDictOptions(full_state_dict=True)
    set_optimizer_state_dict(model, getattr(optimizer, "optimizer", optimizer), state, options=options)


@dataclass
class TrainState:
    """Everything a resumed run needs to continue the same trajectory."""

    step: int
    trainable: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    losses: list[float]
    elapsed: float
    fingerprint: str  # the run's settings as sorted JSON: a checkpoint resumes only under the same

    def save(self, path: Path) -> None:
        save_checkpoint(path, asdict(self))

    @classmethod
    def load(cls, path: Path, fingerprint: str) -> TrainState:
        """Read the state at `path`, refusing one written under other settings."""
        raw = load_checkpoint(path)
        if raw.get("fingerprint") != fingerprint:
            raise LrqatError(
                f"checkpoint {path} was written by a run with other settings: "
                "resume with the same settings, or choose a new --output."
            )
        return cls(**{f.name: raw[f.name] for f in fields(cls)})
