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
from lrqat.data import check_source, prepare_data
from lrqat.errors import LrqatError
from lrqat.evaluate import perplexity
from lrqat.export.native import save_quantized
from lrqat.models import load_model
from lrqat.report import write_results
from lrqat.spec import RunSpec
from lrqat.surgery import apply_lrqat, apply_rtn, check_targets, count_rtn_ties, init_ranges, merge_model
from lrqat.train import train

STAGES_NAME = "stages.json"


def fingerprint(spec: RunSpec) -> dict[str, Any]:
    """The settings a checkpoint must match to be resumed (all but the output path)."""
    raw = spec.to_dict()
    raw.pop("output")
    return raw


def prepare_output(spec: RunSpec, resume: bool) -> Path:
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
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_file, json.dumps(spec.to_dict(), indent=2))
    return out


class Stages:
    """Results of finished stages, persisted so a resumed run does not redo them."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.values: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}

    def get(self, name: str, compute: Callable[[], Any]) -> Any:
        if name not in self.values:
            self.values[name] = compute()
            atomic_write_text(self.path, json.dumps(self.values, indent=2))
        return self.values[name]


def run_quantize(spec: RunSpec, resume: bool = False, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run LR-QAT end to end and return the results dict (also written to the output folder)."""
    spec.validate()
    check_source(spec.data.source)
    log(f"loading model {spec.model}")
    model, tokenizer = load_model(spec.model)
    check_targets(model, spec.quant, spec.lrqat.targets)
    out = prepare_output(spec, resume)
    stages = Stages(out / STAGES_NAME)
    torch.manual_seed(spec.train.seed)
    log(f"loading data {spec.data.source}")
    data = prepare_data(
        tokenizer, spec.data.source, spec.train.seq_len, spec.data.eval_context, spec.data.eval_tokens,
        spec.data.eval_fraction,
        max_train_tokens=spec.train.steps * spec.train.batch_size * spec.train.grad_accum * spec.train.seq_len,
        seed=spec.train.seed,
    )
    log(f"{data.train.shape[0]} train blocks of {data.train.shape[1]}, {data.eval.shape[0]} eval blocks of {data.eval.shape[1]}")

    def evaluate(name: str, m: torch.nn.Module) -> float:
        started = time.perf_counter()
        ppl = perplexity(m, data.eval).ppl
        log(f"perplexity {name}: {ppl:.3f} ({time.perf_counter() - started:.0f} s)")
        return ppl

    ppl_float = stages.get("ppl_float", lambda: evaluate("float", model))
    log(f"range init ({spec.quant.init}) for {spec.quant.describe()}")
    ranges = init_ranges(model, spec.quant, spec.lrqat.targets)
    rtn_model = apply_rtn(copy.deepcopy(model), spec.quant, spec.lrqat.targets, ranges)
    ppl_ptq = stages.get("ppl_ptq", partial(evaluate, "RTN", rtn_model))

    apply_lrqat(model, spec.quant, spec.lrqat, seed=spec.train.seed, ranges=ranges)
    ties = stages.get("rtn_tie_differences", partial(count_rtn_ties, model, rtn_model))
    del rtn_model
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)

    result = train(model, data.train, data.eval, spec.train, out, fingerprint(spec), resume=resume)
    ppl_lrqat = evaluate("LR-QAT (training-time)", model)
    merge_model(model)
    ppl_merged = evaluate("LR-QAT merged", model)
    save_quantized(model, tokenizer, out / "model", spec.quant)

    results = {
        "model": spec.model,
        "data": spec.data.source,
        "spec": fingerprint(spec),
        "eval_tokens": int(data.eval.shape[0] * (data.eval.shape[1] - 1)),
        "context": int(data.eval.shape[1]),
        "ppl": {"float": ppl_float, "ptq": ppl_ptq, "lrqat": ppl_lrqat, "lrqat_merged": ppl_merged},
        "gap_recovered": (ppl_ptq - ppl_merged) / (ppl_ptq - ppl_float) if ppl_ptq != ppl_float else None,
        "merged_vs_training_rel_diff": abs(ppl_merged - ppl_lrqat) / ppl_lrqat,
        "rtn_tie_differences": ties,
        "trainable_params": trainable,
        "train": {"steps": result.steps, "tokens": result.tokens, "seconds": result.seconds,
                  "peak_rss_mb": result.peak_rss_mb, "final_loss": result.losses[-1] if result.losses else None},
        "model_dir": str(out / "model"),
    }
    write_results(out, results)
    log(f"wrote {out / 'results.json'} and {out / 'report.md'}")
    return results
