"""The training loop, on Accelerate.

Plain code on purpose: one optimizer step = `grad_accum` micro-batches per process,
clip, step, schedule. Which blocks a step reads is a pure function of (seed, step), so
a resumed run continues exactly the trajectory it left, and N processes with the same
global batch read the same blocks as one.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import importlib.util
import json
import math
import resource
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator, DistributedDataParallelKwargs, PartialState
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from tqdm.auto import tqdm

from lrqat.checkpoint import CHECKPOINT_NAME, load_checkpoint, save_checkpoint
from lrqat.errors import LrqatError
from lrqat.evaluate import perplexity
from lrqat.layers import LRQATLinear
from lrqat.memory import memory_bill
from lrqat.shard import fsdp_requested, full_tensor, gather_model, meta_skeleton, shard_model
from lrqat.spec import METHOD_LRS, TrainSpec
from lrqat.stream import TokenStream
from lrqat.surgery import trainable_groups

METRICS_NAME = "metrics.jsonl"


@dataclass
class TrainResult:
    steps: int
    tokens: int
    seconds: float
    peak_rss_mb: float
    losses: list[float] = field(default_factory=list)
    bill_bytes: dict[str, int] = field(default_factory=dict)  # static memory bill of one process
    model: nn.Module | None = field(default=None, repr=False)  # the trained model, whole


def use_cpu() -> bool:
    """Run torch.distributed on CPU (gloo) when there is no GPU."""
    return not torch.cuda.is_available()


def process_state() -> PartialState:
    """This process's place in a distributed run (`accelerate launch`, torchrun), or a
    single process. Without a GPU, torch.distributed runs on CPU over gloo."""
    return PartialState(cpu=use_cpu())


def lr_factor(step: int, spec: TrainSpec) -> float:
    """Warmup then linear/cosine decay to zero (or constant), as a multiplier of the base lr."""
    warmup = round(spec.warmup * spec.steps)
    if step < warmup:
        return (step + 1) / warmup
    if spec.schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, spec.steps - warmup)
    if spec.schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return max(0.0, 1.0 - progress)


def step_indices(step: int, n_blocks: int, global_batch: int, seed: int) -> torch.Tensor:
    """The block indices of one optimizer step: epochs of a seeded permutation."""
    steps_per_epoch = max(1, n_blocks // global_batch)
    epoch, offset = divmod(step, steps_per_epoch)
    perm = torch.randperm(n_blocks, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    positions = torch.arange(offset * global_batch, (offset + 1) * global_batch) % n_blocks
    return perm[positions]


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


def peak_memory_mb() -> float:
    """Peak resident memory of this process since the last reset (CPU), or peak
    allocated GPU memory."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    peak = process_memory_mb("VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def build_optimizer(model: nn.Module, spec: TrainSpec) -> torch.optim.Optimizer:
    groups = trainable_groups(model)
    default_lr, default_lr_scales = METHOD_LRS["lrqat"]
    param_groups = [
        {"params": groups["main"], "lr": default_lr if spec.lr is None else spec.lr, "name": "main"},
        {"params": groups["scales"], "lr": default_lr_scales if spec.lr_scales is None else spec.lr_scales,
         "name": "scales"},
    ]
    return torch.optim.AdamW([g for g in param_groups if g["params"]], betas=spec.betas, weight_decay=spec.weight_decay)


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


