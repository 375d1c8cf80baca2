"""Run configuration as small dataclasses along the seams of a run, validated early.

`QuantSpec` is the integer grid (all a consumer of the model needs), `PTQSpec` how the
post-training start is found, `LRQATSpec` the adapter, `TrainSpec` the loop, `DataSpec`
the text; `RunSpec` holds them with the run-level settings (model, method, targets,
exports). `validate()` only checks: every check a user can fail lives here, so a bad
setting is reported before the model is loaded (seconds) rather than in the middle of a
run (minutes). `resolve()` fills the defaults once (the method's learning rates, the
step count of a token budget) and computes the run's fingerprint.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import re
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from lrqat.activations import ActSpec
from lrqat.distill import LOSSES, TEACHERS, check_phi0_teacher
from lrqat.errors import LrqatError
from lrqat.gptq import GPTQ_INPUTS
from lrqat.methods import DEFAULT_TARGETS, METHODS, STARTS, Method
from lrqat.phi import PHI_FORMATS
from lrqat.ranges import RANGE_INITS as RANGE_SETTINGS
from lrqat.rotation import ROTATIONS
from lrqat.streaming import LOADS
from lrqat.tasks import parse_tasks

PTQ_INITS = (*RANGE_SETTINGS, "gptq", "block-ap")
SCHEDULES = ("linear", "cosine", "constant")


@dataclass
class QuantSpec:
    """The integer grid of the weights: bit width, symmetry and granularity. This is all
    a consumer of the merged model needs (what `quantization.json` records).

    `group_size=None` means one scale per output channel; otherwise one scale per
    group of `group_size` consecutive input columns.
    """

    bits: int = 4
    symmetric: bool = True
    group_size: int | None = None

    def validate(self) -> None:
        if not isinstance(self.bits, int) or not 2 <= self.bits <= 8:
            raise LrqatError(f"bits={self.bits!r} is out of range: choose an integer from 2 to 8.")
        if self.group_size is not None and (not isinstance(self.group_size, int) or self.group_size <= 0):
            raise LrqatError(
                f"group size {self.group_size!r} must be a positive integer "
                "(or use --granularity channel for one scale per output channel)."
            )

    def check_layer(self, name: str, in_features: int) -> None:
        """Fail early when the group size does not tile a layer's input dimension."""
        if self.group_size is not None and in_features % self.group_size != 0:
            raise LrqatError(
                f"group size {self.group_size} does not divide the input dimension {in_features} "
                f"of layer {name}: choose a divisor of {in_features} or --granularity channel."
            )

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1)) if self.symmetric else 0

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.symmetric else 2**self.bits - 1

    def describe(self) -> str:
        gran = "per-channel" if self.group_size is None else f"g{self.group_size}"
        sym = "sym" if self.symmetric else "asym"
        return f"W{self.bits} {gran} {sym}"


@dataclass
class PTQSpec:
    """How the post-training start is found: the range setting `init` (`minmax`, the
    `lp` search; or a calibrated start from `lp` ranges: `gptq` (GPTQ's integers) or
    `block-ap` (Block-AP's integers and scales)) and their options."""

    init: str = "lp"
    act_order: bool = True
    damp: float = 0.01
    calib_tokens: int = 16384
    # GPTQ's Hessians on the quantized blocks' outputs (block-sequential, as GPTQ's own
    # code) or on the float model's hidden states (`gptq.GPTQ_INPUTS`)
    gptq_inputs: str = "quantized"
    # also evaluate GPTQ as a baseline (for G_GPTQ), whatever the method's start
    gptq_baseline: bool = False
    # Block-AP (`--init block-ap`, `--method block-ap`): passes over the calibration
    # sequences per block, and AdamW rates of the weights and of the scales
    blockap_epochs: int = 2
    blockap_lr: float = 1e-5
    blockap_lr_scales: float = 1e-4

    def validate(self) -> None:
        if self.init not in PTQ_INITS:
            raise LrqatError(f"unknown range init {self.init!r}: choose one of {', '.join(PTQ_INITS)}.")
        if not _finite(self.damp) or not 0 <= self.damp < 1:
            raise LrqatError(f"GPTQ damping {self.damp!r} is a fraction of the mean Hessian diagonal: choose [0, 1).")
        if self.gptq_inputs not in GPTQ_INPUTS:
            raise LrqatError(f"unknown --gptq-inputs {self.gptq_inputs!r}: choose one of {', '.join(GPTQ_INPUTS)}.")
        if not isinstance(self.calib_tokens, int) or self.calib_tokens <= 0:
            raise LrqatError(f"calib-tokens={self.calib_tokens!r} must be a positive integer.")
        if not isinstance(self.blockap_epochs, int) or self.blockap_epochs <= 0:
            raise LrqatError(f"blockap-epochs={self.blockap_epochs!r} must be a positive integer.")
        for name in ("blockap_lr", "blockap_lr_scales"):
            value = getattr(self, name)
            if not _finite(value) or value < 0:
                raise LrqatError(f"{name.replace('_', '-')}={value!r} must be a finite non-negative number.")

    @property
    def range_init(self) -> str:
        """The range setting: the calibrated starts (GPTQ, Block-AP) begin at the `lp` ranges."""
        return self.init if self.init in RANGE_SETTINGS else "lp"


