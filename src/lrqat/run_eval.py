"""`lrqat eval RUN --tasks ...`: zero-shot task accuracy of a finished run, added to its
results and report: the float model, its RTN start (with the run's rotation and
activation quantizers, as the run built it) and the merged integer model as saved
(`QuantLinear` layers, not a dequantized copy)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from lrqat.errors import LrqatError
from lrqat.export.native import load_quantized
from lrqat.methods import METHODS, apply_rtn
from lrqat.models import load_model, load_tokenizer
from lrqat.online import prepare
from lrqat.report import write_results
from lrqat.rundir import RunDir, RunResult
from lrqat.spec import RunSpec
from lrqat.surgery import check_targets, init_ranges
from lrqat.tasks import task_accuracy


def evaluate_run(run: Path, tasks: list[str], limit: int | None, log: Callable[[str], None] = print) -> RunResult:
    out = RunDir(run)
    if not out.results.is_file():
        raise LrqatError(f"{run} holds no finished run (no results.json): point at the folder `lrqat quantize` wrote.")
    result = out.read_result()
    spec = RunSpec.from_dict({**result.spec, "output": str(run)})
    data = spec.data

    def score(key: str, model: torch.nn.Module, tokenizer) -> None:
        result.tasks[key] = task_accuracy(model, tokenizer, tasks, limit, data.source, data.eval_fraction)
        log(f"{key}: " + ", ".join(f"{t} acc {v.get('acc', float('nan')):.3f}" for t, v in result.tasks[key].items()))

    model, tokenizer = load_model(spec.model, dtype=spec.torch_dtype)
    score("float", model, tokenizer)
    names = [name for name, _ in check_targets(model, spec.quant, spec.targets)]
    prepare(model, spec.act, spec.rotate, spec.train.seed, names)
    rtn = apply_rtn(model, spec.quant, spec.targets, init_ranges(model, spec.quant, spec.targets, spec.ptq.range_init))
    score("rtn", rtn, tokenizer)
    del rtn, model
    merged_key = f"{result.method}_merged"
    if result.method == "rtn":
        result.tasks[merged_key] = result.tasks["rtn"]
    elif METHODS[result.method].quantized:
        score(merged_key, load_quantized(out.model), load_tokenizer(out.model))
    write_results(out, result)
    return result
