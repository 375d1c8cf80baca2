"""Facts about this process: its place in a distributed run, and its device."""

from __future__ import annotations

import functools
import time

import torch
from accelerate import PartialState


def use_cpu() -> bool:
    """Run torch.distributed on CPU (gloo) when there is no GPU."""
    return not torch.cuda.is_available()


def process_state() -> PartialState:
    """This process's place in a distributed run (`accelerate launch`, torchrun), or a
    single process. Without a GPU, torch.distributed runs on CPU over gloo."""
    return PartialState(cpu=use_cpu())


SLOW_BF16 = 2.0
"""A bf16 matmul this many times slower than fp32 counts as emulated, not native."""


@functools.cache
def bf16_slowdown() -> float:
    """How many times longer a bf16 matmul takes than an fp32 one here, measured once.
    Why measured, not looked up: CPUs without native bf16 (AVX2 only: no AVX512-BF16,
    no AMX) run it through a scalar fallback, measured 100x slower than fp32 on a
    2-core AMD EPYC, so a bf16 run there takes hours where fp32 takes minutes; on a Xeon
    with AVX512-BF16 but no AMX it measured 3x slower, while a Xeon with AMX trained 1.9x
    faster in bf16 than in fp32 (README, quality benchmark). The CPU flags that predict
    this differ by vendor and torch build, the timing does not."""
    if torch.cuda.is_available():
        return 1.0
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread: a core busy elsewhere delays a split matmul, not a single one
    try:
        seconds = {}
        for dtype in (torch.float32, torch.bfloat16):
            a, b = torch.randn(64, 256, dtype=dtype), torch.randn(256, 256, dtype=dtype)
            a @ b  # first call: kernel selection
            best = float("inf")
            for _ in range(5):
                start = time.perf_counter()
                a @ b
                best = min(best, time.perf_counter() - start)
            seconds[dtype] = max(best, 1e-7)
    finally:
        torch.set_num_threads(threads)
    return seconds[torch.bfloat16] / seconds[torch.float32]


def bf16_is_slow() -> bool:
    """bf16 compute here is emulated: fp32 is the faster choice (bf16 still halves memory)."""
    return bf16_slowdown() > SLOW_BF16


def slow_dtype_warning(dtype: str) -> str | None:
    """What to tell a user who asked for bf16 compute where it is emulated (a warning, not
    an error: bf16 still halves the memory, which may be the point of the choice)."""
    if dtype != "bf16" or not bf16_is_slow():
        return None
    return (f"warning: a bf16 matmul measured {bf16_slowdown():.0f}x slower than fp32 on this CPU (bf16 is fast "
            "with AMX or on a GPU; without AMX it is emulated, or slower with AVX512-BF16 alone); --dtype fp32 "
            "avoids the slowdown, bf16 only halves the memory")


def teacher_dtype() -> torch.dtype:
    """The dtype a float distillation teacher is held in: bf16 (half its memory) where
    bf16 is native, fp32 where it is emulated (the teacher's forward pass would otherwise
    cost more than the student's training step)."""
    return torch.float32 if bf16_is_slow() else torch.bfloat16
