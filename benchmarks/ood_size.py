"""How much the quality benchmark's out-of-domain figures depend on the size of the
out-of-domain set: re-evaluate the merged models a finished `benchmarks/quality.py`
setting left in its run folders on the State of the Union addresses, at the benchmark's
4 windows of 1,024 tokens and at a larger set, and recompute G_RTN and G_GPTQ from both.

Why: the quality table measures sotu on 4,096 tokens to keep each run cheap. Rankings
whose margins are a few tenths of perplexity (LR-QAT against full QAT at W4 per-channel)
and targets met by a small margin need a larger set before they are believed.

    .venv/bin/python benchmarks/ood_size.py runs/quality80/w4-channel-sym --tokens 65536
    .venv/bin/python benchmarks/ood_size.py runs/quality320/w3-g64-asym \\
        --extra "LR-QAT, scale rate 1e-3=runs/w3-320-s1e-3"

Every run folder under SETTING (baselines/METHOD and RECIPE-seedN/lrqat) with a merged
model is evaluated; a float-model row is added. LR-QAT recipes with several seeds get
their mean and spread. Adds SETTING to `benchmarks/results/ood_size.{json,md}`.
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import statistics
import time
from pathlib import Path

import yaml
from _results import RESULTS, cells, code_version, command, machine, write_results

from lrqat.checkpoint import atomic_write_text, load_checkpoint, load_trainable_state
from lrqat.data import held_out_blocks
from lrqat.evaluate import NLL, Perplexity, perplexity
from lrqat.export.native import load_quantized
from lrqat.methods import apply_lora
from lrqat.models import load_model
from lrqat.rundir import gap_recovered
from lrqat.spec import RunSpec

BENCHMARK_WINDOWS = 4  # quality.py's --eval-tokens 4096 at a context of 1,024
CONTEXT = 1024


def find_runs(setting: Path) -> dict[str, list[Path]]:
    """Row label → run folders (one per seed) of the setting's finished runs: those with a
    merged model, and the float-LoRA reference (which keeps only its adapter checkpoint)."""
    rows: dict[str, list[Path]] = {}
    finished = [m.parent.parent for m in setting.glob("**/model/quantization.json")]
    if (setting / "baselines" / "float-lora" / "results.json").is_file():
        finished.append(setting / "baselines" / "float-lora")
    for run in sorted(finished):
        relative = run.relative_to(setting)
        if relative.parts[0] == "baselines":
            label = relative.parts[1]
        else:
            label = re.sub(r"-seed\d+$", "", relative.parts[0])
        rows.setdefault(label, []).append(run)
    return rows


def load_run(run: Path, float_model) -> object:
    """The run's trained model: its merged integer model, or for float LoRA the float model
    with the finished run's adapters."""
    if (run / "model" / "quantization.json").is_file():
        return load_quantized(run / "model")
    spec = RunSpec.from_dict(yaml.safe_load((run / "recipe.yaml").read_text()))
    state = load_checkpoint(run / "checkpoint.pt")
    if spec.method != "float-lora" or state["step"] != spec.train.steps:
        raise SystemExit(f"{run}: neither a merged model nor a finished float-LoRA run")
    model = apply_lora(copy.deepcopy(float_model), spec.lrqat, spec.train.seed, spec.targets)
    load_trainable_state(model, state["trainable"])
    return model


def trained_at(run: Path) -> int:
    """When the run's model was last written (a retrained run is evaluated again)."""
    merged = run / "model" / "model.safetensors"
    return (merged if merged.is_file() else run / "checkpoint.pt").stat().st_mtime_ns


def combined(a: Perplexity, b: Perplexity) -> Perplexity:
    """The perplexity of two disjoint sets of windows together (their summed NLL)."""
    return NLL(total=a.nll * a.tokens + b.nll * b.tokens, tokens=a.tokens + b.tokens).perplexity(a.context)


