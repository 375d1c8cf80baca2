"""The run report: `results.json` for machines and `report.md` for people."""

from __future__ import annotations

from lrqat.checkpoint import atomic_write_text
from lrqat.methods import METHODS
from lrqat.rundir import RunDir, RunResult


def write_results(out: RunDir, results: RunResult) -> None:
    atomic_write_text(out.results, results.to_json())
    atomic_write_text(out.report, render_report(results))


def render_report(r: RunResult) -> str:
    ppl, method = r.ppl, METHODS[r.method]
    q, ptq, lr, t = r.spec["quant"], r.spec["ptq"], r.spec["lrqat"], r.train
    gran = "per-channel" if q["group_size"] is None else f"group {q['group_size']}"
    name = method.label
    act = r.spec.get("act") or {"bits": 16, "kv_bits": 16}
    online = f"A{act['bits']} KV{act['kv_bits']}"
    rows = [("float (unquantized)", ppl["float"])]
    if "float_act" in ppl:
        rows.append((f"float weights, {online}", ppl["float_act"]))
    rows.append((f"RTN ({'lp' if ptq['init'] == 'gptq' else ptq['init']} ranges)", ppl["rtn"]))
    if ptq["init"] == "gptq":
        rows.append(("GPTQ, the PTQ start", ppl["ptq"]))
    if not method.trained:
        rows.append((f"{name}, integer model", r.ppl_merged))
    else:
        rows += [(f"{name}, training-time model", ppl[r.method]), (f"{name}, merged integer model", r.ppl_merged)]
    gap = r.gap_recovered
    lines = [
        f"# lrqat report: {name} on {r.model}",
        "",
        (f"W{q['bits']} {'symmetric' if q['symmetric'] else 'asymmetric'} {gran}, {online}, "
        f"rotation {r.spec.get('rotate', 'none')}, phi={lr['phi']}, rank {lr['rank']}, alpha {lr['alpha']}. "
        f"Data: {r.data}."),
        "",
        (f"Perplexity on {r.eval_tokens} held-out tokens scored in non-overlapping windows of "
        f"{r.context} tokens."),
        "",
        "| model | perplexity |",
        "|---|---|",
        *[f"| {row} | {value:.3f} |" for row, value in rows],
        "",
        f"- Gap to float recovered over RTN: {gap:.1%}" if gap is not None else "- Gap recovered: n/a",
        f"- Merged vs training-time perplexity, relative difference: {r.merged_vs_training_rel_diff:.2e}",
        (f"- Training: {t['steps']} steps, {t['tokens']} tokens, {t['seconds']:.0f} s, "
        f"peak memory {t['peak_rss_mb']:.0f} MB; {r.trainable_params} trainable parameters"),
        f"- Integers where step 0 differs from RTN (ties of the stored phi): {r.rtn_tie_differences}",
        *[f"- Export {e['format']}: {e['path']} ({e['bytes']:,} bytes)" for e in r.exports],
        "",
    ]
    return "\n".join(lines)
