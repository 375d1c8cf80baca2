"""Levers: an LR-QAT recipe of the quality benchmark with one or more settings changed,
each run against the same float, RTN and GPTQ references, on the held-out Brown split and
on the out-of-domain set (sotu, 64 windows by default), with the unchanged recipe beside
them as the control.

Why: a lever is believed only against its control measured the same way, on the same
machine, in the same run of this script; the quality table is too costly to rerun for
each idea (hours per setting on 2 cores).

    .venv/bin/python benchmarks/levers.py --setting w4-channel-sym --base lrqat+gptq+kd \\
        --lever train.loss=kd --lever "train.kd_weight=0.8" --lever "train.kd_temperature=2" --seeds 0

A lever is `SECTION.FIELD=VALUE`, several joined by `;` (`"lrqat.rank=128;lrqat.alpha=128"`);
SECTION is `ptq`, `train` or `lrqat`, and VALUE is read as YAML (`0.8` a number, `kd` a
word). Run folders go under `OUTPUT/SETTING/` (the references under `reference/`, shared by
every step budget; each lever under `BASE[LEVER]-seedN/`, or `BASE[LEVER]-320steps-seedN/` at
a budget other than the default), so an interrupted run resumes where it stopped. The
figures are written to `benchmarks/results/levers.{json,md}` after every run, keyed by
setting, steps and base recipe; a later command adds its levers to the same table
(`--no-control` when the control already ran), and a seed not rerun keeps its earlier run, so
`--seeds 1` after `--seeds 0` leaves a row of both.
"""

from __future__ import annotations

import argparse
import json
import re
import time

import yaml
from _results import RESULTS, cells, code_version, command, machine, write_results
from quality import (
    QUALITY_COLUMNS,
    RECIPES,
    SETTINGS,
    Recipe,
    add_budget_flags,
    base_spec,
    over_seeds,
    reference_figures,
    resolve_dtype,
)

from lrqat.compare import run_compare, shared_stages
from lrqat.errors import LrqatError
from lrqat.spec import QuantSpec, RunSpec

SECTIONS = ("ptq", "train", "lrqat")
# what a row's figures depend on besides its recipe: where it ran and the references its gaps use
CONDITIONS = ("dtype", "machine", "code", "eval_tokens", "eval_data_tokens", "ppl_float", "ppl_rtn", "ppl_gptq",
              "ppl_ood_float", "ppl_ood_rtn", "ppl_ood_gptq")


def parse_lever(text: str) -> dict[str, dict]:
    """`"train.loss=kd;train.kd_weight=1"` → `{"train": {"loss": "kd", "kd_weight": 1}}`."""
    changes: dict[str, dict] = {}
    for part in filter(None, (p.strip() for p in text.split(";"))):
        key, sep, value = part.partition("=")
        section, dot, name = key.partition(".")
        if not sep or not dot or section not in SECTIONS or not name:
            raise LrqatError(f"lever {part!r}: write SECTION.FIELD=VALUE with SECTION one of {', '.join(SECTIONS)} "
                             "(e.g. train.kd_weight=0.8); join several with ';'.")
        changes.setdefault(section, {})[name] = yaml.safe_load(value)
    return changes


def with_lever(base: Recipe, lever: str) -> Recipe:
    """The base recipe with the lever's changes on top (the lever wins where both set a field)."""
    changes = parse_lever(lever)
    merged = {s: {**getattr(base, s), **changes.get(s, {})} for s in SECTIONS}
    return Recipe(f"{base.label} + {lever}" if lever else base.label, **merged)


def folder_name(base: str, lever: str, steps: int | None = None) -> str:
    """A run folder's name from its recipe, lever and step budget (`lrqat+gptq+kd[train.loss=kd]`,
    `lrqat+gptq-320steps`; `steps` None: the default budget, named by nothing)."""
    return (base + (f"[{re.sub(r'[^A-Za-z0-9.=_+-]+', '_', lever)}]" if lever else "")
            + (f"-{steps}steps" if steps is not None else ""))


def with_earlier_seeds(row: dict | None, seeds: list[int], runs: list[dict]) -> tuple[list[int], list[dict]]:
    """The seeds and runs of a row once this command's runs join those an earlier command
    measured (a second seed in a later session adds to the row instead of replacing it;
    a seed run again replaces its earlier run). Gaps are recomputed against this command's
    references, so the seeds of a row share one reference."""
    merged = dict(zip(row["seeds"], row["per_seed"])) if row else {}
    merged.update(zip(seeds, runs))
    order = sorted(merged)
    return order, [merged[seed] for seed in order]


def measured_under(table: dict, command_number: int) -> dict:
    """The conditions a row is measured under, kept with the row: the table's heading shows
    only its latest command's machine and references, and a row an earlier command wrote
    keeps gaps computed against that command's references (on a machine that may differ). A
    row whose seeds ran under several commands carries the latest's, whose references all its
    gaps are recomputed against (`with_earlier_seeds`)."""
    return {"command": command_number, **{k: table[k] for k in CONDITIONS}}


