"""Atomic writes, and the train state a checkpoint holds.

Every file lrqat writes goes through `atomic_write_bytes`. A checkpoint holds only what
cannot be rebuilt: the trainable tensors, the optimizer and schedule state, the step,
and the loss history. The frozen base Φ0 is a pure
function of the model and the spec, so a resumed run rebuilds it instead of reading
it. Files are written to a temporary name and renamed, so a kill at any moment leaves
either the old checkpoint or the new one, never half of one.
"""

from __future__ import annotations

import errno
import os
import pickle
import shutil
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
PREVIOUS_NAME = "checkpoint.prev.pt"  # the one before: kept in case the newest holds a state that diverged
NEXT_NAME = "checkpoint.next.pt"  # a complete new checkpoint about to replace the newest


def rotate_in(new: Path, newest: Path, previous: Path) -> None:
    """Make the complete checkpoint `new` the newest, keeping the newest as `previous`.
    A kill between the two renames leaves `new` or `previous` for `recover_checkpoints`."""
    if newest.exists():
        os.replace(newest, previous)
    os.replace(new, newest)


def recover_checkpoints(folder: Path) -> None:
    """Finish a rotation a kill interrupted (a run killed mid-save keeps its newest state)."""
    newest, previous, new = folder / CHECKPOINT_NAME, folder / PREVIOUS_NAME, folder / NEXT_NAME
    if new.exists():
        rotate_in(new, newest, previous)
    elif not newest.exists() and previous.exists():
        os.replace(previous, newest)


def roll_back(folder: Path) -> int | None:
    """Drop the newest checkpoint for the previous one; return the step now kept (None: none)."""
    newest, previous = folder / CHECKPOINT_NAME, folder / PREVIOUS_NAME
    if previous.exists():
        os.replace(previous, newest)
        return TrainState.peek_step(newest)
    newest.unlink(missing_ok=True)
    return None


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


FILE_MODE = 0o666 & ~_umask()
"""Files lrqat writes get the usual permissions (mkstemp alone would leave them owner-only)."""


def temp_prefix(path: Path) -> str:
    """The name prefix of `atomic_write_bytes`' temporary files for `path`."""
    return f".{path.name}."


def remove_stale_temps(path: Path) -> int:
    """Delete temporary files a killed `atomic_write_bytes` of `path` left behind."""
    stale = [p for p in path.parent.glob(temp_prefix(path) + "*") if p.is_file()]
    for p in stale:
        p.unlink(missing_ok=True)
    return len(stale)


def atomic_write_bytes(path: Path, write: Any, size_hint: int | None = None) -> None:
    """Call `write(handle)` on a temporary file beside `path`, fsync, then rename over it.
    A full disk is reported with the path, the free space and (`size_hint`) the need."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=temp_prefix(path), dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    except OSError as err:
        Path(tmp).unlink(missing_ok=True)
        if err.errno == errno.ENOSPC:
            free = shutil.disk_usage(path.parent).free
            need = f"; it needs about {size_hint / 2**20:,.0f} MB" if size_hint else ""
            raise LrqatError(f"no space left on the device to write {path} ({free / 2**20:,.0f} MB free{need}): "
                             "free some space, then rerun the same command with --resume.") from None
        raise
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, lambda handle: handle.write(text.encode("utf-8")))


def state_bytes(state: Any) -> int:
    """The tensor bytes in a (nested) state: about the size of its checkpoint file."""
    if isinstance(state, torch.Tensor):
        return state.numel() * state.element_size()
    if isinstance(state, dict):
        return sum(state_bytes(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return sum(state_bytes(v) for v in state)
    return 0


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    atomic_write_bytes(path, lambda handle: torch.save(state, handle), size_hint=state_bytes(state))


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
    # the training's peak memory so far (MB): a resumed run reports the peak of all its
    # processes, not only of the last one (which may have trained a few steps)
    peak_rss_mb: float = 0.0

    def save(self, folder: Path) -> None:
        """Write this state as the newest checkpoint of `folder`, keeping the one before."""
        save_checkpoint(folder / NEXT_NAME, asdict(self))
        rotate_in(folder / NEXT_NAME, folder / CHECKPOINT_NAME, folder / PREVIOUS_NAME)

    @staticmethod
    def peek_step(path: Path) -> int:
        """The step of the checkpoint at `path`."""
        return int(load_checkpoint(path)["step"])

    @classmethod
    def load(cls, path: Path, fingerprint: str) -> TrainState:
        """Read the state at `path`, refusing one written under other settings."""
        raw = load_checkpoint(path)
        if raw.get("fingerprint") != fingerprint:
            raise LrqatError(
                f"checkpoint {path} was written by a run with other settings: "
                "resume with the same settings, or choose a new --output."
            )
        return cls(**{f.name: raw[f.name] for f in fields(cls) if f.name in raw})  # older ones lack peak_rss_mb
