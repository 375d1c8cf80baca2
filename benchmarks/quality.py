"""Quality benchmark: every method on the built-in model and corpus, three settings.

Runs `lrqat compare` for W4 per-channel symmetric, W4 g64 asymmetric and W3 g64
asymmetric (g64, not g128: the model's hidden size 576 is not a multiple of 128) with one token budget for all trained methods, prints a table, and writes
`benchmarks/results/quality.json` and `quality.md` (the run folders go under
`runs/quality/`, so an interrupted benchmark resumes where it stopped).

    .venv/bin/python benchmarks/quality.py                # the recorded budget
    .venv/bin/python benchmarks/quality.py --steps 5      # a quick look
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from _results import machine, write_results

from lrqat.compare import render_compare, run_compare
from lrqat.methods import METHODS
from lrqat.spec import DataSpec, QuantSpec, RunSpec, TrainSpec

# The built-in model's hidden size is 576 = 9 · 64: group 128 does not tile it, so the
# group settings use g64, the nearest group size that divides every layer.
SETTINGS = {
    "w4-channel-sym": QuantSpec(bits=4, symmetric=True, group_size=None),
    "w4-g64-asym": QuantSpec(bits=4, symmetric=False, group_size=64),
    "w3-g64-asym": QuantSpec(bits=3, symmetric=False, group_size=64),
}
TARGETS = {"w4-channel-sym": 0.90, "w3-g64-asym": 0.85}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps of every trained method")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--eval-tokens", type=int, default=4096)
    parser.add_argument("--settings", default=",".join(SETTINGS))
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--output", default="runs/quality")
    parser.add_argument("--report-only", action="store_true",
                        help="only collect the settings whose comparison already finished into the results files")
    args = parser.parse_args()

    started = time.time()
    summaries = {}
    for name in args.settings.split(","):
        if args.report_only:
            done = Path(args.output) / name / "compare.json"
            if done.exists():
                summaries[name] = json.loads(done.read_text())
            continue
        spec = RunSpec(
            output=f"{args.output}/{name}",
            quant=SETTINGS[name],
            train=TrainSpec(steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, save_every=5),
            data=DataSpec(eval_tokens=args.eval_tokens),
        )
        summaries[name] = run_compare(spec, args.methods.split(","))
    command = " ".join(["python benchmarks/quality.py", *[
        f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k not in ("output", "report_only")]])
    record = {"command": command, "machine": machine(),
              "minutes": None if args.report_only else round((time.time() - started) / 60, 1),
              "settings": summaries}
    write_results("quality", record, render(record))


def render(record: dict) -> str:
    took = f"{record['minutes']} min" if record["minutes"] is not None else "time: see the run folders"
    lines = ["# Quality benchmark", "", f"Command: `{record['command']}` ({took}, 2 CPU cores).", ""]
    for name, summary in record["settings"].items():
        lines += [render_compare(summary).replace("# Method comparison:", f"## {name}:"), _verdict(name, summary), ""]
    lines += [
        "## Reading the figures",
        "",
        "- Budget: every trained method gets the same 16 steps x 4 x 256 = 16,384 training tokens, each at its",
        "  default learning rates; the targets of the issue assume far longer runs. The default `lrqat quantize`",
        "  (80 steps) reaches G = 0.966 at W4 per-channel on 8,192 eval tokens (README).",
        "- Peak memory: for trained methods, the peak RSS of the training window (reset before training);",
        "  for RTN and GPTQ (no training), the whole process. On this 135M model the embeddings, the",
        "  49,152-way logits and the activations weigh as much as the weights, so the LR-QAT / full-QAT",
        "  ratio is far from the paper's 7B figure; `benchmarks/memory_speed.py` (issue 4) is where that is measured.",
        "- naive LoRA-QAT trains well (its training-time column) and loses almost all of it when the float",
        "  adapter is merged and re-quantized: the adapter must live inside the rounding.",
        "",
    ]
    return "\n".join(lines)


def _verdict(name: str, s: dict) -> str:
    m = s["methods"]
    checks = []
    if "lrqat" in m:
        g = m["lrqat"]["gap_recovered"]
        if name in TARGETS:
            checks.append(f"LR-QAT G = {g:.3f} (target ≥ {TARGETS[name]:.2f}: {'met' if g >= TARGETS[name] else 'missed'})")
        for other in ("gptq", "qat"):
            if other in m:
                checks.append(f"LR-QAT vs {METHODS[other].label}: ppl {m['lrqat']['ppl']:.3f} vs {m[other]['ppl']:.3f}")
        if "qat" in m:
            ratio = m["lrqat"]["peak_memory_mb"] / m["qat"]["peak_memory_mb"]
            checks.append(f"peak memory LR-QAT / full QAT = {ratio:.2f}")
    return "; ".join(checks) + "."


if __name__ == "__main__":
    main()
