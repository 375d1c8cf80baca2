"""The main job as one library call: `run_quantize(RunSpec)`.

resolve the settings → load → float eval → range init, RTN eval (the PTQ start) →
[GPTQ] → the method's layers → training → eval → merge → eval → save the integer model
→ exports → results.json and report.md. Finished evaluations are kept in the run's
stages file, so a resumed run skips them and continues training from its checkpoint.
"""

from __future__ import annotations

import copy
import gc
import json
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from transformers import PretrainedConfig

from lrqat import runtime
from lrqat.blocks import load_token_data
from lrqat.checkpoint import atomic_write_text
from lrqat.data import check_source, held_out_blocks
from lrqat.distill import CacheTeacher, Objective, Phi0Teacher, Teacher, make_teacher, phi0_teacher_mode
from lrqat.errors import LrqatError
from lrqat.evaluate import perplexity
from lrqat.export.formats import check_exportable, export_many
from lrqat.export.gguf_convert import check_gguf_architecture
from lrqat.export.native import save_quantized
from lrqat.fit import check_fits
from lrqat.memory import PhaseMeter, peak_memory_mb, return_freed_memory
from lrqat.methods import METHODS, STARTS, Method, Start, apply_method, apply_rtn, calibrated_start
from lrqat.models import load_config, load_model, load_tokenizer, resolve_model
from lrqat.online import check_model, planned_rotation, prepare
from lrqat.ranges import init_params
from lrqat.report import write_results
from lrqat.rundir import RunDir, RunResult
from lrqat.runtime import process_state
from lrqat.shard import BlockSharding, fsdp_requested
from lrqat.spec import ResolvedRun, RunSpec
from lrqat.streaming import (
    BlockDone,
    Checkpoint,
    LayerBuilder,
    MethodBuilder,
    rtn_builder,
    skeleton,
    stream_model,
    streamed_perplexities,
    streamed_start,
)
from lrqat.surgery import check_targets, count_rtn_ties, init_ranges, merge_model
from lrqat.tasks import TaskScorer, task_accuracy
from lrqat.trainer import TrainResult, train


def _quiet(_: str) -> None:
    """The log of a non-main process: one process speaks for all."""


def check_context(config: PretrainedConfig, spec: RunSpec) -> None:
    """Refuse sequences longer than the model's positions (before any weight is loaded)."""
    limit = getattr(config, "max_position_embeddings", None)
    for flag, length in (("--seq-len", spec.train.seq_len), ("--eval-context", spec.data.eval_context)):
        if limit is not None and length > limit:
            raise LrqatError(f"{flag} {length} is longer than the model's {limit} positions: use at most {limit}.")


def check_adapter_fits(targets: list[tuple[str, torch.nn.Linear]], method: Method, rank: int) -> None:
    """A low-rank adapter wider than a layer is not low rank: refuse before the evaluations."""
    if not method.adapter:
        return
    for name, linear in targets:
        width = min(linear.in_features, linear.out_features)
        if rank > width:
            raise LrqatError(f"--rank {rank} exceeds the smaller dimension {width} of layer {name}: use a rank ≤ {width}.")


def same_settings(saved: Any, current: Any, defaults: Any) -> bool:
    """Whether a saved fingerprint describes the current settings. A setting the saved one
    lacks (added to lrqat after that run started) matches when it is at its default, and
    one only the saved one holds (no longer part of a fingerprint, like the learning
    rates) is ignored, so a run of an older version resumes unless a new setting is in use."""
    if not isinstance(current, dict) or not isinstance(saved, dict):
        return saved == current
    for key, value in current.items():
        default = defaults.get(key) if isinstance(defaults, dict) else None
        if key not in saved:
            if value != default:
                return False
        elif not same_settings(saved[key], value, default):
            return False
    return True


def check_output(run: ResolvedRun, resume: bool) -> RunDir:
    """Refuse to overwrite another run, or to resume one with other settings (read-only,
    so every process of a distributed run can check before any of them writes)."""
    out = RunDir(run.spec.output)
    if out.root.exists() and not out.root.is_dir():
        raise LrqatError(f"--output {out.root} is a file: choose a folder for the run.")
    if out.holds_run() and not resume:
        raise LrqatError(f"output folder {out.root} already holds a run: pass --resume to continue it, or choose another --output.")
    if resume and out.settings.exists() and not holds_same_settings(out, run):
        raise LrqatError(f"{out.root} holds a run with other settings ({out.settings}): resume with the same settings.")
    return out


