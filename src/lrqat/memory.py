"""What a training step holds, tensor by tensor: the accounting behind the memory claims.

LR-QAT's promise is that the frozen weight costs 1 byte (`fixed8`) or half a byte (`int`)
per weight and only the small `A`, `B`, `s` carry gradients and AdamW state; full QAT
pays fp32 weight + gradient + two moments (16 bytes per weight). This module adds up the
static part of that bill from the model itself, so the benchmark can set it beside the
measured peak (the rest is activations and transient buffers). The measured side lives
here too: this process's resident memory and its peak over a window.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import gc
import resource
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from lrqat.layers import HoldsQuantizedBase
from lrqat.shard import local_shard


@dataclass
class MemoryBill:
    """Bytes by role. `adam_state` assumes AdamW's two fp32 moments per trainable value."""

    frozen_quantized_base: int  # Φ0 in its φ format (+ zero points)
    frozen_other: int  # embeddings, norms, head, frozen float bases
    trainable: int
    gradients: int
    adam_state: int
    teacher: int = 0  # a distillation teacher held beside the student (`--teacher float`)

    @property
    def total(self) -> int:
        return sum(asdict(self).values())

    def as_bytes(self) -> dict[str, int]:
        return {**asdict(self), "total": self.total}

    def as_mb(self) -> dict[str, float]:
        return {k: round(v / 2**20, 1) for k, v in self.as_bytes().items()}


def memory_bill(model: nn.Module, teacher: int = 0) -> MemoryBill:
    """The bill of what this process holds: for a sharded model, its shards (plus the
    `teacher` bytes a distillation teacher holds)."""
    seen: set[int] = set()
    quantized_base = other = trainable = 0
    quantized_base_ids = {id(t) for m in model.modules() if isinstance(m, HoldsQuantizedBase)
                          for t in m.frozen_quantized_base()}
    for tensor in [*model.parameters(), *model.buffers()]:
        held = local_shard(tensor)
        if held.data_ptr() in seen:
            continue
        seen.add(held.data_ptr())
        size = held.numel() * held.element_size()
        if tensor.requires_grad:
            trainable += size
        elif id(tensor) in quantized_base_ids:
            quantized_base += size
        else:
            other += size
    n_trainable = sum(local_shard(p).numel() for p in model.parameters() if p.requires_grad)
    return MemoryBill(quantized_base, other, trainable, trainable, 8 * n_trainable, teacher)


def reset_peak_memory() -> None:
    """Start a new peak-memory window, so training is measured without the loading and
    baseline evaluations before it (Linux: writing 5 to clear_refs resets VmHWM)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        return
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap back, so RSS is what is live
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def process_memory_mb(field: str) -> float | None:
    """A memory figure of this process from /proc/self/status (`VmRSS` now, `VmHWM` peak)
    in MiB, or None where the file does not exist (not Linux)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return None


MMAP_THRESHOLD = 1 << 20
"""Allocations from this size on are mapped on their own and unmapped when freed."""


def return_freed_memory() -> bool:
    """Make freed tensors go back to the operating system at once (glibc: a fixed mmap
    threshold of 1 MiB; elsewhere nothing is changed). glibc's default threshold grows to
    the size of each large block freed, after which blocks of that size come from the
    heap, whose freed pages stay with the process: a streamed load that reads, converts
    and drops one layer after another would then keep the pages of the dropped float
    layers, and FSDP's per-block sharding would free nothing the machine sees. Returns
    whether the setting took."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(-3, MMAP_THRESHOLD))  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        return False


def peak_memory_mb() -> float:
    """Peak resident memory of this process since the last reset (CPU), or peak
    allocated GPU memory."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    peak = process_memory_mb("VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class PhaseMeter:
    """Seconds and peak resident memory of each phase of a run (load, baselines, setup,
    train, merge, save, export), each phase its own peak window: what the big-model
    benchmark reports and `results.json` keeps."""

    def __init__(self) -> None:
        self.phases: dict[str, dict[str, float]] = {}
        self._restart()

    def _restart(self) -> None:
        reset_peak_memory()
        self._started = time.perf_counter()

    def end(self, name: str) -> None:
        """Close the phase `name` (a repeated name adds to it) and open the next window."""
        seconds, peak = time.perf_counter() - self._started, peak_memory_mb()
        old = self.phases.get(name, {"seconds": 0.0, "peak_rss_mb": 0.0})
        self.phases[name] = {"seconds": round(old["seconds"] + seconds, 1),
                             "peak_rss_mb": round(max(old["peak_rss_mb"], peak), 1)}
        self._restart()
