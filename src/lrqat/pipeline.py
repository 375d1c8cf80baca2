"""The main job as one library call: `run_quantize(RunSpec)`.

float eval → RTN eval (the PTQ start) → LR-QAT training → eval → merge → eval →
save the integer model → results.json and report.md. Finished evaluations are kept in
`stages.json`, so a resumed run skips them and continues training from its checkpoint.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch

from lrqat.checkpoint import CHECKPOINT_NAME, atomic_write_text
from lrqat.data import TokenData, check_source, prepare_data
from lrqat.errors import LrqatError
from lrqat.evaluate import perplexity
from lrqat.export.native import save_quantized
from lrqat.methods import TRAINED, apply_method, apply_rtn, gptq_start
from lrqat.models import load_model
from lrqat.report import write_results
from lrqat.shard import fsdp_requested
from lrqat.spec import RunSpec
from lrqat.stream import TokenStream, stream_eval_blocks
from lrqat.surgery import check_targets, count_rtn_ties, init_ranges, merge_model
from lrqat.train import TrainResult, peak_memory_mb, process_state, train

STAGES_NAME = "stages.json"


def _quiet(_: str) -> None:
    """The log of a non-main process: one process speaks for all."""


def fingerprint(spec: RunSpec) -> dict[str, Any]:
    """The settings a checkpoint must match to be resumed (all but the output path)."""
    raw = spec.to_dict()
    raw.pop("output")
    return raw


def check_output(spec: RunSpec, resume: bool) -> Path:
    """Refuse to overwrite another run, or to resume one with other settings (read-only,
    so every process of a distributed run can check before any of them writes)."""
    out = Path(spec.output)
    has_run = (out / CHECKPOINT_NAME).exists() or (out / STAGES_NAME).exists()
    if has_run and not resume:
        raise LrqatError(f"output folder {out} already holds a run: pass --resume to continue it, or choose another --output.")
    run_file = out / "run.json"
    if resume and run_file.exists():
        saved = json.loads(run_file.read_text())
        saved.pop("output", None)
        if saved != json.loads(json.dumps(fingerprint(spec))):
            raise LrqatError(f"{out} holds a run with other settings ({run_file}): resume with the same settings.")
    return out


def claim_output(out: Path, spec: RunSpec) -> None:
    """Create the run folder and record its settings (after `check_output`, main process only)."""
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "run.json", json.dumps(spec.to_dict(), indent=2))


class Stages:
    """Results of finished stages, persisted so a resumed run does not redo them."""

    def __init__(self, path: Path, writer: bool = True) -> None:
        self.path = path
        self.writer = writer  # in a distributed run only the main process writes
        self.values: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}

    def get(self, name: str, compute: Callable[[], Any]) -> Any:
        if name not in self.values:
            self.values[name] = compute()
            if self.writer:
                atomic_write_text(self.path, json.dumps(self.values, indent=2))
        return self.values[name]


def run_quantize(spec: RunSpec, resume: bool = False, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run one method (LR-QAT by default) end to end; return the results dict, also
    written to the output folder."""
    spec.validate()
    check_source(spec.data.source)
    # Under `accelerate launch`/torchrun every process runs this function: all of them
    # compute (evaluations are repeated, cheap next to training), only the main one
    # writes, and the main one fills the caches first.
    procs = process_state()
    main = procs.is_main_process
    if not main:
        log = _quiet
    log(f"loading model {spec.model}")
    with procs.main_process_first():
        model, tokenizer = load_model(spec.model, dtype=torch.bfloat16 if spec.dtype == "bf16" else torch.float32)
    model.to(procs.device)  # this process's GPU, or the CPU
    check_targets(model, spec.quant, spec.lrqat.targets)
    out = check_output(spec, resume)
    procs.wait_for_everyone()
    if main:
        claim_output(out, spec)
    procs.wait_for_everyone()
    stages = Stages(out / STAGES_NAME, writer=main)
    torch.manual_seed(spec.train.seed)
    log(f"loading data {spec.data.source}")
    global_batch = spec.train.batch_size * spec.train.grad_accum * procs.num_processes
    if spec.train.max_tokens is not None:
        spec.train.steps = spec.train.steps_for(procs.num_processes)
        log(f"--max-tokens {spec.train.max_tokens}: {spec.train.steps} steps of {global_batch * spec.train.seq_len} tokens")
    with procs.main_process_first():
        if spec.data.streaming:
            data = TokenData(
                train=TokenStream(tokenizer, spec.data.source, spec.train.seq_len, spec.data.eval_fraction, spec.train.seed),
                eval=stream_eval_blocks(tokenizer, spec.data.source, spec.data.eval_context, spec.data.eval_tokens,
                                        spec.data.eval_fraction),
            )
            log(f"streaming train blocks of {spec.train.seq_len}, {data.eval.shape[0]} eval blocks of {data.eval.shape[1]}")
        else:
            data = prepare_data(
                tokenizer, spec.data.source, spec.train.seq_len, spec.data.eval_context, spec.data.eval_tokens,
                spec.data.eval_fraction, max_train_tokens=spec.train.steps * global_batch * spec.train.seq_len,
                seed=spec.train.seed,
            )
            log(f"{data.train.shape[0]} train blocks of {data.train.shape[1]}, "
                f"{data.eval.shape[0]} eval blocks of {data.eval.shape[1]}")

    def evaluate(name: str, m: torch.nn.Module) -> float:
        started = time.perf_counter()
        ppl = perplexity(m, data.eval).ppl
        log(f"perplexity {name}: {ppl:.3f} ({time.perf_counter() - started:.0f} s)")
        return ppl

    ppl_float = stages.get("ppl_float", lambda: evaluate("float", model))
    quant, targets = spec.quant, spec.lrqat.targets
    log(f"range init ({quant.range_init}) for {quant.describe()}")
    ranges = init_ranges(model, quant, targets)
    rtn_model = apply_rtn(copy.deepcopy(model), quant, targets, ranges)
    ppl_rtn = stages.get("ppl_rtn", partial(evaluate, "RTN", rtn_model))
    integers = None
    if spec.method == "gptq" or quant.init == "gptq":
        n_calib = max(1, spec.data.calib_tokens // spec.train.seq_len)
        calib = data.train.first(n_calib) if spec.data.streaming else data.train[:n_calib]
        log(f"GPTQ on {calib.numel()} calibration tokens")
        integers = gptq_start(model, quant, targets, ranges, calib)
    ppl_ptq = ppl_rtn
    if quant.init == "gptq":
        gptq_model = apply_method("gptq", copy.deepcopy(model), quant, spec.lrqat, ranges, integers=integers)
        ppl_ptq = stages.get("ppl_gptq", partial(evaluate, "GPTQ", gptq_model))
        del gptq_model

    apply_method(spec.method, model, quant, spec.lrqat, ranges, seed=spec.train.seed, integers=integers)
    model.to(procs.device)  # adapters are created on the CPU (seeded CPU generator)
    ties = stages.get("rtn_tie_differences", partial(count_rtn_ties, model, rtn_model))
    del rtn_model
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)

    if spec.method in TRAINED:
        result = train(model, data.train, data.eval, spec.train, out, fingerprint(spec), resume=resume)
        model = result.model
        ppl_trained = evaluate(f"{spec.method} (training-time)", model)
        merge_model(model)
        ppl_merged = evaluate(f"{spec.method} merged", model)
    else:
        result = TrainResult(steps=0, tokens=0, seconds=0.0, peak_rss_mb=round(peak_memory_mb(), 1))
        # RTN's integer model is the baseline already evaluated; GPTQ's is new.
        ppl_merged = ppl_rtn if spec.method == "rtn" else evaluate(f"{spec.method} merged", model)
        ppl_trained = ppl_merged
    if main:
        save_quantized(model, tokenizer, out / "model", quant)

    results = {
        "model": spec.model,
        "data": spec.data.source,
        "method": spec.method,
        "spec": fingerprint(spec),
        "eval_tokens": int(data.eval.shape[0] * (data.eval.shape[1] - 1)),
        "context": int(data.eval.shape[1]),
        "ppl": {"float": ppl_float, "rtn": ppl_rtn, "ptq": ppl_ptq,
                spec.method: ppl_trained, f"{spec.method}_merged": ppl_merged},
        "gap_recovered": (ppl_rtn - ppl_merged) / (ppl_rtn - ppl_float) if ppl_rtn != ppl_float else None,
        "merged_vs_training_rel_diff": abs(ppl_merged - ppl_trained) / ppl_trained,
        "rtn_tie_differences": ties,
        "trainable_params": trainable,
        "processes": procs.num_processes,
        "sharding": "fsdp" if fsdp_requested() else "ddp" if procs.num_processes > 1 else "none",
        "distributed": str(procs.distributed_type.value),
        "train": {"steps": result.steps, "tokens": result.tokens, "seconds": result.seconds,
                  "peak_rss_mb": result.peak_rss_mb, "bill_bytes": result.bill_bytes,
                  "final_loss": result.losses[-1] if result.losses else None},
        "model_dir": str(out / "model"),
    }
    if main:
        write_results(out, results)
    procs.wait_for_everyone()
    log(f"wrote {out / 'results.json'} and {out / 'report.md'}")
    return results