def holds_same_settings(out: RunDir, run: ResolvedRun) -> bool:
    """Whether the run folder `out` was started with `run`'s settings (`same_settings`)."""
    if not out.settings.exists():
        return False
    saved = json.loads(out.settings.read_text())
    current = json.loads(json.dumps(run.fingerprint))
    defaults = json.loads(json.dumps(RunSpec().resolve().fingerprint))
    return same_settings(saved.get("fingerprint"), current, defaults)


def finished_result(out: RunDir, run: ResolvedRun) -> RunResult | None:
    """The results of a finished run in `out` (its results.json, written last) that has
    `run`'s settings and already holds every evaluation and export `run` asks for, else
    None. A resumed run returns it instead of recomputing: a PTQ method (GPTQ, Block-AP)
    keeps no checkpoint and would otherwise be redone, and a finished comparison rerun
    would redo every method. A resume that adds tasks or exports still runs."""
    if not (out.results.exists() and holds_same_settings(out, run)):
        return None
    done = out.read_result()
    asked = run.settings["data"]
    held = done.spec.get("data", {})
    tasks_held = asked["tasks"] == [] or (set(asked["tasks"]) <= set(held.get("tasks", []))
                                          and asked["task_limit"] == held.get("task_limit"))
    exports_held = set(run.spec.export) <= {e.get("format") for e in done.exports}
    return done if tasks_held and exports_held else None


def claim_output(out: RunDir, run: ResolvedRun) -> None:
    """Create the run folder and record its settings (after `check_output`, main process only)."""
    out.root.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out.settings, json.dumps({"fingerprint": run.fingerprint, "spec": run.spec.to_dict()}, indent=2))


class Stages:
    """Results of finished stages, persisted so a resumed run does not redo them."""

    def __init__(self, out: RunDir, writer: bool = True) -> None:
        self.out = out
        self.writer = writer  # in a distributed run only the main process writes
        self.values: dict[str, Any] = out.read_stages()

    def get(self, name: str, compute: Callable[[], Any]) -> Any:
        if name not in self.values:
            self.values[name] = compute()
            if self.writer:
                self.out.write_stages(self.values)
        return self.values[name]