def rows_measured_elsewhere(table: dict) -> list[str]:
    """One line per row whose conditions differ from the table heading's (`render`'s
    footnotes): which command wrote it, on what, and the references its gaps use. A change
    of commit alone is not flagged: every command runs a later one, and the commands list
    already orders them."""
    lines = []
    for name, row in table["rows"].items():
        own = row["measured"]
        if all(own[k] == table[k] for k in CONDITIONS if k != "code"):
            continue
        lines.append(f"- {'the control' if name.startswith('none') else f'`{name}`'}: command {own['command']}, "
                     f"{conditions_line(own)} Its gaps are against these references.")
    return lines


def conditions_line(c: dict) -> str:
    """Conditions as the sentence under a table's commands (and in its footnotes)."""
    return (f"{c['dtype']} on {c['machine']}, code {c['code']}. Held-out Brown: {c['eval_tokens']} tokens (float "
            f"{c['ppl_float']:.3f}, RTN {c['ppl_rtn']:.3f}, GPTQ {c['ppl_gptq']:.3f}); sotu: {c['eval_data_tokens']} "
            f"tokens (float {c['ppl_ood_float']:.3f}, RTN {c['ppl_ood_rtn']:.3f}, GPTQ {c['ppl_ood_gptq']:.3f}).")


def reference_spec(root: str, quant: QuantSpec, args: argparse.Namespace, steps: int) -> RunSpec:
    """The run of the shared references (float, RTN, GPTQ) under `root`. They train nothing,
    so their spec takes a fixed step count: one reference folder serves tables of every
    step budget instead of refusing to resume under a changed `--steps`."""
    return base_spec(f"{root}/reference", quant, argparse.Namespace(**{**vars(args), "steps": steps}), 0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_budget_flags(parser)
    parser.set_defaults(seeds="0")
    parser.add_argument("--setting", choices=list(SETTINGS), default="w4-channel-sym")
    parser.add_argument("--base", choices=list(RECIPES), default="lrqat", help="the recipe the levers change")
    parser.add_argument("--lever", action="append", default=[],
                        help="SECTION.FIELD=VALUE[;SECTION.FIELD=VALUE...] (repeat for several levers)")
    parser.add_argument("--no-control", action="store_true",
                        help="skip the unchanged base recipe (only when its runs already sit in the output folder)")
    parser.add_argument("--output", default="runs/levers")
    args = parser.parse_args()
    args.seeds = [int(s) for s in args.seeds.split(",")]
    resolve_dtype(args)
    try:  # every lever is checked before hours of training start
        recipes = {lever: with_lever(RECIPES[args.base], lever) for lever in ([] if args.no_control else [""])
                   + args.lever}
        for lever, recipe in recipes.items():
            recipe.apply(base_spec("check", SETTINGS[args.setting], args, 0)).validate()
    except (LrqatError, TypeError) as error:
        parser.error(f"{error}")

    started = time.time()
    quant = SETTINGS[args.setting]
    root = f"{args.output}/{args.setting}"
    default_steps = parser.get_default("steps")
    reference = run_compare(reference_spec(root, quant, args, default_steps), ["gptq"])
    measured = shared_stages(f"{root}/reference")
    path = RESULTS / "levers.json"
    record = json.loads(path.read_text()) if path.exists() else {"tables": {}}
    key = f"{args.setting}, {args.steps} steps, base {args.base}"
    table = record["tables"].setdefault(key, {"rows": {}})
    table.update(reference_figures(reference))
    table.update(dtype=args.dtype, machine=machine(), code=code_version())
    commands = table.setdefault("commands", [])
    commands.append("")
    for lever, recipe in recipes.items():
        runs = []
        for seed in args.seeds:
            folder = folder_name(args.base, lever, None if args.steps == default_steps else args.steps)
            spec = recipe.apply(base_spec(f"{root}/{folder}-seed{seed}", quant, args, seed))
            runs.append(run_compare(spec, ["lrqat"], shared=measured)["methods"]["lrqat"])
        name = lever or "none (control)"
        seeds, runs = with_earlier_seeds(table["rows"].get(name), args.seeds, runs)
        table["rows"][name] = {**over_seeds(runs, reference, seeds), "measured": measured_under(table, len(commands))}
        commands[-1] = f"{command()}  ({round((time.time() - started) / 60, 1)} min)"
        write_results("levers", record, render(record))


def render(record: dict) -> str:
    lines = ["# Levers", "", ("Each table: one base recipe with one change per row, run by the numbered commands "
                              "under its heading (each adds rows; a run folder a command finds finished is reused). "
                              "The line under the commands gives the latest command's machine and references; a row "
                              "measured under others names them below its table. Rows: mean ± half the spread over "
                              "the seeds listed."), ""]
    for key, t in record["tables"].items():
        lines += [
            f"## {key}",
            "",
            *[f"{n}. `{c}`" for n, c in enumerate(t["commands"], 1)],
            "",
            conditions_line(t),
            "",
            "| lever | seeds | ppl brown | G_GPTQ | ppl sotu | G_RTN sotu | G_GPTQ sotu | train s | peak MB |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for lever, row in t["rows"].items():
            name = lever if lever.startswith("none") else f"`{lever}`"
            lines.append(f"| {name} | {','.join(map(str, row['seeds']))} | {cells(row, 'ppl', *QUALITY_COLUMNS)} |")
        lines.append("")
        if elsewhere := rows_measured_elsewhere(t):
            lines += ["Rows measured under other conditions than the heading's:", "", *elsewhere, ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
