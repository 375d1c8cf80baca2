"""Will this run fit? An estimate of its peak memory from the config alone, checked
before any weight is read, so a run too big for the machine stops in a second with its
bill and what to change, not after an hour with an allocator crash.

The static part is not a formula: one real layer of each distinct target shape is built
by the method's own builder and priced by `memory_bill` (the accounting the benchmarks
use), then multiplied by how many layers have that shape. Activations (block inputs kept
by checkpointing, one block recomputed, the logits and their gradient, LR-QAT's
weight-sized transients of the largest layer), the setup peak (the float model whole,
twice while the RTN baseline is built, or one layer at a time with `--load stream`) and
the finishing peak (merging frees each trained layer as it goes; an export reads the
saved integer model back and writes a second packed copy beside it) are estimates,
written out below.

`LRQAT_MEMORY_LIMIT` sets the budget (`16GiB`, `512MiB`, or `off` to skip the check);
otherwise it is the memory available now (GPU: free device memory).
"""

from __future__ import annotations

import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn
from transformers import PretrainedConfig

from lrqat import runtime
from lrqat.errors import LrqatError
from lrqat.layers import QuantLinear
from lrqat.memory import memory_bill
from lrqat.methods import METHODS, LayerStart
from lrqat.ranges import init_params
from lrqat.streaming import skeleton
from lrqat.surgery import check_targets

if TYPE_CHECKING:
    from lrqat.spec import RunSpec

GiB = 2**30
RUNTIME_BYTES = int(0.6 * GiB)  # Python, torch and transformers themselves
_UNITS = {"": 1, "b": 1, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "kb": 10**3, "mb": 10**6,
          "gb": 10**9, "tb": 10**12}


def parse_bytes(text: str) -> int:
    match = re.fullmatch(r"\s*([0-9.]+)\s*([a-zA-Z]*)\s*", text)
    if not match or match.group(2).lower() not in _UNITS:
        raise LrqatError(f"LRQAT_MEMORY_LIMIT={text!r} is not a size: write e.g. 16GiB, 512MiB, or off.")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def available_bytes() -> int | None:
    """The memory this run may use: LRQAT_MEMORY_LIMIT, else free GPU memory, else the
    system's available memory (and the cgroup's limit, where lower); None: unchecked."""
    limit = os.environ.get("LRQAT_MEMORY_LIMIT")
    if limit is not None:
        return None if limit.strip().lower() in ("off", "none", "0") else parse_bytes(limit)
    if torch.cuda.is_available():
        return torch.cuda.mem_get_info()[0]
    found = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found.append(int(line.split()[1]) * 1024)
        cgroup = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if cgroup.isdigit():
            used = int(Path("/sys/fs/cgroup/memory.current").read_text())
            found.append(int(cgroup) - used)
    except OSError:
        pass
    return min(found) if found else None


@dataclass
class FitEstimate:
    """Bytes by role of one process's peak, and the budget it is checked against."""

    frozen_quantized_base: int
    frozen_other: int
    trainable_and_state: int  # trainable tensors, their gradients, AdamW's two moments
    teacher: int
    activations: int
    setup: int  # the peak while loading and building, when above training's
    load: str
    finish: int = 0  # the peak of merging, saving and exporting
    merged: int = 0  # the merged model's integer layers (packed integers, scales, zero points)

    @property
    def training(self) -> int:
        return (RUNTIME_BYTES + self.frozen_quantized_base + self.frozen_other + self.trainable_and_state
                + self.teacher + self.activations)

    @property
    def peak(self) -> int:
        return max(self.training, self.setup, self.finish)

    def describe(self) -> str:
        parts = [f"frozen quantized base {self.frozen_quantized_base / GiB:.1f}",
                 f"other frozen {self.frozen_other / GiB:.1f}",
                 f"trainable + gradients + AdamW {self.trainable_and_state / GiB:.1f}",
                 f"activations {self.activations / GiB:.1f}"]
        if self.teacher:
            parts.append(f"teacher {self.teacher / GiB:.1f}")
        if self.setup > self.training:
            parts.append(f"setup peak ({self.load} load) {self.setup / GiB:.1f}")
        if self.finish > max(self.training, self.setup):
            parts.append(f"merge and export peak {self.finish / GiB:.1f}")
        return ", ".join(parts) + " GiB"


def _layer_bill(spec: RunSpec, linear: nn.Linear) -> tuple[int, int, int, int]:
    """Bytes (quantized base, other frozen, trainable + state, merged integer layer) of
    one real layer built the way the run builds it."""
    s0, z0 = init_params(linear.weight.detach(), spec.quant, "minmax")
    layer = METHODS[spec.method].build(LayerStart(linear, spec.quant, spec.lrqat, s0, z0, None,
                                                  torch.Generator().manual_seed(0), "minmax"))
    bill = memory_bill(layer)
    merged = QuantLinear.from_linear(linear, spec.quant, s0, z0)
    merged_bytes = sum(b.numel() * b.element_size() for b in merged.buffers())
    return bill.frozen_quantized_base, bill.frozen_other, bill.trainable + bill.gradients + bill.adam_state, merged_bytes


