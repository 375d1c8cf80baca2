"""Inference benchmark: speed and resident memory of the float model, the merged integer
model run by lrqat (packed storage, dequantized layer by layer), and its GGUF in llama.cpp.

Each variant runs in its own process, so its resident memory is its own. Measured:
load time, resident memory after loading (VmRSS) and at peak (VmHWM), prefill
throughput on a prompt, and greedy decode throughput. Prints a table and writes
`benchmarks/results/inference.{json,md}`.

    .venv/bin/python benchmarks/inference.py                       # RTN W4 of the built-in model
    .venv/bin/python benchmarks/inference.py --run runs/demo       # any merged run
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from _results import command, machine, write_results

from lrqat.rundir import RunDir

VARIANTS = ("float", "merged", "llama.cpp")


def worker(variant: str, path: str, prompt_tokens: int, new_tokens: int, threads: int) -> dict:
    """Runs inside the child process: load, prefill once, decode greedily; report."""
    import torch
    from llama_cpp import Llama
    from transformers import AutoModelForCausalLM

    from lrqat.export.native import load_quantized
    from lrqat.memory import process_memory_mb

    torch.set_num_threads(threads)
    baseline = process_memory_mb("VmRSS")  # interpreter and libraries, before any model
    started = time.perf_counter()
    if variant == "llama.cpp":
        model = Llama(model_path=path, n_ctx=prompt_tokens + new_tokens + 8, verbose=False, n_threads=threads)
        load_s = time.perf_counter() - started
        rss = process_memory_mb("VmRSS")
        ids = list(range(1000, 1000 + prompt_tokens))
        t = time.perf_counter()
        model.eval(ids)
        prefill_s = time.perf_counter() - t
        t = time.perf_counter()
        for _ in range(new_tokens):
            model.eval([int(model.sample(top_k=1))])
        decode_s = time.perf_counter() - t
    else:
        model = load_quantized(Path(path)) if variant == "merged" else AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        model.eval()
        load_s = time.perf_counter() - started
        rss = process_memory_mb("VmRSS")
        ids = torch.arange(1000, 1000 + prompt_tokens).unsqueeze(0)
        with torch.inference_mode():
            t = time.perf_counter()
            model(ids)
            prefill_s = time.perf_counter() - t
            t = time.perf_counter()
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                           min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
            decode_s = time.perf_counter() - t - prefill_s  # generate prefills once more
    peak = process_memory_mb("VmHWM")
    return {"variant": variant, "load_s": round(load_s, 2), "rss_libraries_mb": round(baseline, 1),
            "rss_after_load_mb": round(rss, 1), "peak_rss_mb": round(peak, 1), "peak_over_libraries_mb": round(peak - baseline, 1), "prefill_tok_s": round(prompt_tokens / prefill_s, 1),
            "decode_tok_s": round(new_tokens / max(decode_s, 1e-9), 2)}


def prepare(run: Path | None) -> tuple[Path, str]:
    """The merged model to measure (an RTN W4 run of the built-in model unless given) and its float source."""
    if run is None:
        run = Path("runs/inference-rtn-w4")
        if not (RunDir(run).model / "quantization.json").exists():
            subprocess.run([sys.executable, "-m", "lrqat.cli", "quantize", "--method", "rtn", "--output", str(run),
                            "--eval-tokens", "1024", "--resume"], check=True)
    from lrqat.models import resolve_model

    return run, resolve_model(RunDir(run).read_result().model)


def render(rows: list[dict], meta: dict) -> str:
    base = next((r for r in rows if r["variant"] == "float"), None)
    lines = [
        "# Inference: float vs merged integer model (CPU)", "",
        (f"Machine: {meta['machine']}; threads {meta['threads']}; prompt {meta['prompt_tokens']} tokens, "
        f"{meta['new_tokens']} new tokens greedy, batch 1."), f"Run: `{meta['command']}`", f"Merged model: `{meta['run']}` ({meta['quant']})", "",
        "| variant | load s | RSS of libraries MB | peak RSS MB | peak over libraries MB | vs float | prefill tok/s | decode tok/s | decode vs float |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        mem = f"{r['peak_over_libraries_mb'] / base['peak_over_libraries_mb']:.2f}" if base else "-"
        speed = f"{r['decode_tok_s'] / base['decode_tok_s']:.2f}" if base else "-"
        lines.append(f"| {r['variant']} | {r['load_s']} | {r['rss_libraries_mb']} | {r['peak_rss_mb']} | "
                     f"{r['peak_over_libraries_mb']} | {mem} | {r['prefill_tok_s']} | {r['decode_tok_s']} | {speed} |")
    lines += ["", ("Each variant runs in its own process with torch, transformers and llama_cpp imported before the model "
              "loads; 'peak over libraries' is the process's peak resident memory minus what it held before loading "
              "(weights, activations, KV cache, transient dequantized weights).")]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, help="run folder of `lrqat quantize` (default: RTN W4 of the built-in model)")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--path", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.path, args.prompt_tokens, args.new_tokens, args.threads)))
        return

    run, float_path = prepare(args.run)
    from lrqat.export.formats import export

    paths = {"float": float_path, "merged": str(RunDir(run).model)}
    variants = args.variants.split(",")
    if "llama.cpp" in variants:
        paths["llama.cpp"] = export(run, "gguf")["path"]
    rows = []
    for variant in variants:
        cmd = [sys.executable, __file__, "--worker", variant, "--path", paths[variant], "--prompt-tokens",
               str(args.prompt_tokens), "--new-tokens", str(args.new_tokens), "--threads", str(args.threads)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    from lrqat.export.native import read_grid

    grid = read_grid(RunDir(run).model)
    meta = {"machine": machine(), "threads": args.threads,
            "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens, "run": str(run),
            "quant": grid.describe(),
            "command": command()}
    write_results("inference", {"meta": meta, "rows": rows}, render(rows, meta))


if __name__ == "__main__":
    main()
