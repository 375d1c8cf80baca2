"""Quality benchmark: every method on the built-in model and corpus at W4 per-channel sym,
W4 g64 asym, W3 g64 asym and W2 g64 asym, measured on the held-out Brown split and on
the State of the Union addresses (`--eval-data sotu`, which no method trains on; 64
windows of 1,024 tokens by default, `--ood-tokens`: 4 windows ranked methods by noise).

Per setting: one `lrqat compare` of RTN, GPTQ, Block-AP, PEQA, full QAT, LR-QAT and the
float-LoRA ceiling at equal tokens; LR-QAT again with a second seed; and LR-QAT's
distillation recipe (`--init gptq --loss ce+kd --teacher float`: GPTQ is the stronger
calibrated start here (Block-AP at its default budget lands below it), and after a
calibrated start Φ0 holds the start's integers, so the phi0 teacher would be the start's
model) with both seeds; and LR-QAT at rank 128 (the lever that moved W4 per-channel most)
with both seeds. `--recipes` picks which of these recipes run (plain LR-QAT always does).
G_RTN and G_GPTQ on both evaluation sets; LR-QAT rows as mean and spread over seeds.
(g64, not g128: the model's hidden size 576 is not a multiple of 128.) Run folders go
under `runs/quality/`, so an interrupted benchmark resumes where it stopped; each
invocation adds its settings to `benchmarks/results/quality.{json,md}`.

    .venv/bin/python benchmarks/quality.py                        # the full budget (hours on 2 cores)
    .venv/bin/python benchmarks/quality.py --settings w3-g64-asym   # one setting (about 90 min)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time

from _results import RESULTS, cells, machine, write_results

from lrqat.compare import run_compare, shared_stages
from lrqat.methods import METHODS
from lrqat.rundir import gap_recovered
from lrqat.runtime import bf16_is_slow
from lrqat.spec import DTYPES, DataSpec, PTQSpec, QuantSpec, RunSpec, TrainSpec

SETTINGS = {
    "w4-channel-sym": QuantSpec(bits=4, symmetric=True, group_size=None),
    "w4-g64-asym": QuantSpec(bits=4, symmetric=False, group_size=64),
    "w3-g64-asym": QuantSpec(bits=3, symmetric=False, group_size=64),
    "w2-g64-asym": QuantSpec(bits=2, symmetric=False, group_size=64),
}
# the columns every quality table shows after the held-out split's perplexity and G_RTN
QUALITY_COLUMNS = ("g_gptq", "ppl_ood", "ood_g_rtn", "ood_g_gptq", ("train_seconds", 0), ("peak_memory_mb", 0))
BASELINES = ("rtn", "gptq", "block-ap", "peqa", "qat", "lrqat", "float-lora")


@dataclasses.dataclass(frozen=True)
class Recipe:
    """An LR-QAT recipe as changes to the benchmark's run: its PTQ start, its training and
    its adapter (the default `lrqat quantize` is the recipe with no changes)."""

    label: str
    ptq: dict = dataclasses.field(default_factory=dict)
    train: dict = dataclasses.field(default_factory=dict)
    lrqat: dict = dataclasses.field(default_factory=dict)

    def apply(self, spec: RunSpec) -> RunSpec:
        return dataclasses.replace(spec, ptq=dataclasses.replace(spec.ptq, **self.ptq),
                                   train=dataclasses.replace(spec.train, **self.train),
                                   lrqat=dataclasses.replace(spec.lrqat, **self.lrqat))


RECIPES = {
    "lrqat": Recipe("LR-QAT (ce)"),
    "lrqat+gptq+kd": Recipe("LR-QAT, GPTQ init + ce+kd (float teacher)", ptq={"init": "gptq"},
                            train={"loss": "ce+kd", "teacher": "float"}),
    # GPTQ's start with plain ce: level with the distillation recipe at W4 per-channel on 64 sotu
    # windows at 0.57x its time (benchmarks/results/levers.md)
    "lrqat+gptq": Recipe("LR-QAT, GPTQ init (ce)", ptq={"init": "gptq"}),
    # the lever that moved W4 per-channel most (rank 32 → 64 → 128); alpha = rank keeps A·B's scale
    "lrqat-r128": Recipe("LR-QAT, rank 128 (ce)", lrqat={"rank": 128, "alpha": 128.0}),
}


def base_spec(output: str, quant: QuantSpec, args: argparse.Namespace, seed: int) -> RunSpec:
    return RunSpec(
        output=output, quant=quant, dtype=args.dtype, ptq=PTQSpec(calib_tokens=args.calib_tokens),
        train=TrainSpec(steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, save_every=10, seed=seed,
                        grad_checkpointing=args.grad_checkpointing, lr_scales=args.lr_scales),
        data=DataSpec(eval_tokens=args.eval_tokens, eval_source="sotu", eval_data_tokens=args.ood_tokens),
    )


def gaps(row: dict, ref: dict) -> dict:
    """G_RTN and G_GPTQ of one method row on both evaluation sets."""
    return {
        "g_rtn": gap_recovered(ref["ppl_float"], ref["ppl_rtn"], row["ppl"]),
        "g_gptq": gap_recovered(ref["ppl_float"], ref["ppl_gptq"], row["ppl"]),
        "ood_g_rtn": gap_recovered(ref["ppl_ood_float"], ref["ppl_ood_rtn"], row["ppl_ood"]),
        "ood_g_gptq": gap_recovered(ref["ppl_ood_float"], ref["ppl_ood_gptq"], row["ppl_ood"]),
    }


def over_seeds(runs: list[dict], reference: dict, seeds: list[int]) -> dict:
    """One table row from a recipe's runs (one per seed): each run with its gaps, and the
    mean and spread (max − min) of every figure over the seeds."""
    per_seed = [{**r, **gaps(r, reference)} for r in runs]
    row = {"seeds": list(seeds), "per_seed": per_seed}
    for key in ("ppl", "ppl_ood", "g_rtn", "g_gptq", "ood_g_rtn", "ood_g_gptq", "train_seconds", "peak_memory_mb",
                "train_tokens"):
        values = [r[key] for r in per_seed if r.get(key) is not None]
        row[key] = statistics.mean(values) if values else None
        row[f"{key}_spread"] = (max(values) - min(values)) if len(values) > 1 else 0.0
    return row


def reference_figures(reference: dict) -> dict:
    """What a table keeps of its reference comparison: float, RTN and GPTQ on both sets,
    and what was measured on what."""
    keep = ("ppl_float", "ppl_rtn", "ppl_gptq", "ppl_ood_float", "ppl_ood_rtn", "ppl_ood_gptq", "eval_tokens",
            "context", "eval_data_tokens", "model", "data", "eval_data")
    return {k: reference[k] for k in keep}


def run_setting(name: str, args: argparse.Namespace) -> dict:
    quant = SETTINGS[name]
    root = f"{args.output}/{name}"
    reference = run_compare(base_spec(f"{root}/baselines", quant, args, 0), list(BASELINES))
    measured = shared_stages(f"{root}/baselines")  # float and RTN: the same for every seed and recipe
    rows: dict[str, dict] = {}
    for method, m in reference["methods"].items():
        if method != "lrqat":
            rows[method] = {**m, **gaps(m, reference), "seeds": [0]}
    for recipe in args.recipes:
        runs = []
        for seed in args.seeds:
            if recipe == "lrqat" and seed == 0:
                runs.append(reference["methods"]["lrqat"])
                continue
            spec = RECIPES[recipe].apply(base_spec(f"{root}/{recipe}-seed{seed}", quant, args, seed))
            runs.append(run_compare(spec, ["lrqat"], shared=measured)["methods"]["lrqat"])
        rows[recipe] = over_seeds(runs, reference, args.seeds)
    return {**reference_figures(reference), "dtype": args.dtype, "machine": machine(), "rows": rows}


def add_budget_flags(parser: argparse.ArgumentParser) -> None:
    """The budget and evaluation flags every quality run shares (also `levers.py`'s)."""
    parser.add_argument("--steps", type=int, default=80, help="optimizer steps of every trained method")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--eval-tokens", type=int, default=4096)
    parser.add_argument("--ood-tokens", type=int, default=65536,
                        help="tokens of the out-of-domain set (sotu): 64 windows; 4 windows ranked methods by noise "
                             "(benchmarks/results/ood_size.md)")
    parser.add_argument("--calib-tokens", type=int, default=8192)
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--lr-scales", type=float, default=None,
                        help="AdamW rate of the scales for every method that trains them (PEQA, full QAT, LR-QAT); "
                             "default: each method's own (1e-4)")
    parser.add_argument("--dtype", choices=(*DTYPES, "auto"), default="auto",
                        help="compute dtype of every method; auto: bf16 where the CPU has native bf16 (about 1.9x "
                             "faster training than fp32 with AMX), else fp32 (emulated bf16 is about 100x slower)")
    parser.add_argument("--grad-checkpointing", action=argparse.BooleanOptionalAction, default=False,
                        help="recompute blocks in the backward pass (off: faster; a 135M model fits without)")


