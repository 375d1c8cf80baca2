"""Distillation teachers on the built-in model: how near float the `phi0` teacher is, and
what each teacher costs in memory and time.

For each weight setting: the float model, the `phi0` teacher (LR-QAT's Φ0 in fixed8,
unrounded, A·B off) and RTN, by perplexity on the held-out Brown split and on the State
of the Union addresses; the teachers' extra bytes (float: a bf16 copy, fp32 where bf16 is emulated; phi0: none;
cache: top-k logits on disk per trained token) and the seconds of one teacher pass over
a 1 × 256 sequence (median of 5). Writes `benchmarks/results/teacher.{json,md}`.

    .venv/bin/python benchmarks/teacher.py
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from _results import command, machine, write_results

from lrqat.blocks import load_token_data
from lrqat.data import held_out_blocks
from lrqat.distill import CacheTeacher, FloatTeacher, Phi0Teacher, phi0_teacher_mode
from lrqat.evaluate import perplexity
from lrqat.methods import DEFAULT_TARGETS, apply_method
from lrqat.models import load_model
from lrqat.spec import LRQATSpec, QuantSpec
from lrqat.surgery import init_ranges

SETTINGS = {
    "w4-channel-sym": QuantSpec(bits=4, symmetric=True, group_size=None),
    "w3-g64-asym": QuantSpec(bits=3, symmetric=False, group_size=64),
    "w2-g64-asym": QuantSpec(bits=2, symmetric=False, group_size=64),
}


def seconds(fn, reps: int = 5) -> float:
    fn()
    times = []
    for _ in range(reps):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--eval-tokens", type=int, default=4096)
    parser.add_argument("--top-k", type=int, default=64)
    parser.add_argument("--note", default="", help="a line on the conditions (e.g. another job running)")
    args = parser.parse_args()

    model, tokenizer = load_model("smollm2-135m")
    data = load_token_data(tokenizer, "brown", 256, 1024, args.eval_tokens, 0.1, max_train_tokens=256, seed=0,
                           streaming=False)
    sotu = held_out_blocks(tokenizer, "sotu", 1024, args.eval_tokens)
    ids = data.train.first(1)
    record = {"command": command(), "machine": machine(), "note": args.note, "settings": {}}
    record["float"] = {"brown": perplexity(model, data.eval).ppl, "sotu": perplexity(model, sotu).ppl}
    float_teacher = FloatTeacher.of(model)  # as a run holds it: bf16 where native, else fp32
    with tempfile.TemporaryDirectory() as tmp:
        cache = CacheTeacher.build(model, [ids[0]], args.top_k, Path(tmp) / "cache", log=lambda _: None)
        cache_bytes_per_token = CacheTeacher.size(cache.folder) / (ids.shape[1] - 1)
    record["costs"] = {
        "float": {"dtype": str(next(float_teacher.model.parameters()).dtype).removeprefix("torch."), "bytes": float_teacher.bytes(), "seconds": seconds(lambda: float_teacher.logits(model, ids))},
        "cache": {"bytes_per_trained_token": cache_bytes_per_token, "top_k": args.top_k},
    }
    float_teacher = None  # its memory back before the students load
    for name, quant in SETTINGS.items():
        student, _ = load_model("smollm2-135m")
        ranges = init_ranges(student, quant, DEFAULT_TARGETS, "lp")
        rtn = apply_method("rtn", load_model("smollm2-135m")[0], quant, None, ranges)
        apply_method("lrqat", student, quant, LRQATSpec(phi="fixed8"), ranges)
        with phi0_teacher_mode(student):
            teacher = {"brown": perplexity(student, data.eval).ppl, "sotu": perplexity(student, sotu).ppl}
        record["settings"][name] = {
            "phi0_teacher": teacher,
            "rtn": {"brown": perplexity(rtn, data.eval).ppl, "sotu": perplexity(rtn, sotu).ppl},
            "phi0_seconds": seconds(lambda s=student: Phi0Teacher().logits(s, ids)),
        }
        del student, rtn
    write_results("teacher", record, render(record))


def render(r: dict) -> str:
    f = r["float"]
    lines = [
        "# Distillation teachers",
        "",
        f"Command: `{r['command']}` ({r['machine']}). Model smollm2-135m; lp ranges; Φ0 in fixed8.",
        "",
        "| weights | float brown | phi0 teacher brown | RTN brown | float sotu | phi0 teacher sotu | RTN sotu |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, s in r["settings"].items():
        t, q = s["phi0_teacher"], s["rtn"]
        lines.append(f"| {name} | {f['brown']:.3f} | {t['brown']:.3f} | {q['brown']:.3f} | {f['sotu']:.3f} | "
                     f"{t['sotu']:.3f} | {q['sotu']:.3f} |")
    c = r["costs"]
    lines += [
        "",
        "| teacher | extra memory | one pass, 1 × 256 tokens |",
        "|---|---|---|",
        f"| float ({c['float'].get('dtype', 'bfloat16')} copy) | {c['float']['bytes'] / 2**20:.1f} MiB | {c['float']['seconds']:.3f} s |",
        *[f"| phi0 ({name}) | 0 | {s['phi0_seconds']:.3f} s |" for name, s in r["settings"].items()],
        (f"| cache (top-{c['cache']['top_k']}) | 0 in memory; {c['cache']['bytes_per_trained_token']:.0f} bytes per "
        "trained token on disk | read from disk |"),
        "",
        "The phi0 teacher differs from float where the range init clipped weights (lp ranges clip by design)",
        "and by fixed8's storage of the fraction (1/16 of a step at W4, 1/32 at W3, 1/64 at W2).",
        *([f"Note: {r['note']}"] if r.get("note") else []),
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
