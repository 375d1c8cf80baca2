"""The training loop, on Accelerate, and nothing else.

Plain code on purpose: one optimizer step = `grad_accum` micro-batches per process,
clip, step, schedule. Which blocks a step reads is the block source's pure function of
(seed, step), so a resumed run continues exactly the trajectory it left, and N
processes with the same global batch read the same blocks as one. Process facts live
in `runtime`, memory figures in `memory`, the train state in `checkpoint`, the
DDP/FSDP fork in `shard.distribute`.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator, DistributedDataParallelKwargs
from torch import nn
from tqdm.auto import tqdm

from lrqat.blocks import BlockSource
from lrqat.checkpoint import (
    CHECKPOINT_NAME,
    NEXT_NAME,
    TrainState,
    load_optimizer_state,
    load_trainable_state,
    optimizer_state,
    recover_checkpoints,
    remove_stale_temps,
    roll_back,
    trainable_state,
)
from lrqat.distill import Objective
from lrqat.errors import LrqatError
from lrqat.evaluate import perplexity
from lrqat.memory import memory_bill, peak_memory_mb, reset_peak_memory
from lrqat.rundir import RunDir, strict_json
from lrqat.runtime import use_cpu
from lrqat.shard import BlockSharding, distribute, full_tensor, gather_model
from lrqat.spec import TrainSpec
from lrqat.surgery import trainable_groups


@dataclass
class TrainResult:
    steps: int
    tokens: int
    seconds: float
    peak_rss_mb: float
    losses: list[float] = field(default_factory=list)
    bill_bytes: dict[str, int] = field(default_factory=dict)  # static memory bill of one process
    model: nn.Module | None = field(default=None, repr=False)  # the trained model, whole


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


class Terminated(KeyboardInterrupt):
    """SIGTERM (what schedulers and `kill` send), handled like Ctrl-C: checkpoint, one line."""


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM raises `Terminated` in the main thread (elsewhere: no-op)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise Terminated

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def first_non_finite(model: nn.Module) -> str:
    """The first trainable tensor (or its gradient) holding NaN or infinity, by name."""
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if not bool(torch.isfinite(p).all()):
            return f"{name} (its values)"
        if p.grad is not None and not bool(torch.isfinite(p.grad).all()):
            return f"{name} (its gradient)"
    return "none of the trainable tensors (the loss itself)"


def build_optimizer(model: nn.Module, spec: TrainSpec) -> torch.optim.Optimizer:
    """AdamW with one parameter group per role (`main`, `scales`), each at its own rate.
    The rates come resolved (`RunSpec.resolve()` takes the method's defaults)."""
    if spec.lr is None or spec.lr_scales is None:
        raise LrqatError("learning rates are not set: give TrainSpec lr and lr_scales, or run RunSpec.resolve() "
                         "to take the method's defaults.")
    groups = trainable_groups(model)
    param_groups = [
        {"params": groups["main"], "lr": spec.lr, "name": "main"},
        {"params": groups["scales"], "lr": spec.lr_scales, "name": "scales"},
    ]
    return torch.optim.AdamW([g for g in param_groups if g["params"]], betas=spec.betas, weight_decay=spec.weight_decay)


class Trainer:
    """Trains the trainable tensors of a prepared (surgered) model on a block source."""

    def __init__(
        self,
        model: nn.Module,
        train_blocks: BlockSource,
        eval_blocks: torch.Tensor,
        spec: TrainSpec,
        out_dir: Path,
        fingerprint: dict[str, Any],
        objective: Objective | None = None,
        sharding: BlockSharding | None = None,
    ) -> None:
        self.spec = spec
        self.objective = objective or Objective()
        self.out_dir = out_dir
        out_dir.mkdir(parents=True, exist_ok=True)
        self.fingerprint = json.dumps(fingerprint, sort_keys=True)
        self.train_blocks = train_blocks
        self.eval_blocks = eval_blocks
        if spec.tensorboard and importlib.util.find_spec("tensorboard") is None:
            raise LrqatError("--tensorboard needs the tensorboard package: pip install 'lrqat[tensorboard]'.")
        # Frozen buffers (Φ0, zero points) are identical in every process by construction:
        # DDP need not re-broadcast them before each forward pass.
        self.accelerator = Accelerator(cpu=use_cpu(), log_with="tensorboard" if spec.tensorboard else None,
                                       project_dir=str(out_dir),
                                       kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=False)])
        if spec.tensorboard:
            self.accelerator.init_trackers("tensorboard")
        if spec.grad_checkpointing and hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        if self.accelerator.is_main_process:
            for name in (CHECKPOINT_NAME, NEXT_NAME):  # temp files of checkpoint writes that were killed
                remove_stale_temps(out_dir / name)
            recover_checkpoints(out_dir)
        self.accelerator.wait_for_everyone()
        self.model, self.optimizer, self.skeleton = distribute(model, lambda m: build_optimizer(m, spec), self.accelerator,
                                                               sharding)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda step: lr_factor(step, spec))
        self.step = 0
        # taken before any resume: a rebuilt model starts where the original did
        self.scale_floors = [self.SCALE_FLOOR * p.detach().abs().clone() for g in self.optimizer.param_groups
                             if g.get("name") == "scales" for p in g["params"]]
        self.saved_step: int | None = None
        self.losses: list[float] = []
        self.elapsed = 0.0
        self.earlier_peak_rss_mb = 0.0

    @property
    def checkpoint_path(self) -> Path:
        return RunDir(self.out_dir).checkpoint

    @property
    def metrics_path(self) -> Path:
        return RunDir(self.out_dir).metrics

    def global_batch(self) -> int:
        return self.spec.batch_size * self.spec.grad_accum * self.accelerator.num_processes

    @property
    def sharded(self) -> bool:
        return self.skeleton is not None

    def trained_model(self) -> nn.Module | None:
        """The trained model as one plain module in this process (whole again if sharded,
        in the main process only: None in the others)."""
        if self.sharded:
            return gather_model(self.model, self.skeleton)
        return self.accelerator.unwrap_model(self.model)

    def save(self) -> None:
        """Checkpoint the current step (once: the end of a run saving again would make the
        kept previous checkpoint the same state)."""
        if self.step == self.saved_step:
            return
        self.saved_step = self.step
        main = self.accelerator.is_main_process
        if not (main or self.sharded):  # gathering shards needs every process; a replica, only the main one
            return
        model = self.accelerator.unwrap_model(self.model)
        trainable, optimizer = trainable_state(model), optimizer_state(model, self.optimizer)
        if main:
            TrainState(self.step, trainable, optimizer, self.scheduler.state_dict(), self.losses, self.elapsed,
                       self.fingerprint, self.peak_rss_mb()).save(self.out_dir)

    def peak_rss_mb(self) -> float:
        """The training's peak memory: this process's since training began, or an earlier
        process's (before a resume) where that was higher."""
        return max(self.earlier_peak_rss_mb, peak_memory_mb())

    def resume(self) -> None:
        state = TrainState.load(self.checkpoint_path, self.fingerprint)
        model = self.accelerator.unwrap_model(self.model)
        load_trainable_state(model, state.trainable)
        load_optimizer_state(model, self.optimizer, state.optimizer)
        self.scheduler.load_state_dict(state.scheduler)
        self.step = self.saved_step = state.step
        self.losses = list(state.losses)
        self.elapsed = state.elapsed
        self.earlier_peak_rss_mb = state.peak_rss_mb
        self._apply_learning_rates()
        self.truncate_metrics()

    def _apply_learning_rates(self) -> None:
        """The learning rates of this run's spec, also when they differ from the
        checkpoint's (lowered after a divergence): the schedule continues from its step."""
        rates = {"main": self.spec.lr, "scales": self.spec.lr_scales}
        for group in self.optimizer.param_groups:
            group["initial_lr"] = rates[group["name"]]
        self.scheduler.base_lrs = [group["initial_lr"] for group in self.optimizer.param_groups]
        for group in self.optimizer.param_groups:
            group["lr"] = group["initial_lr"] * lr_factor(self.step, self.spec)

    def truncate_metrics(self) -> None:
        """Keep the metric lines up to the checkpoint's step (the resumed run redoes the
        rest, and a run without a checkpoint starts over), dropping a line torn by a kill."""
        if not self.metrics_path.exists() or not self.accelerator.is_main_process:
            return
        kept = []
        for line in self.metrics_path.read_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                break  # a line half-written when the run was killed: it and anything after it
            if record.get("step", 0) <= self.step:
                kept.append(line)
        self.metrics_path.write_text("".join(line + "\n" for line in kept))

    def _log(self, record: dict[str, Any]) -> None:
        if self.accelerator.is_main_process:
            with self.metrics_path.open("a") as handle:
                handle.write(strict_json(record) + "\n")
        if self.spec.tensorboard:
            self.accelerator.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])

    def _micro_batches(self, step: int) -> list[torch.Tensor]:
        blocks = self.train_blocks.batch(step, self.global_batch())
        per_process = blocks.reshape(self.accelerator.num_processes, -1, blocks.shape[-1])[self.accelerator.process_index]
        return list(per_process.split(self.spec.batch_size))

    def train_step(self) -> tuple[float, float]:
        self.model.train()
        micro = self._micro_batches(self.step)
        total = torch.zeros((), device=self.accelerator.device)
        for i, ids in enumerate(micro):
            ids = ids.to(self.accelerator.device)
            last = i == len(micro) - 1
            # FSDP reduces each micro-batch's gradients (sharded, they cannot wait unreduced).
            with nullcontext() if last or self.sharded else self.accelerator.no_sync(self.model):
                loss = self.objective(self.model, ids) / len(micro)
                self.accelerator.backward(loss)
            total += loss.detach().float()  # summed on the device: one host sync per step, not per micro-batch
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        # clip 0: the norm is measured (for the log and the divergence check), grads scaled by 1
        grad_norm = float(full_tensor(torch.nn.utils.clip_grad_norm_(params, self.spec.clip or math.inf)))
        loss = float(self.accelerator.reduce(total, reduction="mean"))
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            raise LrqatError(
                f"training diverged at step {self.step + 1}: loss {loss}, gradient norm {grad_norm}; first non-finite: "
                f"{first_non_finite(self.accelerator.unwrap_model(self.model))}. Nothing of this step was applied; "
                f"{self._keep_good_checkpoint()}: lower --lr / --lr-scales and rerun with --resume."
            )
        self.optimizer.step()
        self._keep_scales_positive()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss, grad_norm

    SCALE_FLOOR = 1e-3
    """A scale never falls below this fraction of its value at the start: an AdamW step
    moves a scale by about the learning rate whatever its size, which can push the small
    scales of a rotated model (per-channel 3e-4 here) through zero; the merge would then
    refuse the layer. Runs whose scales stay positive are unchanged."""

    @torch.no_grad()
    def _keep_scales_positive(self) -> None:
        scales = [p for g in self.optimizer.param_groups if g.get("name") == "scales" for p in g["params"]]
        for param, floor in zip(scales, self.scale_floors, strict=True):
            torch.maximum(param, floor, out=param)

    def _keep_good_checkpoint(self) -> str:
        """After a divergence at step k+1: the checkpoint of step k holds the very state
        that diverged, so the one before it is kept instead; an older one is good (the
        steps after it had finite losses). Says which step a resume starts from."""
        self.accelerator.wait_for_everyone()
        kept: int | None = TrainState.peek_step(self.checkpoint_path) if self.checkpoint_path.exists() else None
        if self.accelerator.is_main_process and kept == self.step:
            kept = roll_back(self.out_dir)
        self.accelerator.wait_for_everyone()
        if kept is None:
            return "no good checkpoint exists, so a resumed run starts from step 0"
        return f"the checkpoint of step {kept} is kept"

    def run(self) -> TrainResult:
        spec = self.spec
        reset_peak_memory()
        tokens_per_step = self.global_batch() * self.train_blocks.seq_len
        bar = tqdm(
            total=spec.steps, initial=self.step, desc="training", unit="step",
            disable=not self.accelerator.is_main_process, dynamic_ncols=True,
        )
        try:
            with sigterm_as_interrupt():
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
        except KeyboardInterrupt as stop:
            self.save()
            how = "terminated (SIGTERM)" if isinstance(stop, Terminated) else "interrupted"
            raise LrqatError(
                f"{how} at step {self.step}/{spec.steps}; the checkpoint is saved: "
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
            peak_rss_mb=round(self.peak_rss_mb(), 1),
            losses=self.losses,
            bill_bytes=memory_bill(self.model, teacher=self.objective.teacher_bytes()).as_bytes(),
            model=self.trained_model(),
        )