class Trainer:
    """Trains the trainable tensors of a prepared (surgered) model on token blocks."""

    def __init__(
        self,
        model: nn.Module,
        train_blocks: torch.Tensor | TokenStream,
        eval_blocks: torch.Tensor,
        spec: TrainSpec,
        out_dir: Path,
        fingerprint: dict[str, Any],
    ) -> None:
        self.spec = spec
        self.out_dir = out_dir
        out_dir.mkdir(parents=True, exist_ok=True)
        self.fingerprint = fingerprint
        self.train_blocks = train_blocks
        self.eval_blocks = eval_blocks
        # Frozen buffers (Φ0, zero points) are identical in every process by construction:
        # DDP need not re-broadcast them before each forward pass.
        if spec.tensorboard and importlib.util.find_spec("tensorboard") is None:
            raise LrqatError("--tensorboard needs the tensorboard package: pip install 'lrqat[tensorboard]'.")
        self.accelerator = Accelerator(cpu=use_cpu(), log_with="tensorboard" if spec.tensorboard else None,
                                       project_dir=str(out_dir),
                                       kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=False)])
        if spec.tensorboard:
            self.accelerator.init_trackers("tensorboard")
        if spec.grad_checkpointing and hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        for layer in model.modules():
            if isinstance(layer, LRQATLinear):
                layer.fused = spec.fused
        # Sharding replaces the parameters, so the optimizer is built after it.
        self.skeleton = meta_skeleton(model) if fsdp_requested() else None
        if self.skeleton is not None:
            model = shard_model(model, self.accelerator.device)
        self.optimizer = build_optimizer(model, spec)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda step: lr_factor(step, spec))
        if self.skeleton is None:
            model, self.optimizer = self.accelerator.prepare(model, self.optimizer)
        self.model = model
        self.step = 0
        self.losses: list[float] = []
        self.elapsed = 0.0

    @property
    def checkpoint_path(self) -> Path:
        return self.out_dir / CHECKPOINT_NAME

    @property
    def metrics_path(self) -> Path:
        return self.out_dir / METRICS_NAME

    def global_batch(self) -> int:
        return self.spec.batch_size * self.spec.grad_accum * self.accelerator.num_processes

    @property
    def sharded(self) -> bool:
        return self.skeleton is not None

    def trained_model(self) -> nn.Module:
        """The trained model as one plain module in this process (whole again if sharded)."""
        if self.sharded:
            return gather_model(self.model, self.skeleton)
        return self.accelerator.unwrap_model(self.model)

    def save(self) -> None:
        main = self.accelerator.is_main_process
        if not (main or self.sharded):  # gathering shards needs every process; a replica, only the main one
            return
        model = self.accelerator.unwrap_model(self.model)
        trainable, optimizer = trainable_state(model), optimizer_state(model, self.optimizer)
        if not main:
            return
        state = {
            "step": self.step,
            "trainable": trainable,
            "optimizer": optimizer,
            "scheduler": self.scheduler.state_dict(),
            "losses": self.losses,
            "elapsed": self.elapsed,
            "fingerprint": json.dumps(self.fingerprint, sort_keys=True),
        }
        save_checkpoint(self.checkpoint_path, state)

    def resume(self) -> None:
        state = load_checkpoint(self.checkpoint_path)
        if state.get("fingerprint") != json.dumps(self.fingerprint, sort_keys=True):
            raise LrqatError(
                f"checkpoint {self.checkpoint_path} was written by a run with other settings: "
                "resume with the same settings, or choose a new --output."
            )
        model = self.accelerator.unwrap_model(self.model)
        load_trainable_state(model, state["trainable"])
        load_optimizer_state(model, self.optimizer, state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step = state["step"]
        self.losses = list(state["losses"])
        self.elapsed = state["elapsed"]
        self._truncate_metrics()

    def _truncate_metrics(self) -> None:
        """Drop metric lines written after the checkpoint, which the resumed run redoes."""
        if not self.metrics_path.exists() or not self.accelerator.is_main_process:
            return
        kept = [line for line in self.metrics_path.read_text().splitlines() if json.loads(line)["step"] <= self.step]
        self.metrics_path.write_text("".join(line + "\n" for line in kept))

    def _log(self, record: dict[str, Any]) -> None:
        if self.accelerator.is_main_process:
            with self.metrics_path.open("a") as handle:
                handle.write(json.dumps(record) + "\n")
        if self.spec.tensorboard:
            self.accelerator.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])

    def _micro_batches(self, step: int) -> list[torch.Tensor]:
        if isinstance(self.train_blocks, torch.Tensor):
            idx = step_indices(step, self.train_blocks.shape[0], self.global_batch(), self.spec.seed)
            blocks = self.train_blocks[idx]
        else:  # a TokenStream: blocks in stream order
            blocks = self.train_blocks.batch(step, self.global_batch())
        per_process = blocks.reshape(self.accelerator.num_processes, -1, blocks.shape[-1])[self.accelerator.process_index]
        return list(per_process.split(self.spec.batch_size))

    def train_step(self) -> tuple[float, float]:
        self.model.train()
        micro = self._micro_batches(self.step)
        total = 0.0
        for i, ids in enumerate(micro):
            ids = ids.to(self.accelerator.device)
            last = i == len(micro) - 1
            # FSDP reduces each micro-batch's gradients (sharded, they cannot wait unreduced).
            with nullcontext() if last or self.sharded else self.accelerator.no_sync(self.model):
                loss = self.model(input_ids=ids, labels=ids, use_cache=False).loss / len(micro)
                self.accelerator.backward(loss)
            total += loss.item()
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        grad_norm = full_tensor(torch.nn.utils.clip_grad_norm_(params, self.spec.clip)) if self.spec.clip > 0 else 0.0
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        mean_loss = torch.tensor(total, device=self.accelerator.device)
        return float(self.accelerator.reduce(mean_loss, reduction="mean")), float(grad_norm)

    def run(self) -> TrainResult:
        spec = self.spec
        reset_peak_memory()
        tokens_per_step = self.global_batch() * self.train_blocks.shape[-1]
        bar = tqdm(
            total=spec.steps, initial=self.step, desc="LR-QAT", unit="step",
            disable=not self.accelerator.is_main_process, dynamic_ncols=True,
        )
        try:
            while self.step < spec.steps:
                lrs = {f"lr_{g['name']}": g["lr"] for g in self.optimizer.param_groups}
                started = time.perf_counter()
                loss, grad_norm = self.train_step()
                self.elapsed += time.perf_counter() - started
                self.step += 1
                self.losses.append(loss)
                record: dict[str, Any] = {"step": self.step, "loss": loss, "grad_norm": grad_norm, **lrs,
                                          "tokens": self.step * tokens_per_step, "seconds": round(self.elapsed, 2)}
                if spec.eval_every and (self.step % spec.eval_every == 0 or self.step == spec.steps):
                    record["eval_ppl"] = perplexity(self.model, self.eval_blocks[: spec.eval_blocks]).ppl
                self._log(record)
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tokens_per_step * self.step / max(self.elapsed, 1e-9):.0f}")
                if spec.save_every and self.step % spec.save_every == 0:
                    self.save()
        except KeyboardInterrupt:
            self.save()
            raise LrqatError(
                f"interrupted at step {self.step}/{spec.steps}; the checkpoint is saved: "
                "rerun the same command with --resume to continue."
            ) from None
        finally:
            bar.close()
            if spec.tensorboard:
                self.accelerator.end_training()
        self.save()
        self.model.eval()
        return TrainResult(
            steps=self.step,
            tokens=self.step * tokens_per_step,
            seconds=round(self.elapsed, 2),
            peak_rss_mb=round(peak_memory_mb(), 1),
            losses=self.losses,
            bill_bytes=memory_bill(self.model).as_bytes(),
            model=self.trained_model(),
        )


def train(
    model: nn.Module,
    train_blocks: torch.Tensor | TokenStream,
    eval_blocks: torch.Tensor,
    spec: TrainSpec,
    out_dir: Path,
    fingerprint: dict[str, Any] | None = None,
    resume: bool = False,
) -> TrainResult:
    """Train `model`; with `resume`, continue from the checkpoint in `out_dir`. The
    trained model is `result.model`: `model` itself, except under FSDP, where `model` is
    left sharded and `result.model` is a gathered copy.

    `fingerprint` is any JSON-able description of the settings; a checkpoint written
    under another fingerprint is refused on resume.
    """
    trainer = Trainer(model, train_blocks, eval_blocks, spec, Path(out_dir), fingerprint or {})
    if resume and trainer.checkpoint_path.exists():
        trainer.resume()
    return trainer.run()
