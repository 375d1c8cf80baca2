"""Weights, activations and KV cache: every method at W-A-KV 4-16-16, 4-8-8, 4-8-4 and
4-4-4, without and with Hadamard rotations, on the built-in model and corpus.

Each (setting, rotation) pair is one `lrqat compare` at equal tokens (run folders under
`runs/weight_activation/`, so an interrupted benchmark resumes). G is measured against
RTN at the same W-A-KV setting *without* rotation: G = (ppl_RTN − ppl)/(ppl_RTN − ppl_float).
Also timed: one LR-QAT forward+backward with the activation quantizers (and online
rotations) on and off, interleaved in one process. Writes
`benchmarks/results/weight_activation.{json,md}`.

    .venv/bin/python benchmarks/weight_activation.py               # the recorded budget
    .venv/bin/python benchmarks/weight_activation.py --steps 2 --settings 4-4-4 --methods rtn,lrqat
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from pathlib import Path

from _results import machine, write_results

from lrqat.activations import ActSpec
from lrqat.compare import run_compare, summarize
from lrqat.methods import METHODS
from lrqat.rundir import RunDir, gap_recovered
from lrqat.spec import DataSpec, PTQSpec, QuantSpec, RunSpec, TrainSpec

SETTINGS = {"4-16-16": ActSpec(16, 16), "4-8-8": ActSpec(8, 8), "4-8-4": ActSpec(8, 4), "4-4-4": ActSpec(4, 4)}
METHOD_ORDER = ("rtn", "gptq", "peqa", "qat", "lrqat", "lrqat-gptq")
# LR-QAT started from other post-training solutions: name → (column label, PTQSpec changes).
# Each runs as its own one-method comparison beside the row's folder.
VARIANTS = {"lrqat-gptq": ("LR-QAT from GPTQ", {"init": "gptq"})}


def label(method: str) -> str:
    return VARIANTS[method][0] if method in VARIANTS else METHODS[method].label


def variant_folder(row_folder: str, variant: str) -> str:
    return f"{row_folder}-{variant}"
WEIGHTS = QuantSpec(bits=4, symmetric=True, group_size=None)


def quantizer_overhead(reps: int, seq_len: int) -> dict:
    """Median seconds of one LR-QAT forward+backward (batch 1) with the quantizers off,
    at A8 KV8, and at A4 KV4 with R3/R4 online: all in one process, interleaved."""
    import torch

    from lrqat.methods import apply_method
    from lrqat.models import load_model
    from lrqat.online import prepare
    from lrqat.spec import LRQATSpec
    from lrqat.surgery import find_targets, init_ranges

    variants = {"A16 KV16": (ActSpec(), "none"), "A8 KV8": (ActSpec(8, 8), "none"),
                "A4 KV4 + R1-R4": (ActSpec(4, 4), "hadamard")}
    models = {}
    for name, (act, rotate) in variants.items():
        model, _ = load_model("smollm2-135m")
        targets = [n for n, _ in find_targets(model, r"\.(q|k|v|o|gate|up|down)_proj$")]
        prepare(model, act, rotate, 0, targets)
        apply_method("lrqat", model, WEIGHTS, LRQATSpec(), init_ranges(model, WEIGHTS, r"\.(q|k|v|o|gate|up|down)_proj$",
                                                                          "minmax"))
        model.train()
        models[name] = model
    ids = torch.randint(0, 49152, (1, seq_len), generator=torch.Generator().manual_seed(0))
    times: dict[str, list[float]] = {name: [] for name in models}
    for rep in range(reps + 1):
        for name, model in models.items():
            started = time.perf_counter()
            model(input_ids=ids, labels=ids).loss.backward()
            if rep:  # the first pass warms up
                times[name].append(time.perf_counter() - started)
            model.zero_grad(set_to_none=True)
    base = statistics.median(times["A16 KV16"])
    return {name: {"seconds": statistics.median(t), "ratio": statistics.median(t) / base} for name, t in times.items()}


def llama_cpp_kv(run: Path, eval_tokens: int) -> dict:
    """The W4 LR-QAT model (4-16-16, no rotation) exported to GGUF and scored by llama.cpp
    with its KV cache in f16, q8_0 and q4_0, beside lrqat's own per-token KV8/KV4 on the
    same merged model and the same eval windows."""
    import tempfile

    from lrqat.blocks import load_token_data
    from lrqat.evaluate import llama_cpp_perplexity, perplexity
    from lrqat.export.formats import export
    from lrqat.export.native import load_quantized
    from lrqat.models import load_tokenizer
    from lrqat.online import apply_online
    from lrqat.rotation import RotationRecord

    model_dir = run / "model"
    data = load_token_data(load_tokenizer(model_dir), "brown", 256, 1024, eval_tokens, 0.1, max_train_tokens=256,
                           seed=0, streaming=False)
    result: dict = {"model": str(model_dir), "tokens": int(data.eval.shape[0] * (data.eval.shape[1] - 1))}
    with tempfile.TemporaryDirectory() as tmp:
        gguf = export(run, "gguf", Path(tmp) / "model.gguf")["path"]
        for cache in ("f16", "q8_0", "q4_0"):
            result[f"llama.cpp {cache}"] = llama_cpp_perplexity(gguf, data.eval, cache_type=cache).ppl
    model = load_quantized(model_dir)
    names = [n for n, m in model.named_modules() if type(m).__name__ == "QuantLinear"]
    for kv in (16, 8, 4):
        apply_online(model, ActSpec(16, kv), RotationRecord(), names)
        result[f"lrqat KV{kv}"] = perplexity(model, data.eval).ppl
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=16, help="optimizer steps of every trained method")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--eval-tokens", type=int, default=4096)
    parser.add_argument("--calib-tokens", type=int, default=4096)
    parser.add_argument("--settings", default=",".join(SETTINGS))
    parser.add_argument("--rotations", default="none,hadamard")
    parser.add_argument("--methods", default=",".join(METHOD_ORDER))
    parser.add_argument("--overhead-reps", type=int, default=5, help="0 skips (keeps the recorded) overhead timing")
    parser.add_argument("--output", default="runs/weight_activation")
    parser.add_argument("--collect", action="store_true",
                        help="run nothing: build the rows from the finished runs under --output (an interrupted run)")
    parser.add_argument("--llama-cpp-kv", action="store_true",
                        help="only add llama.cpp's KV-cache types on a finished W4 LR-QAT model to the results")
    parser.add_argument("--kv-run", help="that model's run folder (default: the 4-16-16 LR-QAT run under --output)")
    parser.add_argument("--note", help="a remark recorded with this invocation's command (e.g. what ran beside it)")
    args = parser.parse_args()
    if args.llama_cpp_kv:
        import json

        from _results import RESULTS

        record = json.loads((RESULTS / "weight_activation.json").read_text())
        run = Path(args.kv_run or Path(args.output) / "4-16-16-none" / "lrqat")
        record["llama_cpp_kv"] = llama_cpp_kv(run, args.eval_tokens)
        record["llama_cpp_kv"]["command"] = ("python benchmarks/weight_activation.py --llama-cpp-kv"
                                             + (f" --kv-run {args.kv_run}" if args.kv_run else ""))
        write_results("weight_activation", record, render(record))
        return

    started = time.time()
    # Each invocation adds its rows (and overhead timing) to the recorded results, so the
    # table can be built over several sessions; a row is replaced when it is run again.
    import json

    from _results import RESULTS

    previous = RESULTS / "weight_activation.json"
    record = json.loads(previous.read_text()) if previous.exists() else {"rows": {}, "overhead": {}, "commands": []}
    if args.overhead_reps:
        record["overhead"] = quantizer_overhead(args.overhead_reps, args.seq_len)
    rows = record["rows"]
    for setting in [s for s in args.settings.split(",") if s]:
        for rotate in args.rotations.split(","):
            spec = RunSpec(
                output=f"{args.output}/{setting}-{rotate}", rotate=rotate, act=SETTINGS[setting], quant=WEIGHTS,
                ptq=PTQSpec(calib_tokens=args.calib_tokens),
                train=TrainSpec(steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, save_every=4),
                data=DataSpec(eval_tokens=args.eval_tokens),
            )
            requested = args.methods.split(",")
            methods = [m for m in requested if m not in VARIANTS]
            variants = [m for m in requested if m in VARIANTS]
            if args.collect or not methods:  # the methods whose run finished, as compare would have summarised them
                done = {m: RunDir(spec.output).method_run(m) for m in methods or METHOD_ORDER if m not in VARIANTS}
                done = {m: d.read_result() for m, d in done.items() if d.results.exists()}
                if not done:
                    continue
                methods = list(done)
                summary = summarize(done)
            else:
                summary = run_compare(spec, methods)
            for variant in variants:
                changes = VARIANTS[variant][1]
                variant_spec = dataclasses.replace(spec, output=variant_folder(spec.output, variant),
                                                   ptq=dataclasses.replace(spec.ptq, **changes))
                run = RunDir(variant_spec.output).method_run("lrqat")
                if args.collect and not run.results.exists():
                    continue
                result = summarize({"lrqat": run.read_result()}) if args.collect else run_compare(variant_spec, ["lrqat"])
                summary["methods"][variant] = result["methods"]["lrqat"]
            first = RunDir(spec.output).method_run(methods[0]).read_result()
            summary["ppl_float_act"] = first.ppl.get("float_act", first.ppl["float"])
            rows[f"{setting}/{rotate}"] = summary
    for key, summary in rows.items():
        setting = key.split("/")[0]
        reference = rows.get(f"{setting}/none", summary)
        for m in summary["methods"].values():
            m["G"] = gap_recovered(reference["ppl_float"], reference["ppl_rtn"], m["ppl"])
    flags = [f"--{k.replace('_', '-')}" + ("" if v is True else f" {v}") for k, v in vars(args).items()
             if k not in ("output", "llama_cpp_kv", "kv_run", "note") and v is not False and v is not None]
    command = " ".join(["python benchmarks/weight_activation.py", *flags])
    took = "collected from finished runs" if args.collect else f"{round((time.time() - started) / 60, 1)} min"
    record["commands"] = [*record.get("commands", []), f"{command}  ({took})" + (f": {args.note}" if args.note else "")]
    record.update(machine=machine(), tokens_per_method=args.steps * args.batch_size * args.seq_len)
    write_results("weight_activation", record, render(record))


def render(record: dict) -> str:
    rows = record["rows"]
    methods = [m for m in METHOD_ORDER if any(m in r["methods"] for r in rows.values())]
    rotations = sorted({k.split("/")[1] for k in rows}, key=["none", "hadamard"].index)
    settings = [s for s in SETTINGS if any(k.split("/")[0] == s for k in rows)]
    first = next(iter(rows.values()))
    lines = [
        "# Weights, activations and KV cache",
        "",
        f"Machine: {record['machine']}. Commands, in the order they ran (each adds its rows; times in brackets):",
        "",
        *[f"- `{c}`" for c in record["commands"]],
        "",
        (f"Model {first['model']}, data {first['data']}; merged-model perplexity on {first['eval_tokens']} held-out "
         f"tokens (windows of {first['context']}); weights W4 per-channel symmetric; every trained method gets "
         f"{record['tokens_per_method']:,} training tokens at its default rates. Float (W16 A16 KV16): "
         f"{first['ppl_float']:.3f}. G = (ppl_RTN − ppl)/(ppl_RTN − ppl_float) with RTN at the same W-A-KV setting "
         "without rotation. Activations: dynamic per-token asymmetric (Q too); KV: per token and head, K after RoPE."),
        "",
        "| W-A-KV | rotation | float weights, quantized A/KV | " + " | ".join(label(m) for m in methods) + " |",
        "|---|---|---|" + "---|" * len(methods),
    ]
    for setting in settings:
        for rotate in rotations:
            r = rows.get(f"{setting}/{rotate}")
            if r is None:
                continue
            cells = []
            for m in methods:
                v = r["methods"].get(m)
                cells.append("–" if v is None else f"{v['ppl']:.2f} (G {v['G']:.2f})" if v["G"] is not None
                             else f"{v['ppl']:.2f}")
            lines.append(f"| {setting} | {rotate} | {r['ppl_float_act']:.2f} | " + " | ".join(cells) + " |")
    lines += ["", "Per-method training time (s) and peak memory (MB) of each run:", "",
              "| W-A-KV | rotation | " + " | ".join(f"{label(m)} s / MB" for m in methods) + " |",
              "|---|---|" + "---|" * len(methods)]
    for key in sorted(rows, key=lambda k: (list(SETTINGS).index(k.split("/")[0]), k.split("/")[1] != "none")):
        r = rows[key]
        setting, rotate = key.split("/")
        cells = [f"{v['train_seconds']:.0f} / {v['peak_memory_mb']:.0f}" if (v := r["methods"].get(m)) else "–"
                 for m in methods]
        lines.append(f"| {setting} | {rotate} | " + " | ".join(cells) + " |")
    if record["overhead"]:
        lines += ["", ("Activation-quantizer overhead: one LR-QAT forward+backward of the built-in model (batch 1, "
                  "sequence as trained), median, interleaved in one process:"), "",
                  "| quantizers | seconds | ratio to none |", "|---|---|---|"]
        lines += [f"| {n} | {v['seconds']:.3f} | {v['ratio']:.2f} |" for n, v in record["overhead"].items()]
    kv = record.get("llama_cpp_kv")
    if kv:
        lines += ["", (f"KV cache in llama.cpp (`{kv['command']}`): the W4 LR-QAT model {kv['model']} exported to "
                       f"GGUF and scored by llama.cpp on the same {kv['tokens']} tokens (windows of 1,024) with its own "
                       "cache types (blocks of 32 values, one fp16 scale each; flash attention on for quantized "
                       "caches), beside lrqat's per-token, per-head KV quantizer on the same merged model:"), "",
                  "| KV cache | llama.cpp | lrqat |", "|---|---|---|",
                  f"| 16-bit | {kv['llama.cpp f16']:.3f} (f16) | {kv['lrqat KV16']:.3f} |",
                  f"| 8-bit | {kv['llama.cpp q8_0']:.3f} (q8_0) | {kv['lrqat KV8']:.3f} |",
                  f"| 4-bit | {kv['llama.cpp q4_0']:.3f} (q4_0) | {kv['lrqat KV4']:.3f} |"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