def train(
    model: nn.Module,
    train_blocks: BlockSource,
    eval_blocks: torch.Tensor,
    spec: TrainSpec,
    out_dir: Path,
    fingerprint: dict[str, Any] | None = None,
    resume: bool = False,
    log: Callable[[str], None] = print,
    objective: Objective | None = None,
    sharding: BlockSharding | None = None,
) -> TrainResult:
    """Train `model` on `train_blocks` (a `BlockSource`: `PackedBlocks`, `TokenStream`);
    with `resume`, continue from the checkpoint in `out_dir`. The trained model is
    `result.model`: `model` itself, except under FSDP, where `model` is left sharded and
    `result.model` is a copy gathered in the main process (None in the others).
    `sharding`: the blocks of a streamed build, sharded already (`BlockSharding`).

    `fingerprint` is any JSON-able description of the settings; a checkpoint written
    under another fingerprint is refused on resume.
    """
    trainer = Trainer(model, train_blocks, eval_blocks, spec, Path(out_dir), fingerprint or {}, objective, sharding)
    if resume and trainer.checkpoint_path.exists():
        trainer.resume()
    else:
        if resume and trainer.accelerator.is_main_process:
            log(f"no checkpoint in {out_dir}: training starts from step 0")
        trainer.truncate_metrics()  # lines of a run killed before its first checkpoint
    return trainer.run()
