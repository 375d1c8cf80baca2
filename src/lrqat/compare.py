"""`lrqat compare`: every method on the same model, data, spec, token budget and eval.

Each method runs as its own `lrqat quantize` process, so its peak memory is its own
(max RSS on CPU, `torch.cuda.max_memory_allocated` on GPU) and a killed comparison
resumes method by method: a method whose run folder holds finished results under the
same settings is reused, not rerun. The float and RTN perplexities of the first run are handed
to the others instead of being recomputed.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from lrqat.activations import ActSpec
from lrqat.checkpoint import atomic_write_text
from lrqat.errors import LrqatError
from lrqat.methods import METHODS
from lrqat.rundir import RunDir, RunResult, gap_recovered
from lrqat.spec import RunSpec

SHARED_STAGES = ("ppl_float", "ppl_rtn", "ppl_float_act", "ood_ppl_float", "ood_ppl_rtn", "ood_ppl_float_act")


def shared_stages(folder: str | Path) -> dict[str, Any]:
    """The float and RTN perplexities a finished comparison in `folder` measured (its
    first method's), to hand to another comparison of the same model, data, quantizer
    and range init."""
    out = RunDir(folder)
    first = next((out.method_run(m) for m in json.loads(out.compare_json.read_text())["methods"]), None)
    return _shared_of(first) if first is not None else {}


def _shared_of(run: RunDir) -> dict[str, Any]:
    done = run.read_stages()
    return {k: done[k] for k in SHARED_STAGES if k in done}


def run_compare(spec: RunSpec, methods: list[str], log: Any = print,
                shared: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run `methods` one after another under `spec.output`; write compare.json/.md/.png.
    `shared`: float/RTN perplexities already measured for the same model, data,
    quantizer and range init (`shared_stages`), so no method recomputes them."""
    spec.validate()
    out = RunDir(spec.output)
    out.root.mkdir(parents=True, exist_ok=True)
    shared = dict(shared or {})
    rows = {}
    for method in methods:
        run = out.method_run(method)
        run.root.mkdir(parents=True, exist_ok=True)
        raw = json.loads(json.dumps(spec.to_dict()))
        raw.update(method=method, output=str(run.root), export=[])
        recipe = run.root / "recipe.yaml"
        atomic_write_text(recipe, yaml.safe_dump(raw, sort_keys=False))
        if shared and not run.stages.exists():
            run.write_stages(shared)
        log(f"== {method} ==")  # a method that finished before with these settings is reused (`finished_result`)
        proc = subprocess.run([sys.executable, "-m", "lrqat.cli", "quantize", "--recipe", str(recipe), "--resume"],
                              check=False)
        if proc.returncode != 0:
            raise LrqatError(f"method {method} failed (exit {proc.returncode}); rerun the same command to resume.")
        if not shared:
            shared = _shared_of(run)
        rows[method] = run.read_result()
    summary = summarize(rows)
    atomic_write_text(out.compare_json, json.dumps(summary, indent=2) + "\n")
    atomic_write_text(out.compare_md, render_compare(summary))
    plot_compare(summary, out, out.compare_png)
    return summary


def summarize(rows: dict[str, RunResult]) -> dict[str, Any]:
    """One record per method, with G against RTN and (where GPTQ ran, as a method or a
    baseline) against GPTQ, on the held-out split and on the --eval-data corpus."""
    first = next(iter(rows.values()))
    ppl_float, ppl_rtn = first.ppl["float"], first.ppl["rtn"]
    ood = first.ppl_ood
    gptq = next((r.ppl.get("gptq") for r in rows.values() if "gptq" in r.ppl), None)
    ood_gptq = next((r.ppl_ood.get("gptq") for r in rows.values() if "gptq" in r.ppl_ood), None)
    methods = {}
    for method, r in rows.items():
        merged_ood = r.ppl_ood.get(f"{method}_merged")
        methods[method] = {
            "ppl": r.ppl_merged,
            "ppl_training_time": r.ppl[method],
            "gap_recovered": gap_recovered(ppl_float, ppl_rtn, r.ppl_merged),
            "g_gptq": None if gptq is None else gap_recovered(ppl_float, gptq, r.ppl_merged),
            "ppl_ood": merged_ood,
            "ood_g_rtn": None if merged_ood is None else gap_recovered(ood["float"], ood["rtn"], merged_ood),
            "ood_g_gptq": None if merged_ood is None or ood_gptq is None else gap_recovered(ood["float"], ood_gptq,
                                                                                            merged_ood),
            "quantized": METHODS[method].quantized,
            "train_seconds": r.train["seconds"],
            "train_tokens": r.train["tokens"],
            "peak_memory_mb": r.train["peak_rss_mb"],
            "trainable_params": r.trainable_params,
            "tasks": r.tasks.get(f"{method}_merged", {}),
        }
    return {
        "model": first.model, "data": first.data, "eval_data": first.eval_data,
        "spec": {k: first.spec.get(k) for k in ("quant", "act", "rotate", "ptq", "lrqat", "train")},
        "eval_tokens": first.eval_tokens, "context": first.context, "eval_data_tokens": first.eval_data_tokens,
        "ppl_float": ppl_float, "ppl_rtn": ppl_rtn, "ppl_gptq": gptq,
        "ppl_ood_float": ood.get("float"), "ppl_ood_rtn": ood.get("rtn"), "ppl_ood_gptq": ood_gptq,
        "tasks_float": first.tasks.get("float", {}), "tasks_rtn": first.tasks.get("rtn", {}),
        "methods": methods,
    }


def _num(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def render_compare(s: dict[str, Any]) -> str:
    q = s["spec"]["quant"]
    gran = "per-channel" if q["group_size"] is None else f"g{q['group_size']}"
    act = ActSpec(**(s["spec"].get("act") or {}))
    online = f" {act.describe()}" if act.active else ""
    rotate = s["spec"].get("rotate") or "none"  # (results written before rotations have none)
    rotation = "" if rotate == "none" else f", {rotate} rotation"
    ood = s.get("eval_data")
    lines = [
        f"# Method comparison: {s['model']}, W{q['bits']} {gran} {'sym' if q['symmetric'] else 'asym'}{online}{rotation}",
        "",
        (f"Perplexity of the merged integer model on {s['eval_tokens']} held-out tokens ({s['data']}, windows of "
         f"{s['context']}). Float: {s['ppl_float']:.3f}. G = (ppl_base − ppl) / (ppl_base − ppl_float) against "
         "RTN (G_RTN) and GPTQ (G_GPTQ)."
         + (f" Out of domain: {s['eval_data_tokens']} tokens of {ood}, a corpus no method trains on; float "
            f"{_num(s.get('ppl_ood_float'))}." if ood else "")),
        "",
    ]
    head = "| method | ppl | ppl (training-time) | G_RTN | G_GPTQ |"
    rule = "|---|---|---|---|---|"
    if ood:
        head += f" ppl {ood} | G_RTN {ood} | G_GPTQ {ood} |"
        rule += "---|---|---|"
    lines += [head + " train s | train tokens | peak memory MB | trainable params |", rule + "---|---|---|---|"]
    for method, m in s["methods"].items():
        row = (f"| {METHODS[method].label} | {m['ppl']:.3f} | {m['ppl_training_time']:.3f} | "
               f"{_num(m['gap_recovered'])} | {_num(m.get('g_gptq'))} |")
        if ood:
            row += f" {_num(m.get('ppl_ood'))} | {_num(m.get('ood_g_rtn'))} | {_num(m.get('ood_g_gptq'))} |"
        lines.append(row + f" {m['train_seconds']:.0f} | {m['train_tokens']} | {m['peak_memory_mb']:.0f} | "
                           f"{m['trainable_params']:,} |")
    return "\n".join(lines + compare_task_table(s)) + "\n"


def compare_task_table(s: dict[str, Any]) -> list[str]:
    """Zero-shot accuracy per method beside float and RTN (where --tasks ran)."""
    reference = s.get("tasks_float") or {}
    columns = [(task, metric) for task, metrics in reference.items() for metric in metrics]
    if not columns:
        return []
    rows = [("float", reference), ("RTN", s.get("tasks_rtn") or {})]
    rows += [(METHODS[method].label, m.get("tasks") or {}) for method, m in s["methods"].items()]
    lines = ["", "Zero-shot task accuracy (lm-eval), merged models:", "",
             "| model | " + " | ".join(f"{task} {metric}" for task, metric in columns) + " |",
             "|---|" + "---|" * len(columns)]
    for name, tasks in rows:
        lines.append(f"| {name} | " + " | ".join(_num(tasks.get(t, {}).get(m)) for t, m in columns) + " |")
    return lines


def plot_compare(s: dict[str, Any], out: RunDir, path: Path) -> None:
    """Perplexity and peak memory per method, and the training-loss curves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(s["methods"])
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    axes[0].bar(names, [s["methods"][m]["ppl"] for m in names], color="tab:blue")
    axes[0].axhline(s["ppl_float"], color="black", linestyle="--", label="float")
    axes[0].set_title("perplexity (merged)")
    axes[0].legend()
    axes[1].bar(names, [s["methods"][m]["peak_memory_mb"] for m in names], color="tab:orange")
    axes[1].set_title("peak memory (MB)")
    for method in names:
        records = out.method_run(method).read_metrics()
        if records:
            axes[2].plot([r["step"] for r in records], [r["loss"] for r in records], label=method)
    axes[2].set_title("training loss")
    axes[2].set_xlabel("step")
    if axes[2].lines:
        axes[2].legend()
    for ax in axes[:2]:
        ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
