"""Facts about this process: its place in a distributed run, and its device."""

from __future__ import annotations

import torch
from accelerate import PartialState


def use_cpu() -> bool:
    """Run torch.distributed on CPU (gloo) when there is no GPU."""
    return not torch.cuda.is_available()


def process_state() -> PartialState:
    """This process's place in a distributed run (`accelerate launch`, torchrun), or a
    single process. Without a GPU, torch.distributed runs on CPU over gloo."""
    return PartialState(cpu=use_cpu())