def _memory_start(model: torch.nn.Module, spec: RunSpec, method: Method, measure: Callable[..., float],
                  baselines: dict[str, float], stages: Stages, data: Any, log: Callable[[str], None],
                  score_tasks: TaskScorer) -> tuple[torch.nn.Module, float, int]:
    """From the float model in memory: range init, the RTN baseline, the calibrated starts
    (measured into `baselines`), then the method's layers in place. Returns the
    model, RTN's perplexity and the count of LR-QAT's step-0 integers that differ from RTN."""
    quant, ptq, targets = spec.quant, spec.ptq, spec.targets
    log(f"range init ({ptq.range_init}) for {quant.describe()}")
    ranges = init_ranges(model, quant, targets, ptq.range_init)
    rtn_model = apply_rtn(copy.deepcopy(model), quant, targets, ranges)
    ppl_rtn = measure("rtn", "RTN", rtn_model)
    score_tasks("rtn", rtn_model)
    # Calibrated starts (GPTQ, Block-AP): the method's own, the one --init asks for, and
    # GPTQ as a baseline with --gptq-baseline; each is evaluated unless it is the method.
    start = spec.start
    starts: dict[str, Start] = {}
    if spec.calibrated_starts:
        calib = data.train.first(max(1, ptq.calib_tokens // spec.train.seq_len))
    for name in spec.calibrated_starts:
        log(f"{name} on {calib.numel()} calibration tokens")
        starts[name] = calibrated_start(name, model, quant, targets, ranges, calib, ptq, log)
        if name != method.name:
            start_ranges, start_integers = starts[name]
            baseline = apply_method(name, copy.deepcopy(model), quant, spec.lrqat, start_ranges,
                                    integers=start_integers, targets=targets)
            baselines[name] = measure(name, METHODS[name].label, baseline)
            del baseline

    start_ranges, start_integers = starts[start] if start is not None else (ranges, None)
    apply_method(method.name, model, quant, spec.lrqat, start_ranges, seed=spec.train.seed, integers=start_integers,
                 targets=targets, init=ptq.range_init)
    ties = stages.get("rtn_tie_differences", partial(count_rtn_ties, model, rtn_model))
    return model, ppl_rtn, ties


def streamed_baselines(checkpoint: Checkpoint, config: PretrainedConfig, dtype: torch.dtype, targets: list[str],
                       windows: dict[str, torch.Tensor | None], rtn: LayerBuilder, stages: Stages,
                       log: Callable[[str], None]) -> None:
    """Float and RTN perplexities on every window set (`prefix → windows`; None: absent)
    computed block by block in one pass, into the stages as `{prefix}ppl_float` and
    `{prefix}ppl_rtn` (a resumed run skips the pass)."""
    windows = {prefix: ids for prefix, ids in windows.items() if ids is not None}
    keys = [f"{prefix}ppl_{variant}" for prefix in windows for variant in ("float", "rtn")]
    if all(key in stages.values for key in keys):
        return
    log("float and RTN perplexities, one block at a time")
    started = time.perf_counter()
    found = streamed_perplexities(checkpoint, config, dtype, targets, windows, {"float": None, "rtn": rtn})
    for prefix in windows:
        for variant in ("float", "rtn"):
            stages.get(f"{prefix}ppl_{variant}", lambda v=variant, p=prefix: found[v][p].ppl)
    log(f"block-by-block evaluation took {time.perf_counter() - started:.0f} s")


def _streamed_start(checkpoint: Checkpoint, config: PretrainedConfig, spec: RunSpec, method: Method,
                    targets: list[str], data: Any, windows: dict[str, torch.Tensor | None],
                    measure: Callable[..., float], baselines: dict[str, float], stages: Stages,
                    log: Callable[[str], None], on_block: BlockDone | None = None) -> tuple[torch.nn.Module, int]:
    """From the checkpoint, one layer at a time: range init and the method's layers,
    after a calibrated start block by block when the method starts from one (`--init
    gptq|block-ap`, `--method gptq|block-ap`); a start asked for as a baseline only
    (`--gptq-baseline`) runs its own pass. Each start's perplexities are measured in its
    pass and kept as stages. Each decoder block goes to `on_block` when built (FSDP
    shards it there). Returns the model and the count of LR-QAT's step-0 integers that
    differ from RTN's."""
    quant, ptq, dtype = spec.quant, spec.ptq, spec.torch_dtype
    grids: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}  # range init, computed once per target

    def ranges(name: str, linear: torch.nn.Linear) -> tuple[torch.Tensor, torch.Tensor | None]:
        if name not in grids:
            grids[name] = init_params(linear.weight.detach(), quant, ptq.range_init)
        return grids[name]

    def range_grid(name: str, linear: torch.nn.Linear) -> tuple[torch.Tensor, torch.Tensor | None]:
        grid = ranges(name, linear)
        del grids[name]  # the builder takes each target once
        return grid

    builder = MethodBuilder(method.name, quant, spec.lrqat, ptq.range_init, spec.train.seed, range_grid)
    start = spec.start
    windows = {prefix: ids for prefix, ids in windows.items() if ids is not None}

    model = None
    for name in spec.calibrated_starts:
        builds = name == start
        if builds or not all(f"{prefix}ppl_{name}" in stages.values for prefix in windows):
            calib = data.train.first(max(1, ptq.calib_tokens // spec.train.seq_len))
            log(f"range init ({ptq.range_init}) and {name} on {calib.numel()} calibration tokens, one block at a "
                "time" + (f", then {method.name} layers" if builds else ""))
            calibrated = STARTS[name]
            built, found = streamed_start(checkpoint, config, dtype, targets, quant, calib,
                                          calibrated.calibrator(quant, ranges, ptq, log), calibrated.float_path(ptq),
                                          builder if builds else None, windows, on_block if builds else None)
            model = built if builds else model
            for prefix, ppl in found.items():
                stages.get(f"{prefix}ppl_{name}", lambda p=ppl: p.ppl)
        if name != method.name:
            baselines[name] = measure(name, METHODS[name].label, None)  # measured in the pass above
    grids.clear()  # those of a baseline-only pass
    if model is None:
        log(f"range init ({ptq.range_init}) for {quant.describe()} and {method.name} layers, layer by layer")
        model = stream_model(checkpoint, config, dtype, targets, builder, on_block)
    ties = stages.get("rtn_tie_differences", lambda: builder.ties)
    return model, ties


def run_quantize(spec: RunSpec, resume: bool = False, log: Callable[[str], None] = print) -> RunResult:
    """Run one method (LR-QAT by default) end to end, then its exports; return the
    results, also written to the output folder."""
    # Under `accelerate launch`/torchrun every process runs this function: all of them
    # compute (evaluations are repeated, cheap next to training), only the main one
    # writes, and the main one fills the caches first.
    return_freed_memory()  # so that what a streamed load drops leaves the process
    procs = process_state()
    run = spec.resolve(procs.num_processes)
    spec, method = run.spec, run.method
    check_source(spec.data.source)
    if spec.data.eval_source is not None:
        check_source(spec.data.eval_source)
    # refuse before hours of training, not after
    check_exportable(spec.export, spec.quant, spec.act, planned_rotation(spec.rotate, spec.act))
    main = procs.is_main_process
    if not main:
        log = _quiet
    out = check_output(run, resume)
    if resume and (done := finished_result(out, run)) is not None:
        log(f"{out.root} holds a finished run with these settings: reusing {out.results} (delete the folder to redo it)")
        return done
    dtype = spec.torch_dtype
    if (warning := runtime.slow_dtype_warning(spec.dtype)) is not None:
        log(warning)
    meter = PhaseMeter()
    streaming = spec.load == "stream"
    with procs.main_process_first():
        config = load_config(spec.model)
        check_context(config, spec)
        check_fits(config, spec, procs.num_processes, fsdp_requested())  # before any weight is read
        if "gguf" in spec.export:
            check_gguf_architecture(config)
        log(f"loading model {spec.model}" + (" (streaming: one tensor at a time)" if streaming else ""))
        if streaming:  # the skeleton, no float weights; they are read where they are used
            resolved = resolve_model(spec.model)
            checkpoint, tokenizer, model = Checkpoint(resolved), load_tokenizer(resolved), skeleton(config, dtype)
        else:
            model, tokenizer = load_model(spec.model, dtype=dtype)
            model.to(procs.device)  # this process's GPU, or the CPU
    meter.end("load")
    found = check_targets(model, spec.quant, spec.targets)
    check_adapter_fits(found, method, spec.lrqat.rank)
    check_model(model, spec.rotate)
    procs.wait_for_everyone()
    if main:
        claim_output(out, run)
    procs.wait_for_everyone()
    stages = Stages(out, writer=main)
    torch.manual_seed(spec.train.seed)
    log(f"loading data {spec.data.source}")
    if spec.train.max_tokens is not None:
        log(f"--max-tokens {spec.train.max_tokens}: {spec.train.steps} steps of {run.global_batch * spec.train.seq_len} tokens")
    with procs.main_process_first():
        data = load_token_data(
            tokenizer, spec.data.source, spec.train.seq_len, spec.data.eval_context, spec.data.eval_tokens,
            spec.data.eval_fraction, max_train_tokens=spec.train.steps * run.global_batch * spec.train.seq_len,
            seed=spec.train.seed, streaming=spec.data.streaming,
        )
    log(data.describe())
    scored = int(data.eval.shape[0] * (data.eval.shape[1] - 1))
    asked = spec.data.eval_tokens // spec.data.eval_context * spec.data.eval_context  # whole windows
    if data.eval.numel() < asked:
        log(f"note: the eval split holds fewer tokens than --eval-tokens {spec.data.eval_tokens}: "
            f"scoring {scored} tokens in {data.eval.shape[0]} windows of {data.eval.shape[1]}")

    held_out = None
    if spec.data.eval_source is not None:
        held_out = held_out_blocks(tokenizer, spec.data.eval_source, spec.data.eval_context,
                                   spec.data.out_of_domain_tokens)
        log(f"out-of-domain eval: {spec.data.eval_source}, {held_out.shape[0]} windows of {held_out.shape[1]}")
    ppl_ood: dict[str, float] = {}

    def evaluate(name: str, m: torch.nn.Module, blocks: torch.Tensor) -> float:
        started = time.perf_counter()
        ppl = perplexity(m, blocks).ppl
        log(f"perplexity {name}: {ppl:.3f} ({time.perf_counter() - started:.0f} s)")
        return ppl

    def measure(key: str, name: str, m: torch.nn.Module, staged: bool = True, out_of_domain: bool = True) -> float:
        """The held-out split's perplexity (returned) and, with --eval-data and
        `out_of_domain`, the out-of-domain one (into `ppl_ood`); finished ones are kept
        as stages."""
        ppl = (stages.get(f"ppl_{key}", partial(evaluate, name, m, data.eval)) if staged
               else evaluate(name, m, data.eval))
        if held_out is not None and out_of_domain:
            ood_name = f"{name} [{spec.data.eval_source}]"
            ppl_ood[key] = (stages.get(f"ood_ppl_{key}", partial(evaluate, ood_name, m, held_out)) if staged
                            else evaluate(ood_name, m, held_out))
        return ppl

    task_scores: dict[str, dict[str, dict[str, float]]] = {}

    def score_tasks(key: str, m: torch.nn.Module, staged: bool = True) -> None:
        """Zero-shot accuracy of `m` on --tasks (nothing without them), kept as a stage."""
        if not spec.data.tasks:
            return

        def score() -> dict[str, dict[str, float]]:
            started = time.perf_counter()
            found = task_accuracy(m, tokenizer, spec.data.tasks, spec.data.task_limit, spec.data.source,
                                  spec.data.eval_fraction)
            log(f"tasks {key}: " + ", ".join(f"{t} {v.get('acc', float('nan')):.3f}" for t, v in found.items())
                + f" ({time.perf_counter() - started:.0f} s)")
            return found

        task_scores[key] = stages.get(f"tasks_{key}", score) if staged else score()

    if streaming:  # the float and RTN baselines block by block, kept as the stages measure() reads
        streamed_baselines(checkpoint, config, dtype, [name for name, _ in found],
                           {"": data.eval, "ood_": held_out}, rtn_builder(spec.quant, spec.ptq.range_init), stages, log)
    ppl_float = measure("float", "float", model)
    score_tasks("float", model)
    teacher: Teacher | None = None
    if method.trained and spec.train.loss != "ce":
        def sequences() -> list[torch.Tensor]:  # every sequence the run trains on (for the cache teacher)
            return [row for step in range(spec.train.steps) for row in data.train.batch(step, run.global_batch)]

        with procs.main_process_first():  # the main process builds a cache, the others read it
            teacher = make_teacher(spec.train.teacher, model, sequences, spec.train.kd_top_k,
                                   out.root / "teacher_cache", log)
    cache_bytes = CacheTeacher.size(teacher.folder) if isinstance(teacher, CacheTeacher) else 0
    # Rotations and activation/KV quantizers come before the weights are quantized: range
    # init, GPTQ and Φ0 all see the rotated weights; every model below carries them.
    if spec.rotate != "none":
        log(f"rotating the model ({spec.rotate})")
    rotation = prepare(model, spec.act, spec.rotate, spec.train.seed, [name for name, _ in found])
    ppl_online = {}
    if spec.act.active:
        ppl_online["float_act"] = measure("float_act", f"float {spec.act.describe()}", model)
    quant, ptq = spec.quant, spec.ptq
    baselines: dict[str, float] = {}
    sharding: BlockSharding | None = None
    if streaming:
        ppl_rtn = measure("rtn", "RTN", model)  # measured block by block above
        if fsdp_requested():  # every process reads the checkpoint and keeps only its shards of each block
            sharding = BlockSharding(procs.device)
        model, ties = _streamed_start(checkpoint, config, spec, method, [name for name, _ in found], data,
                                      {"": data.eval, "ood_": held_out}, measure, baselines, stages, log, sharding)
    else:
        model, ppl_rtn, ties = _memory_start(model, spec, method, measure, baselines, stages, data, log,
                                             score_tasks)
    model.to(procs.device)  # adapters are created on the CPU (seeded CPU generator)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    meter.end("setup")  # data, baselines, range init, the method's layers

    teacher_ppl: dict[str, float] = {}
    if method.trained:
        objective = Objective(spec.train.loss, teacher, spec.train.kd_temperature, spec.train.kd_weight)
        if isinstance(teacher, Phi0Teacher):  # how near float the teacher is: its own perplexity
            with phi0_teacher_mode(model):
                ppl_teacher = measure("teacher_phi0", "phi0 teacher", model)
            log(f"phi0 teacher vs float perplexity: {ppl_teacher:.3f} vs {ppl_float:.3f}")
            teacher_ppl["teacher_phi0"] = ppl_teacher
        result = train(model, data.train, data.eval, spec.train, out.root, run.fingerprint, resume=resume, log=log,
                       objective=objective, sharding=sharding)
        del teacher, objective
        model = result.model
        if model is None:  # FSDP: the trained model is gathered in the main process only, which finishes the run
            procs.wait_for_everyone()
            return RunResult.from_dict(json.loads(out.results.read_text()))
        # a quantized method's training-time model is scored out of domain through its merged
        # model only: merging is exact (checked on the held-out split below), and a large
        # --eval-data set would otherwise be scored twice per run
        ppl_trained = measure(method.name, f"{method.name} (training-time)", model, staged=False,
                              out_of_domain=not method.quantized)
        meter.end("train")
        if method.quantized:
            merge_model(model)
            ppl_merged = measure(f"{method.name}_merged", f"{method.name} merged", model, staged=False)
            score_tasks(f"{method.name}_merged", model, staged=False)
            meter.end("merge")
        else:  # a float reference: its final model is the trained one
            ppl_merged = ppl_trained
            score_tasks(f"{method.name}_merged", model, staged=False)
            if held_out is not None:
                ppl_ood[f"{method.name}_merged"] = ppl_ood[method.name]
    else:
        result = TrainResult(steps=0, tokens=0, seconds=0.0, peak_rss_mb=round(peak_memory_mb(), 1))
        # RTN's integer model is the baseline already evaluated; GPTQ's is new.
        if method.name == "rtn":
            ppl_merged = ppl_rtn
            if "rtn" in task_scores:
                task_scores["rtn_merged"] = task_scores["rtn"]
            if held_out is not None:
                ppl_ood["rtn_merged"] = ppl_ood["rtn"]
        else:
            ppl_merged = measure(f"{method.name}_merged", f"{method.name} merged", model, staged=False)
            score_tasks(f"{method.name}_merged", model, staged=False)
        ppl_trained = ppl_merged
        if method.start is not None:  # the method is itself a baseline of the others' gaps
            baselines[method.name] = ppl_merged
            if held_out is not None:
                ppl_ood[method.name] = ppl_ood[f"{method.name}_merged"]
    ppl_ptq = baselines[ptq.init] if ptq.init in STARTS else ppl_rtn  # (a start method measured itself above)
    if main and method.quantized:
        save_quantized(model, tokenizer, out.model, quant, source=spec.model, act=spec.act, rotation=rotation)
        meter.end("save")

    results = RunResult(
        model=spec.model,
        data=spec.data.source,
        method=method.name,
        spec=run.settings,
        eval_tokens=scored,
        context=int(data.eval.shape[1]),
        ppl={"float": ppl_float, **ppl_online, **teacher_ppl, "rtn": ppl_rtn, **baselines, "ptq": ppl_ptq,
             method.name: ppl_trained, f"{method.name}_merged": ppl_merged},
        ppl_ood=ppl_ood,
        eval_data=spec.data.eval_source,
        eval_data_tokens=0 if held_out is None else int(held_out.shape[0] * (held_out.shape[1] - 1)),
        merged_vs_training_rel_diff=abs(ppl_merged - ppl_trained) / ppl_trained,
        rtn_tie_differences=ties,
        trainable_params=trainable,
        processes=procs.num_processes,
        sharding="fsdp" if fsdp_requested() else "ddp" if procs.num_processes > 1 else "none",
        distributed=str(procs.distributed_type.value),
        train={"steps": result.steps, "tokens": result.tokens, "seconds": result.seconds,
               "peak_rss_mb": result.peak_rss_mb, "bill_bytes": result.bill_bytes,
               "final_loss": result.losses[-1] if result.losses else None, "teacher_cache_bytes": cache_bytes},
        model_dir=str(out.model) if method.quantized else "",
        tasks=task_scores,
    )
    # The exports read the saved model back; the one in memory goes first, so a model
    # the size of the machine is never held twice (at 7B, 4 GiB of packed integers).
    del model
    result.model = None
    gc.collect()
    if main:
        if spec.export:
            results.exports = export_many(out.root, spec.export)
            meter.end("export")
        results.phases = meter.phases
        write_results(out, results)
    procs.wait_for_everyone()
    log(f"wrote {out.results} and {out.report}")
    return results
