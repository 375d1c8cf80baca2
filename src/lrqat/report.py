"""The run report: `results.json` for machines and `report.md` for people."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lrqat.checkpoint import atomic_write_text

METHOD_NAMES = {"rtn": "RTN", "gptq": "GPTQ", "peqa": "PEQA", "naive-lora": "naive LoRA-QAT", "qat": "full QAT",
                "lrqat": "LR-QAT"}


def write_results(out_dir: Path, results: dict[str, Any]) -> None:
    atomic_write_text(out_dir / "results.json", json.dumps(results, indent=2) + "\n")
    atomic_write_text(out_dir / "report.md", render_report(results))


def render_report(r: dict[str, Any]) -> str:
    ppl, method = r["ppl"], r["method"]
    q, lr, t = r["spec"]["quant"], r["spec"]["lrqat"], r["train"]
    gran = "per-channel" if q["group_size"] is None else f"group {q['group_size']}"
    name = METHOD_NAMES[method]
    rows = [("float (unquantized)", ppl["float"]), (f"RTN ({'lp' if q['init'] == 'gptq' else q['init']} ranges)", ppl["rtn"])]
    if q["init"] == "gptq":
        rows.append(("GPTQ, the PTQ start", ppl["ptq"]))
    if method in ("rtn", "gptq"):
        rows.append((f"{name}, integer model", ppl[f"{method}_merged"]))
    else:
        rows += [(f"{name}, training-time model", ppl[method]), (f"{name}, merged integer model", ppl[f"{method}_merged"])]
    gap = r.get("gap_recovered")
    lines = [
        f"# lrqat report: {name} on {r['model']}",
        "",
        (f"W{q['bits']} {'symmetric' if q['symmetric'] else 'asymmetric'} {gran}, "
        f"phi={lr['phi']}, rank {lr['rank']}, alpha {lr['alpha']}. Data: {r['data']}."),
        "",
        (f"Perplexity on {r['eval_tokens']} held-out tokens scored in non-overlapping windows of "
        f"{r['context']} tokens."),
        "",
        "| model | perplexity |",
        "|---|---|",
        *[f"| {name} | {value:.3f} |" for name, value in rows],
        "",
        f"- Gap to float recovered over RTN: {gap:.1%}" if gap is not None else "- Gap recovered: n/a",
        f"- Merged vs training-time perplexity, relative difference: {r['merged_vs_training_rel_diff']:.2e}",
        (f"- Training: {t['steps']} steps, {t['tokens']} tokens, {t['seconds']:.0f} s, "
        f"peak memory {t['peak_rss_mb']:.0f} MB; {r['trainable_params']} trainable parameters"),
        f"- Integers where step 0 differs from RTN (ties of the stored phi): {r['rtn_tie_differences']}",
        "",
    ]
    return "\n".join(lines)
