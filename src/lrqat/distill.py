"""Training objectives: next-token cross-entropy, distillation from a teacher, or both.

`--loss kd` trains the student to match a teacher's next-token distribution (KL at a
temperature T, scaled by T² so gradients keep their size); `ce+kd` mixes the two with
`--kd-weight`. Teachers:
- `float`: the float model before quantization (and before rotations and activation
  quantizers), held in bf16 beside the student (fp32 on a CPU without native bf16,
  where a bf16 forward pass is about 100x slower): its memory is in the bill.
- `phi0`: no extra weights. With φ = fixed8 (or a float φ), s₀·(Φ0 − z) *without*
  rounding is the float weight to within a fraction of a grid step inside the clipping
  range (weights the range init clipped stay clipped), so the student's own layers with
  rounding and A·B switched off, and activation quantizers bypassed, are a near-float
  teacher (docs/METHOD.md; its distance to float is measured as teacher perplexity).
- `cache`: the float model's top-k logits for every training sequence of the run,
  computed once before training (then the float model is not held) and stored in the run
  folder (`teacher_cache/`: fp16 logits, int32 token ids); KD is then taken over the
  teacher's top-k tokens (its distribution renormalised over them). For runs where
  neither a float copy nor Φ0's fraction fits; its size is in `results.json`.
Teacher passes run under `torch.no_grad()`.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lrqat import activations, runtime
from lrqat.errors import LrqatError
from lrqat.layers import LRQATLinear

LOSSES = ("ce", "kd", "ce+kd")
TEACHERS = ("float", "phi0", "cache")


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float,
            indices: torch.Tensor | None = None) -> torch.Tensor:
    """T² · KL(softmax(teacher/T) ‖ softmax(student/T)), averaged over positions. With
    `indices`, `teacher` holds logits of those tokens only (top-k): the teacher's
    distribution is renormalised over them and compared with the student's there."""
    t = F.log_softmax(teacher.float() / temperature, dim=-1)
    s = F.log_softmax(student.float() / temperature, dim=-1)
    if indices is not None:
        s = s.gather(-1, indices.long())
    kl = (t.exp() * (t - s)).sum(-1)
    return kl.mean() * temperature**2


