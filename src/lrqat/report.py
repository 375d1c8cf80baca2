"""The run report: `results.json` for machines and `report.md` for people."""

from __future__ import annotations

from lrqat.activations import ActSpec
from lrqat.checkpoint import atomic_write_text
from lrqat.methods import METHODS
from lrqat.rundir import RunDir, RunResult
from lrqat.tasks import accuracy_recovered


def write_results(out: RunDir, results: RunResult) -> None:
    atomic_write_text(out.results, results.to_json())
    atomic_write_text(out.report, render_report(results))


def task_table(tasks: dict[str, dict[str, dict[str, float]]], method: str, label: str) -> list[str]:
    """Zero-shot accuracy of the float, RTN and merged models, and the share of RTN's
    accuracy loss the method wins back (like G)."""
    if not tasks:
        return []
    models = [(key, name) for key, name in (("float", "float"), ("rtn", "RTN"), (f"{method}_merged", f"{label} merged"))
              if key in tasks]
    columns = [(task, metric) for task, metrics in tasks[models[0][0]].items() for metric in metrics]
    lines = ["", "Zero-shot task accuracy (lm-eval):", "",
             "| model | " + " | ".join(f"{task} {metric}" for task, metric in columns) + " |",
             "|---|" + "---|" * len(columns)]
    for key, name in models:
        lines.append(f"| {name} | " + " | ".join(f"{tasks[key][t][m]:.3f}" for t, m in columns) + " |")
    merged = f"{method}_merged"
    if all(k in tasks for k in ("float", "rtn", merged)):
        cells = [accuracy_recovered(tasks["float"][t][m], tasks["rtn"][t][m], tasks[merged][t][m]) for t, m in columns]
        lines.append("| accuracy recovered over RTN | " + " | ".join("n/a" if c is None else f"{c:.1%}" for c in cells)
                     + " |")
    return lines


def render_report(r: RunResult) -> str:
    ppl, method = r.ppl, METHODS[r.method]
    q, ptq, lr, t = r.spec["quant"], r.spec["ptq"], r.spec["lrqat"], r.train
    gran = "per-channel" if q["group_size"] is None else f"group {q['group_size']}"
    name = method.label
    online = ActSpec(**(r.spec.get("act") or {})).describe()
    rows = [("float (unquantized)", ppl["float"])]
    if "float_act" in ppl:
        rows.append((f"float weights, {online}", ppl["float_act"]))
    if "teacher_phi0" in ppl:
        rows.append(("phi0 teacher (Φ0 unrounded, no A·B)", ppl["teacher_phi0"]))
    rows.append((f"RTN ({ptq['init'] if ptq['init'] in ('minmax', 'lp') else 'lp'} ranges)", ppl["rtn"]))
    keys = [key for key in ("float", "float_act", "teacher_phi0", "rtn") if key in ppl]
    for start in ("gptq", "block-ap"):
        if start in ppl and r.method != start:
            rows.append((METHODS[start].label + (", the PTQ start" if ptq["init"] == start else ""), ppl[start]))
            keys.append(start)
    if not method.trained:
        rows.append((f"{name}, integer model", r.ppl_merged))
        keys.append(f"{r.method}_merged")
    elif not method.quantized:
        rows.append((f"{name}, the fine-tuned float model", r.ppl_merged))
        keys.append(f"{r.method}_merged")
    else:
        rows += [(f"{name}, training-time model", ppl[r.method]), (f"{name}, merged integer model", r.ppl_merged)]
        keys += [r.method, f"{r.method}_merged"]
    gap, gaps = r.gap_recovered, r.gaps
    ood = r.ppl_ood if r.eval_data else {}
    header = ["| model | perplexity |", "|---|---|"]
    table = [f"| {row} | {value:.3f} |" for row, value in rows]
    if ood:
        header = [f"| model | perplexity | {r.eval_data} (out of domain) |", "|---|---|---|"]
        table = [f"| {row} | {value:.3f} | {ood[key]:.3f} |" if key in ood else f"| {row} | {value:.3f} | – |"
                 for (row, value), key in zip(rows, keys, strict=True)]
    lines = [
        f"# lrqat report: {name} on {r.model}",
        "",
        (f"W{q['bits']} {'symmetric' if q['symmetric'] else 'asymmetric'} {gran}, {online}, "
        f"rotation {r.spec.get('rotate', 'none')}, phi={lr['phi']}, rank {lr['rank']}, alpha {lr['alpha']}. "
        f"Data: {r.data}."),
        "",
        (f"Perplexity on {r.eval_tokens} held-out tokens scored in non-overlapping windows of "
        f"{r.context} tokens" + (f", and on {r.eval_data_tokens} tokens of {r.eval_data}, a corpus training never "
                                 "reads." if ood else ".")),
        "",
        *header,
        *table,
        "",
        f"- Gap to float recovered over RTN: {gap:.1%}" if gap is not None else "- Gap recovered: n/a",
        *[f"- {label}: {gaps[key]:.1%}" for key, label in (
            ("g_gptq", "Gap recovered over GPTQ"), ("ood_g_rtn", f"Over RTN on {r.eval_data}"),
            ("ood_g_gptq", f"Over GPTQ on {r.eval_data}")) if gaps.get(key) is not None],
        f"- Merged vs training-time perplexity, relative difference: {r.merged_vs_training_rel_diff:.2e}",
        (f"- Training: {t['steps']} steps, {t['tokens']} tokens, {t['seconds']:.0f} s, "
        f"peak memory {t['peak_rss_mb']:.0f} MB; {r.trainable_params} trainable parameters"),
        f"- Integers where step 0 differs from RTN (ties of the stored phi): {r.rtn_tie_differences}",
        *[f"- Export {e['format']}: {e['path']} ({e['bytes']:,} bytes)" for e in r.exports],
        *task_table(r.tasks, r.method, name),
        *(["- Phases (seconds, peak memory): " + "; ".join(
            f"{name} {v['seconds']:.0f} s, {v['peak_rss_mb']:.0f} MB" for name, v in r.phases.items())]
          if r.phases else []),
        "",
    ]
    return "\n".join(lines)