def evaluate(model, blocks) -> dict:
    """Perplexity on the benchmark's first windows and on the whole set."""
    first = perplexity(model, blocks[:BENCHMARK_WINDOWS])
    whole = combined(first, perplexity(model, blocks[BENCHMARK_WINDOWS:]))
    return {"ppl_small": first.ppl, "ppl_large": whole.ppl, "tokens_small": first.tokens, "tokens_large": whole.tokens}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("setting", type=Path, help="a quality.py setting folder, e.g. runs/quality80/w4-channel-sym")
    parser.add_argument("--tokens", type=int, default=65536, help="tokens of the larger out-of-domain set")
    parser.add_argument("--extra", action="append", default=[], metavar="LABEL=RUN",
                        help="another finished run folder to add as a row (repeatable)")
    args = parser.parse_args()
    if args.tokens <= BENCHMARK_WINDOWS * CONTEXT:
        parser.error(f"--tokens {args.tokens} must exceed the benchmark's {BENCHMARK_WINDOWS * CONTEXT}")
    rows = find_runs(args.setting)
    if not {"rtn", "gptq"} <= rows.keys():
        parser.error(f"{args.setting} has no finished baselines/rtn and baselines/gptq: run benchmarks/quality.py first")
    for extra in args.extra:
        label, _, run = extra.partition("=")
        if not run or not (Path(run) / "model" / "quantization.json").is_file():  # float LoRA: in SETTING only
            parser.error(f"--extra {extra!r}: give LABEL=RUN with RUN a finished run folder (holding model/)")
        rows[label] = [Path(run)]

    started = time.time()
    model, tokenizer = load_model("smollm2-135m")
    blocks = held_out_blocks(tokenizer, "sotu", CONTEXT, args.tokens)
    # per-run figures are kept in the setting's folder, so a rerun (after more runs finish,
    # or after being stopped) evaluates only what is new
    cache_path = args.setting / f"ood_size_{args.tokens}.json"
    cache = json.loads(cache_path.read_text()) if cache_path.is_file() else {}
    measured = {}
    for label, runs in {"float": [None], **rows}.items():
        measured[label] = []
        for run in runs:
            key = "float" if run is None else f"{run.resolve()}@{trained_at(run)}"
            if key not in cache:
                cache[key] = evaluate(model if run is None else load_run(run, model), blocks)
                atomic_write_text(cache_path, json.dumps(cache, indent=1))
            measured[label].append({**cache[key], "run": None if run is None else str(run)})
            print(label, measured[label][-1], flush=True)

    ref = {size: {m: measured[m][0][f"ppl_{size}"] for m in ("float", "rtn", "gptq")} for size in ("small", "large")}
    table_rows = {}
    for label, per_run in measured.items():
        row: dict = {"runs": [r.get("run") for r in per_run]}
        for size in ("small", "large"):
            values = [r[f"ppl_{size}"] for r in per_run]
            mean = statistics.mean(values)
            row[f"ppl_{size}"] = mean
            row[f"ppl_{size}_spread"] = max(values) - min(values)
            row[f"g_rtn_{size}"] = gap_recovered(ref[size]["float"], ref[size]["rtn"], mean)
            row[f"g_gptq_{size}"] = gap_recovered(ref[size]["float"], ref[size]["gptq"], mean)
        table_rows[label] = row

    path = RESULTS / "ood_size.json"
    record = json.loads(path.read_text()) if path.exists() else {"settings": {}}
    record["settings"][str(args.setting)] = {
        "tokens_small": measured["float"][0]["tokens_small"], "tokens_large": measured["float"][0]["tokens_large"],
        "rows": table_rows, "command": command(), "minutes": round((time.time() - started) / 60, 1),
        "machine": machine(), "code": code_version(),
    }
    write_results("ood_size", record, render(record))


# the figures of one row, on the small set then the large one
SIZED_COLUMNS = tuple(f"{k}_{size}" for size in ("small", "large") for k in ("ppl", "g_rtn", "g_gptq"))


def render(record: dict) -> str:
    lines = ["# Out-of-domain set size", "",
             ("Merged models of finished quality-benchmark runs, re-evaluated on the State of the Union addresses: "
              "the benchmark's first 4 windows of 1,024 tokens (small) and a larger set (large) that starts with "
              "them. Rows with several seeds: mean ± half the spread."), ""]
    for name, s in record["settings"].items():
        lines += [f"## {name}", "", f"`{s['command']}` ({s['minutes']} min, {s['machine']}, code {s['code']})", "",
                  (f"| method | ppl sotu {s['tokens_small']} | G_RTN | G_GPTQ | ppl sotu {s['tokens_large']} | G_RTN | "
                   "G_GPTQ | seeds |"),
                  "|---|---|---|---|---|---|---|---|"]
        for label, row in s["rows"].items():
            lines.append(f"| {label} | {cells(row, *SIZED_COLUMNS)} | {len(row['runs'])} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