def resolve_dtype(args: argparse.Namespace) -> None:
    """`--dtype auto`: bf16 where the CPU computes it natively, else fp32."""
    if args.dtype == "auto":
        args.dtype = "fp32" if bf16_is_slow() else "bf16"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_budget_flags(parser)
    parser.add_argument("--settings", default=",".join(SETTINGS))
    parser.add_argument("--recipes", default=",".join(RECIPES),
                        help=f"LR-QAT recipes run with every seed, besides the one-seed baselines ({', '.join(RECIPES)})")
    parser.add_argument("--output", default="runs/quality")
    args = parser.parse_args()
    args.seeds = [int(s) for s in args.seeds.split(",")]
    args.recipes = args.recipes.split(",")
    if "lrqat" not in args.recipes or not set(args.recipes) <= set(RECIPES):
        parser.error(f"--recipes {','.join(args.recipes)}: choose from {', '.join(RECIPES)}, including lrqat "
                     "(its seed 0 is the comparison's LR-QAT row)")
    resolve_dtype(args)

    started = time.time()
    path = RESULTS / "quality.json"
    record = json.loads(path.read_text()) if path.exists() else {}
    if "commands" not in record:  # results of the earlier layout are replaced
        record = {"settings": {}, "commands": []}
    for kept in record["settings"].values():  # settings measured before the machine was recorded per setting
        kept.setdefault("machine", record.get("machine", "not recorded"))
    for name in args.settings.split(","):
        record["settings"][name] = run_setting(name, args)
    command = (f"python benchmarks/quality.py --steps {args.steps} --batch-size {args.batch_size} --seq-len "
               f"{args.seq_len} --eval-tokens {args.eval_tokens} --ood-tokens {args.ood_tokens} --calib-tokens {args.calib_tokens} --seeds "
               f"{','.join(map(str, args.seeds))} --dtype {args.dtype} "
               + (f"--lr-scales {args.lr_scales:g} " if args.lr_scales is not None else "") +
               f"--{'' if args.grad_checkpointing else 'no-'}grad-checkpointing --settings {args.settings} "
               f"--recipes {','.join(args.recipes)}")
    record["commands"].append(f"{command}  ({round((time.time() - started) / 60, 1)} min)")
    record["machine"] = machine()
    write_results("quality", record, render(record))