def activation_bytes(config: PretrainedConfig, spec: RunSpec, largest_linear: int, dtype_bytes: int) -> int:
    """An estimate of the activations of one micro-batch (the training window)."""
    text = config.get_text_config()
    hidden, layers = text.hidden_size, text.num_hidden_layers
    inter = getattr(text, "intermediate_size", 4 * hidden)
    heads, vocab = text.num_attention_heads, text.vocab_size
    batch, seq = spec.train.batch_size, spec.train.seq_len
    tokens = batch * seq
    block = tokens * (8 * hidden + 4 * inter) * dtype_bytes + 2 * batch * heads * seq * seq * 4
    kept = layers * tokens * hidden * dtype_bytes if spec.train.grad_checkpointing else layers * block
    logits = 3 * tokens * vocab * 4
    transients = 3 * largest_linear * 4 if METHODS[spec.method].trained else 0
    return kept + block + logits + transients


def streamed_start_bytes(config: PretrainedConfig, spec: RunSpec, targets: list[nn.Linear], dtype_bytes: int,
                         name: str) -> int:
    """What a streamed calibrated start holds beside the model being built: one float
    block, the hidden states of the calibration sequences (and of the float path) and of
    the evaluation windows that go through the blocks, and GPTQ's Hessians and transients
    on the largest layer, or Block-AP's trained copy of the block (fp32 weights, their
    gradients and AdamW moments)."""
    text = config.get_text_config()
    per_block = targets[: max(1, len(targets) // text.num_hidden_layers)]
    block_params = sum(m.out_features * m.in_features for m in per_block)
    states = (4 * spec.ptq.calib_tokens + 4 * spec.data.eval_tokens) * text.hidden_size * 4
    if name == "gptq":
        widest = max(m.in_features for m in targets)
        own = (sum(m.in_features ** 2 for m in per_block) * 4 + 3 * widest ** 2 * 4
               + 3 * max(m.out_features * m.in_features for m in targets) * 4)
    else:  # block-ap
        own = 4 * block_params * 4
    return block_params * dtype_bytes + states + own


def estimate(config: PretrainedConfig, spec: RunSpec, processes: int = 1, sharded: bool = False) -> FitEstimate:
    """The estimate for `spec` on a model of `config`, from its shapes (nothing is read)."""
    dtype = spec.torch_dtype
    dtype_bytes = dtype.itemsize
    model = skeleton(config, dtype)
    targets = check_targets(model, spec.quant, spec.targets)
    shapes = Counter((m.out_features, m.in_features, m.bias is not None) for _, m in targets)
    base = other = state = merged = 0
    for (out_f, in_f, bias), count in shapes.items():
        linear = nn.Linear(in_f, out_f, bias=bias, dtype=dtype).requires_grad_(False)
        nn.init.normal_(linear.weight, std=0.02)
        b, o, s, m = _layer_bill(spec, linear)
        base, other, state, merged = base + count * b, other + count * o, state + count * s, merged + count * m
        del linear
    target_ids = {id(p) for _, m in targets for p in m.parameters()}
    untouched = sum(p.numel() for p in model.parameters() if id(p) not in target_ids) * dtype_bytes
    other += untouched
    other += sum(b.numel() * b.element_size() for b in model.buffers())  # rotary frequencies
    float_bytes = sum(p.numel() for p in model.parameters()) * dtype_bytes
    if sharded and processes > 1:  # FSDP: every process holds 1/N of the parameters and their state
        base, other, state = base // processes, other // processes, state // processes
    largest = max(m.out_features * m.in_features for _, m in targets)
    teacher = float_bytes // dtype_bytes * runtime.teacher_dtype().itemsize if spec.train.loss != "ce" and spec.train.teacher == "float" else 0
    activations = activation_bytes(config, spec, largest, dtype_bytes) if METHODS[spec.method].trained else 0
    if spec.load == "stream":
        setup = RUNTIME_BYTES + base + other + state + 3 * largest * 4
        setup += max((streamed_start_bytes(config, spec, [m for _, m in targets], dtype_bytes, name)
                      for name in spec.calibrated_starts), default=0)
    else:  # the float model, a copy for RTN, and the method's layers while the float ones still exist
        setup = RUNTIME_BYTES + 2 * float_bytes + base + state
    finish = 0
    if METHODS[spec.method].quantized:
        transients = 3 * largest * 4  # one layer's integers and its packing
        merging = RUNTIME_BYTES + base + other + transients  # trained layers freed as their integer ones arrive
        exporting = RUNTIME_BYTES + 2 * merged + untouched + transients if spec.export else 0
        finish = max(merging, exporting)
    return FitEstimate(base, other, state, teacher, activations, setup, spec.load, finish, merged)


def check_fits(config: PretrainedConfig, spec: RunSpec, processes: int = 1, sharded: bool = False) -> None:
    """Refuse a run whose estimated peak exceeds the budget, with its bill and what to change."""
    budget = available_bytes()
    if budget is None:
        return
    found = estimate(config, spec, processes, sharded)
    if found.peak <= budget:
        return
    fixes = []
    if spec.load != "stream" and found.setup > found.training:
        fixes.append("--load stream")
    if spec.method == "lrqat" and spec.lrqat.phi != "int":
        fixes.append("--phi int")
    if spec.dtype != "bf16" and not runtime.bf16_is_slow():  # emulated bf16 fits, but takes hours
        fixes.append("--dtype bf16")
    if found.activations > 0.2 * found.peak:
        fixes.append("fewer tokens per micro-batch (--batch-size, --seq-len; --grad-accum keeps the batch)")
    if found.teacher:
        fixes.append("--teacher phi0 or cache")
    advice = ", ".join(fixes) if fixes else "a machine with more memory (or several processes with FSDP)"
    raise LrqatError(f"this run needs about {found.peak / GiB:.1f} GiB ({found.describe()}) but "
                     f"{budget / GiB:.1f} GiB is available: use {advice} (LRQAT_MEMORY_LIMIT=off skips this check).")