def next_token_ce(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


@contextlib.contextmanager
def phi0_teacher_mode(model: nn.Module) -> Iterator[None]:
    """Within: every LR-QAT layer computes with s₀·(Φ0 − z) (no rounding, no A·B) and the
    activation/KV quantizers pass values through (online rotations still apply)."""
    layers = [m for m in model.modules() if isinstance(m, LRQATLinear)]
    for layer in layers:
        layer.teacher = True
    try:
        with activations.bypassed():
            yield
    finally:
        for layer in layers:
            layer.teacher = False


class Teacher:
    """Next-token logits of a teacher for a batch of ids (no gradients)."""

    def logits(self, student: nn.Module, ids: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def targets(self, student: nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(logits, token indices) of the positions that predict a next token; indices
        None when the logits cover the whole vocabulary."""
        return self.logits(student, ids)[:, :-1], None

    def bytes(self) -> int:
        """What the teacher holds beyond the student (for the memory bill)."""
        return 0


@dataclass
class FloatTeacher(Teacher):
    model: nn.Module

    @classmethod
    def of(cls, float_model: nn.Module, dtype: torch.dtype | None = None) -> FloatTeacher:
        """A frozen copy of the float model in `dtype` (default: bf16 where it is native,
        fp32 where it is emulated; call before rotations, activation quantizers and
        surgery: it is the model the user started from)."""
        teacher = copy.deepcopy(float_model).to(runtime.teacher_dtype() if dtype is None else dtype).eval()
        activations.remove(teacher)
        for p in teacher.parameters():
            p.requires_grad_(False)
        return cls(teacher)

    @torch.no_grad()
    def logits(self, student: nn.Module, ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=ids, use_cache=False).logits

    def bytes(self) -> int:
        unique = {t.data_ptr(): t for t in [*self.model.parameters(), *self.model.buffers()]}  # a tied head once
        return sum(t.numel() * t.element_size() for t in unique.values())


class Phi0Teacher(Teacher):
    @torch.no_grad()
    def logits(self, student: nn.Module, ids: torch.Tensor) -> torch.Tensor:
        with phi0_teacher_mode(student):
            return student(input_ids=ids, use_cache=False).logits


class CacheTeacher(Teacher):
    """Top-k float logits of every training sequence, computed before training and read
    from disk by a hash of the sequence's tokens (so any split of a step's batch across
    micro-batches or processes finds its rows)."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        meta = json.loads((self.folder / "index.json").read_text())
        self.k = meta["k"]
        self.rows = {key: i for i, key in enumerate(meta["rows"])}
        self.values = np.load(self.folder / "logits.npy", mmap_mode="r")
        self.indices = np.load(self.folder / "indices.npy", mmap_mode="r")

    @staticmethod
    def key(row: torch.Tensor) -> str:
        return hashlib.sha1(row.to(torch.int64).cpu().numpy().tobytes()).hexdigest()

    @classmethod
    @torch.no_grad()
    def build(cls, float_model: nn.Module, sequences: list[torch.Tensor], k: int, folder: Path,
              log: Callable[[str], None] = print) -> CacheTeacher:
        """Run the float model over `sequences` (each `(seq_len,)`) once and keep the top
        `k` logits per position (written beside, moved into place: a killed build is redone)."""
        folder = Path(folder)
        if (folder / "index.json").is_file():
            return cls(folder)
        unique = list({cls.key(row): row for row in sequences}.items())
        seq_len = unique[0][1].numel()
        staging = folder.with_name(folder.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        values = np.lib.format.open_memmap(staging / "logits.npy", "w+", np.float16, (len(unique), seq_len - 1, k))
        indices = np.lib.format.open_memmap(staging / "indices.npy", "w+", np.int32, (len(unique), seq_len - 1, k))
        device = next(float_model.parameters()).device
        was_training = float_model.training
        float_model.eval()
        with activations.bypassed():
            for i, (_, row) in enumerate(unique):
                logits = float_model(input_ids=row[None].to(device), use_cache=False).logits[0, :-1].float()
                top = logits.topk(k, dim=-1)
                values[i] = top.values.cpu().numpy().astype(np.float16)
                indices[i] = top.indices.cpu().numpy().astype(np.int32)
        float_model.train(was_training)
        values.flush()
        indices.flush()
        del values, indices
        (staging / "index.json").write_text(json.dumps({"k": k, "rows": [key for key, _ in unique]}))
        shutil.rmtree(folder, ignore_errors=True)
        staging.rename(folder)
        log(f"teacher cache: top-{k} logits of {len(unique)} sequences, {cls.size(folder) / 2**20:.1f} MiB in {folder}")
        return cls(folder)

    @staticmethod
    def size(folder: Path) -> int:
        return sum(f.stat().st_size for f in Path(folder).iterdir())

    def targets(self, student: nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        try:
            rows = [self.rows[self.key(row)] for row in ids]
        except KeyError:
            raise LrqatError(f"the teacher cache in {self.folder} lacks a training sequence: delete the folder and "
                             "rerun (it is rebuilt for the run's data).") from None
        device = ids.device
        values = torch.from_numpy(np.stack([self.values[i] for i in rows])).to(device)
        indices = torch.from_numpy(np.stack([self.indices[i] for i in rows])).to(device)
        return values, indices


def make_teacher(kind: str, float_model: nn.Module, sequences: Callable[[], list[torch.Tensor]], top_k: int,
                 cache_folder: Path, log: Callable[[str], None] = print) -> Teacher:
    """The teacher `kind` names, made from the float model before any change to it: a
    bf16 copy (`float`; fp32 where bf16 is emulated), the student's own Φ0 (`phi0`), or the top-k cache of the
    `sequences` the run trains on (`cache`, built once into `cache_folder`)."""
    if kind == "float":
        return FloatTeacher.of(float_model)
    if kind == "phi0":
        return Phi0Teacher()
    return CacheTeacher.build(float_model, sequences(), top_k, cache_folder, log)


def check_phi0_teacher(method: str, phi: str, start: str | None = None) -> None:
    """`--teacher phi0` is near float only when Φ0 is the float weight divided by a range
    init's scale; a calibrated start (GPTQ, Block-AP) stores its own integers in Φ0, and
    the "teacher" would be that start's quantized model (measured: Block-AP's, 56.5
    against float 29.7 at W3 g64)."""
    if start is not None:
        raise LrqatError(f"--teacher phi0 is the float model only from a range-init start: with --init {start}, Φ0 "
                         f"holds {start}'s integers and the teacher would be {start}'s quantized model; use "
                         "--teacher float or cache.")
    if method != "lrqat":
        raise LrqatError(f"--teacher phi0 reads LR-QAT's stored Φ0: use it with --method lrqat, not {method} "
                         "(or --teacher float).")
    if phi == "int":
        raise LrqatError("--teacher phi0 needs Φ0's fraction (--phi fixed8 or a float φ): with --phi int, Φ0 is "
                         "the rounded RTN weight, no teacher; use --teacher float.")


@dataclass
class Objective:
    """The loss of one micro-batch: `ce`, `kd` or `ce+kd` (weight `kd_weight` on KD)."""

    loss: str = "ce"
    teacher: Teacher | None = None
    temperature: float = 1.0
    kd_weight: float = 0.5

    def __call__(self, model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
        if self.loss == "ce":
            return model(input_ids=ids, labels=ids, use_cache=False).loss
        assert self.teacher is not None, "a distillation loss needs a teacher"
        target, indices = self.teacher.targets(model, ids)
        logits = model(input_ids=ids, use_cache=False).logits
        kd = kd_loss(logits[:, :-1], target, self.temperature, indices)
        if self.loss == "kd":
            return kd
        return (1 - self.kd_weight) * next_token_ce(logits, ids) + self.kd_weight * kd

    def teacher_bytes(self) -> int:
        return 0 if self.teacher is None else self.teacher.bytes()