def _finite(value: float | None) -> bool:
    return value is None or (isinstance(value, (int, float)) and math.isfinite(value))


@dataclass
class LRQATSpec:
    """The low-rank adapter and the storage format φ of the frozen base Φ0."""

    rank: int = 32
    alpha: float = 32.0
    phi: str = "fixed8"
    # compute the quantized weight with torch.compile (fused kernels; compiles per shape)
    fused: bool = False

    def validate(self) -> None:
        if not isinstance(self.rank, int) or self.rank <= 0:
            raise LrqatError(f"rank={self.rank!r} must be a positive integer (e.g. --rank 32).")
        if not _finite(self.alpha) or self.alpha <= 0:
            raise LrqatError(f"alpha={self.alpha!r} must be positive.")
        if self.phi not in PHI_FORMATS:
            raise LrqatError(f"unknown storage format phi={self.phi!r}: choose one of {', '.join(PHI_FORMATS)}.")


@dataclass
class TrainSpec:
    """The optimisation loop. Learning rates are separate for the main tensors (A/B, or
    the weights in full QAT) and for the scales s; `None` takes the method's default."""

    steps: int = 80
    batch_size: int = 4
    seq_len: int = 256
    grad_accum: int = 1
    lr: float | None = None
    lr_scales: float | None = None
    warmup: float = 0.1
    schedule: str = "linear"
    clip: float = 1.0
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.0
    grad_checkpointing: bool = True
    eval_every: int = 0
    eval_blocks: int = 2
    save_every: int = 25
    seed: int = 0
    # a token budget instead of a step count: steps = ceil(max_tokens / tokens per step)
    max_tokens: int | None = None
    # also log the metrics to TensorBoard (OUTPUT/tensorboard)
    tensorboard: bool = False
    # the objective: "ce" (next-token cross-entropy), "kd" (distillation from `teacher`)
    # or "ce+kd" (weight `kd_weight` on KD); KD at temperature `kd_temperature`
    loss: str = "ce"
    teacher: str = "float"
    kd_temperature: float = 1.0
    kd_weight: float = 0.5
    # tokens kept per position by the `cache` teacher
    kd_top_k: int = 64

    def steps_for(self, processes: int) -> int:
        """Optimizer steps of this run: `steps`, or enough to train on `max_tokens`."""
        if self.max_tokens is None:
            return self.steps
        per_step = self.batch_size * self.grad_accum * processes * self.seq_len
        return max(1, math.ceil(self.max_tokens / per_step))

    def validate(self) -> None:
        if self.max_tokens is not None and (not isinstance(self.max_tokens, int) or self.max_tokens <= 0):
            raise LrqatError(f"max-tokens={self.max_tokens!r} must be a positive integer.")
        for name in ("steps", "batch_size", "seq_len", "grad_accum"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise LrqatError(f"{name.replace('_', '-')}={value!r} must be a positive integer.")
        if self.seq_len < 2:
            raise LrqatError(f"seq-len={self.seq_len} is too short: use at least 2 tokens.")
        for name in ("lr", "lr_scales", "warmup", "clip"):
            if not _finite(getattr(self, name)):
                raise LrqatError(f"{name.replace('_', '-')}={getattr(self, name)!r} must be a finite number.")
        if (self.lr or 0) < 0 or (self.lr_scales or 0) < 0:
            raise LrqatError(f"learning rates must be non-negative (lr={self.lr}, lr-scales={self.lr_scales}).")
        if self.clip < 0:
            raise LrqatError(f"clip={self.clip!r} must be >= 0 (0 turns clipping off).")
        if not 0 <= self.warmup < 1:
            raise LrqatError(f"warmup={self.warmup!r} is a fraction of the steps: choose a value in [0, 1).")
        if self.schedule not in SCHEDULES:
            raise LrqatError(f"unknown schedule {self.schedule!r}: choose one of {', '.join(SCHEDULES)}.")
        if self.loss not in LOSSES:
            raise LrqatError(f"unknown loss {self.loss!r}: choose one of {', '.join(LOSSES)}.")
        if self.teacher not in TEACHERS:
            raise LrqatError(f"unknown teacher {self.teacher!r}: choose one of {', '.join(TEACHERS)}.")
        if not _finite(self.kd_temperature) or self.kd_temperature <= 0:
            raise LrqatError(f"kd-temperature={self.kd_temperature!r} must be a positive number.")
        if not isinstance(self.kd_top_k, int) or self.kd_top_k <= 0:
            raise LrqatError(f"kd-top-k={self.kd_top_k!r} must be a positive integer (e.g. 64).")
        if not _finite(self.kd_weight) or not 0 <= self.kd_weight <= 1:
            raise LrqatError(f"kd-weight={self.kd_weight!r} is the share of KD in ce+kd: choose a value in [0, 1].")
        if self.eval_every < 0 or self.save_every < 0:
            raise LrqatError(f"eval-every={self.eval_every} and save-every={self.save_every} must be >= 0 (0 turns them off).")


@dataclass
class DataSpec:
    """Where the text comes from and how it becomes token blocks."""

    source: str = "brown"
    # a second corpus, never trained on, evaluated beside the held-out split (e.g. "sotu")
    eval_source: str | None = None
    # read, tokenise and pack the training text lazily (corpora larger than memory)
    streaming: bool = False
    eval_fraction: float = 0.1
    eval_context: int = 1024
    eval_tokens: int = 8192
    # tokens of the --eval-data corpus to score (None: as many as eval_tokens). Its own
    # setting because a small out-of-domain set ranks methods by noise: 4 windows of the
    # built-in sotu gave a seed spread 40× Brown's, and 64 windows reversed a ranking
    eval_data_tokens: int | None = None
    # zero-shot tasks scored through lm-eval on the float, RTN and merged models ("local":
    # lrqat_lambada and lrqat_hellaswag, built from this corpus's held-out documents)
    tasks: list[str] = field(default_factory=list)
    task_limit: int | None = 200  # examples per task (None: all)

    def validate(self) -> None:
        if self.tasks:
            parse_tasks(",".join(self.tasks))
        if self.task_limit is not None and (not isinstance(self.task_limit, int) or self.task_limit < 1):
            raise LrqatError(f"task-limit={self.task_limit!r} must be a positive number of examples per task.")
        if self.eval_source is not None and self.eval_source == self.source:
            raise LrqatError(f"--eval-data {self.eval_source} is the training corpus: its held-out split is always "
                             "evaluated; name another corpus (e.g. sotu) or leave --eval-data out.")
        if not 0 < self.eval_fraction < 1:
            raise LrqatError(f"eval fraction {self.eval_fraction!r} must lie strictly between 0 and 1.")
        if self.eval_context < 2:
            raise LrqatError(f"eval context {self.eval_context} must be at least 2 tokens.")
        if self.eval_tokens < self.eval_context:
            raise LrqatError(
                f"eval tokens {self.eval_tokens} is fewer than one eval context ({self.eval_context}): "
                "raise --eval-tokens or lower --eval-context."
            )
        if self.eval_data_tokens is not None:
            if self.eval_source is None:
                raise LrqatError(f"--eval-data-tokens {self.eval_data_tokens} sizes the --eval-data corpus, but no "
                                 "--eval-data is given: name one (e.g. sotu) or leave --eval-data-tokens out.")
            if self.eval_data_tokens < self.eval_context:
                raise LrqatError(
                    f"eval-data tokens {self.eval_data_tokens} is fewer than one eval context ({self.eval_context}): "
                    "raise --eval-data-tokens or lower --eval-context."
                )

    @property
    def out_of_domain_tokens(self) -> int:
        """Tokens of the --eval-data corpus to score."""
        return self.eval_tokens if self.eval_data_tokens is None else self.eval_data_tokens


DTYPES = ("fp32", "bf16")
EXPORT_FORMATS = ("compressed-tensors", "gguf", "hf-dequantized")


def parse_choices(text: str, choices: Sequence[str], noun: str) -> list[str]:
    """A comma-separated list of names, each one of `choices`, at least one."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in choices]
    if unknown or not names:
        raise LrqatError(f"unknown {noun} {', '.join(unknown) or '(none)'}: choose from {', '.join(choices)}.")
    return names


SECTIONS = {"quant": QuantSpec, "act": ActSpec, "ptq": PTQSpec, "lrqat": LRQATSpec, "train": TrainSpec, "data": DataSpec}
RUN_KEYS = ("model", "output", "method", "targets", "dtype", "rotate", "load", "export")


@dataclass
class RunSpec:
    """One `lrqat quantize` run: everything needed to reproduce it."""

    model: str = "smollm2-135m"
    output: str = "runs/default"
    method: str = "lrqat"
    # regex of the linear layers to quantize (re.search on qualified module names)
    targets: str = DEFAULT_TARGETS
    # compute dtype of the model: "bf16" keeps frozen float tensors (embeddings, norms,
    # head) and activations in bfloat16; trainable A, B, s (and QAT's weights) stay fp32
    dtype: str = "fp32"
    # Hadamard rotations before quantization: "none" or "hadamard" (R1/R2 merged into
    # the weights; R3/R4 online where activation/KV quantizers benefit)
    rotate: str = "none"
    # how the model is read: "memory" (from_pretrained, the whole float model) or "stream"
    # (one tensor at a time from its safetensors checkpoint, baselines block by block:
    # for models the machine cannot hold as float; same results)
    load: str = "memory"
    # formats to export the merged model to after the run (RUN/export/FORMAT)
    export: list[str] = field(default_factory=list)
    quant: QuantSpec = field(default_factory=QuantSpec)
    # activation and KV-cache bit widths (16 = float)
    act: ActSpec = field(default_factory=ActSpec)
    ptq: PTQSpec = field(default_factory=PTQSpec)
    lrqat: LRQATSpec = field(default_factory=LRQATSpec)
    train: TrainSpec = field(default_factory=TrainSpec)
    data: DataSpec = field(default_factory=DataSpec)

    def validate(self) -> None:
        """Check every setting; change nothing."""
        if self.dtype not in DTYPES:
            raise LrqatError(f"unknown dtype {self.dtype!r}: choose one of {', '.join(DTYPES)}.")
        if self.method not in METHODS:
            raise LrqatError(f"unknown method {self.method!r}: choose one of {', '.join(METHODS)}.")
        if self.rotate not in ROTATIONS:
            raise LrqatError(f"unknown rotation {self.rotate!r}: choose one of {', '.join(ROTATIONS)}.")
        if self.load not in LOADS:
            raise LrqatError(f"unknown load {self.load!r}: choose one of {', '.join(LOADS)}.")
        if self.load == "stream":
            self.check_streamable()
        if self.export:
            parse_choices(",".join(self.export), EXPORT_FORMATS, "export format")
            if not METHODS[self.method].quantized:
                raise LrqatError(f"--method {self.method} is a float reference and makes no integer model to export: "
                                 "leave --export out.")
        try:
            re.compile(self.targets)
        except re.error as err:
            raise LrqatError(f"targets {self.targets!r} is not a valid regular expression ({err}).") from None
        for section in SECTIONS:
            getattr(self, section).validate()
        if self.train.loss != "ce" and self.train.teacher == "phi0":
            check_phi0_teacher(self.method, self.lrqat.phi, self.start)

    @property
    def torch_dtype(self) -> torch.dtype:
        """The compute dtype `dtype` names, as torch spells it."""
        return torch.bfloat16 if self.dtype == "bf16" else torch.float32

    @property
    def start(self) -> str | None:
        """The calibrated start (`methods.STARTS`) the method's layers are built from: the
        method's own (GPTQ, Block-AP) or the one `--init` names; None for a range-init start."""
        init = self.ptq.init
        return METHODS[self.method].start or (init if init in STARTS else None)

    @property
    def calibrated_starts(self) -> list[str]:
        """Every calibrated start the run computes, in order: the one its layers are built
        from, then GPTQ as a baseline with `--gptq-baseline` (each computed once)."""
        names = (self.start, "gptq" if self.ptq.gptq_baseline else None)
        return list(dict.fromkeys(name for name in names if name is not None))

    def check_streamable(self) -> None:
        """What `--load stream` does not do yet, refused by name: each of these needs the
        whole float model in memory."""
        needs_float = {
            "--rotate hadamard": self.rotate != "none",
            "--act-bits/--kv-bits": self.act.active,
            "--tasks": bool(self.data.tasks),
            f"--teacher {self.train.teacher}": self.train.loss != "ce" and self.train.teacher != "phi0",
        }
        refused = [flag for flag, used in needs_float.items() if used]
        if refused:
            raise LrqatError(f"--load stream does not combine with {', '.join(refused)} yet (each needs the whole "
                             "float model): use --load memory, or leave those out.")

    def resolve(self, processes: int = 1) -> ResolvedRun:
        """Validate, then fill the defaults once: the method's learning rates where none
        are given, and the step count of a `max_tokens` budget under `processes`.
        The spec itself is left as it was."""
        self.validate()
        method = METHODS[self.method]
        train = dataclasses.replace(
            self.train,
            lr=method.lr if self.train.lr is None else self.train.lr,
            lr_scales=method.lr_scales if self.train.lr_scales is None else self.train.lr_scales,
            steps=self.train.steps_for(processes),
        )
        spec = dataclasses.replace(copy.deepcopy(self), train=train)
        return ResolvedRun(spec=spec, method=method, processes=processes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> RunSpec:
        """Build from a nested dict (a YAML recipe), rejecting unknown keys by name."""
        if not isinstance(raw, dict):
            raise LrqatError(f"a recipe must be a mapping of settings, not {type(raw).__name__}.")
        kwargs: dict[str, Any] = {}
        for key, value in raw.items():
            if key in SECTIONS:
                kwargs[key] = _build(SECTIONS[key], {} if value is None else value, key)
            elif key in RUN_KEYS:
                _check_type(cls, key, value, "recipe key ")
                kwargs[key] = value
            else:
                raise LrqatError(f"unknown recipe key {key!r}: expected one of {', '.join((*RUN_KEYS, *SECTIONS))}.")
        return cls(**kwargs)


RESUMABLE_WITH_OTHER = ("lr", "lr_scales")
"""Training settings a resumed run may change (the schedule continues at the new rates)."""


@dataclass(frozen=True)
class ResolvedRun:
    """A validated run with every default filled: what the pipeline executes."""

    spec: RunSpec
    method: Method
    processes: int = 1

    @property
    def settings(self) -> dict[str, Any]:
        """Every setting that shapes the result: all but where the run lives and what is
        exported after it (results.json records these)."""
        raw = self.spec.to_dict()
        raw.pop("output")
        raw.pop("export")
        return raw

    @property
    def fingerprint(self) -> dict[str, Any]:
        """The settings a checkpoint must match to be resumed: `settings` without the
        learning rates, which a user may lower to resume a run that diverged."""
        raw = self.settings
        raw.pop("load")  # the same model either way
        raw["data"].pop("tasks")  # evaluations only: a run may be resumed to add them
        raw["data"].pop("task_limit")
        for name in RESUMABLE_WITH_OTHER:
            raw["train"].pop(name)
        return raw

    @property
    def global_batch(self) -> int:
        train = self.spec.train
        return train.batch_size * train.grad_accum * self.processes


_MOVED = {"quant": {"init": "ptq", "act_order": "ptq", "damp": "ptq"}, "data": {"calib_tokens": "ptq"},
          "lrqat": {"targets": "the top level"}, "train": {"fused": "lrqat"}}


def _build(cls: type, values: dict[str, Any], section: str) -> Any:
    if not isinstance(values, dict):
        raise LrqatError(f"recipe section {section!r} must be a mapping of settings.")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(values) - known
    moved = [f"{k} (now under {_MOVED[section][k]})" for k in sorted(unknown) if _MOVED.get(section, {}).get(k)]
    if moved:
        raise LrqatError(f"recipe section {section!r}: {', '.join(moved)}; move the key(s) there.")
    if unknown:
        raise LrqatError(
            f"unknown key(s) {', '.join(sorted(unknown))} in recipe section {section!r}: "
            f"expected some of {', '.join(sorted(known))}."
        )
    for key, value in values.items():
        _check_type(cls, key, value, f"recipe key {section}.")
    if "betas" in values:
        values = {**values, "betas": tuple(values["betas"])}
    return cls(**values)


def _type_ok(value: Any, hint: Any) -> bool:
    """Whether a YAML value fits a field's annotation (ints are accepted for floats)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (types.UnionType, typing.Union):
        return any(_type_ok(value, h) for h in args)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if origin is tuple:
        return isinstance(value, (list, tuple)) and len(value) == len(args) and all(map(_type_ok, value, args))
    if origin is list:
        return isinstance(value, list) and all(_type_ok(v, args[0]) for v in value)
    return True


def _check_type(cls: type, key: str, value: Any, what: str) -> None:
    """Refuse a recipe value of the wrong type, naming key, value and the expected type."""
    hint = typing.get_type_hints(cls)[key]
    if not _type_ok(value, hint):
        expected = next(f.type for f in dataclasses.fields(cls) if f.name == key)
        raise LrqatError(f"{what}{key} = {value!r} has the wrong type: expected {expected}.")