LABELS = {**{m: METHODS[m].label for m in BASELINES}, **{name: r.label for name, r in RECIPES.items()}}


def render(record: dict) -> str:
    lines = ["# Quality benchmark", "", "Commands (each adds its settings):", "",
             *[f"- `{c}`" for c in record["commands"]], ""]
    for name, s in record["settings"].items():
        lines += [
            f"## {name}",
            "",
            (f"{s['model']}; held-out {s['data']} split: {s['eval_tokens']} tokens (float {s['ppl_float']:.3f}, "
             f"RTN {s['ppl_rtn']:.3f}, GPTQ {s['ppl_gptq']:.3f}); out of domain, {s['eval_data']}: "
             f"{s['eval_data_tokens']} tokens (float {s['ppl_ood_float']:.3f}, RTN {s['ppl_ood_rtn']:.3f}, GPTQ "
             f"{s['ppl_ood_gptq']:.3f}). Compute: {s.get('dtype', 'bf16')} on {s.get('machine', record.get('machine'))}. "
             "LR-QAT rows: mean ± half the spread over seeds."),
            "",
            "| method | ppl brown | G_RTN | G_GPTQ | ppl sotu | G_RTN sotu | G_GPTQ sotu | train s | peak MB |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for method, row in s["rows"].items():
            lines.append(f"| {LABELS[method]} | {cells(row, 'ppl', 'g_rtn', *QUALITY_COLUMNS)} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
