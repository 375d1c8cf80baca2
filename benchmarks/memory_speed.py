"""Memory and speed of one training step: LR-QAT (each φ) against plain LoRA, full QAT and PEQA.

For each model shape (the built-in model's, Llama-1B's, Llama-7B's; random weights,
since shape is what memory and time depend on) every variant runs in its own process:
build the model in the chosen dtype, apply the method, run warm-up steps, then time
training steps and record the peak memory of the training window (on CPU: VmHWM minus
the process's resident memory before any model existed, i.e. without Python, torch and
transformers themselves; on GPU: peak allocated) next to the static bill from
`lrqat.memory`. Ratios are taken within
one run, side by side. A per-layer micro-benchmark times forward+backward of one
`LRQATLinear` against a frozen plain linear with a LoRA adapter of the same shape.

    .venv/bin/python benchmarks/memory_speed.py                       # CPU defaults (layers reduced)
    .venv/bin/python benchmarks/memory_speed.py --shapes llama-7b --layers 0 --seq-len 1024   # GPU, full depth

Writes benchmarks/results/memory_speed.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from _results import command, machine, write_results

SHAPES = {
    # hidden, intermediate, layers, heads, kv heads, vocab
    "builtin": (576, 1536, 30, 9, 3, 49152),
    "llama-1b": (2048, 8192, 16, 32, 8, 128256),
    "llama-7b": (4096, 11008, 32, 32, 32, 32000),
}
VARIANTS = ("lrqat-fixed8", "lrqat-fixed8+fused", "lrqat-int", "lrqat-bf16", "lrqat-fp32", "lora", "qat", "peqa")


def build(shape: str, layers: int, dtype: str):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, inter, depth, heads, kv, vocab = SHAPES[shape]
    config = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers or depth,
                         num_attention_heads=heads, num_key_value_heads=kv, vocab_size=vocab,
                         max_position_embeddings=4096, tie_word_embeddings=shape == "builtin")
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = LlamaForCausalLM(config).to(torch.bfloat16 if dtype == "bf16" else torch.float32)
    return model


def worker(args) -> dict:
    import torch

    from lrqat.blocks import PackedBlocks
    from lrqat.memory import memory_bill, peak_memory_mb, process_memory_mb, reset_peak_memory
    from lrqat.methods import DEFAULT_TARGETS, apply_lora, apply_method
    from lrqat.spec import LRQATSpec, QuantSpec, TrainSpec
    from lrqat.surgery import init_ranges
    from lrqat.trainer import Trainer

    torch.set_num_threads(args.threads)
    libraries_mb = 0.0 if torch.cuda.is_available() else (process_memory_mb("VmRSS") or 0.0)  # before any model exists
    model = build(args.shapes, args.layers, args.dtype)
    device = next(model.parameters()).device
    quant = QuantSpec(bits=4, symmetric=True, group_size=None)
    variant, _, option = args.worker.partition("+")  # "+fused": --fused
    method, _, phi = variant.partition("-")
    lrqat = LRQATSpec(rank=args.rank, phi=phi or "fixed8", fused=option == "fused")
    if method == "lora":
        apply_lora(model, lrqat)
    else:
        apply_method(method, model, quant, lrqat, init_ranges(model, quant, DEFAULT_TARGETS, "minmax"), init="minmax")
    model.to(device)
    blocks = torch.randint(0, model.config.vocab_size, (args.batch_size * (args.steps + 1), args.seq_len))
    spec = TrainSpec(steps=args.steps + 1, batch_size=args.batch_size, seq_len=args.seq_len, lr=1e-4, lr_scales=1e-5,
                     warmup=0.0, save_every=0, eval_every=0)
    trainer = Trainer(model, PackedBlocks(blocks), blocks[:1], spec, Path(args.tmp), {})
    bill = memory_bill(trainer.model)  # what this process holds (its shards, under FSDP)
    trainer.train_step()  # warm-up: allocator pools, optimizer state, compiling (fused)
    trainer.step += 1
    reset_peak_memory()
    times = []
    for _ in range(args.steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        trainer.train_step()
        trainer.step += 1
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    peak = peak_memory_mb()
    return {"variant": args.worker, "shape": args.shapes, "peak_mb": round(peak - libraries_mb, 1),
            "peak_process_mb": round(peak, 1), "libraries_mb": round(libraries_mb, 1),
            "step_s": round(min(times), 3), "bill_mb": bill.as_mb(),
            "tokens_per_s": round(args.batch_size * args.seq_len / min(times), 1),
            "process": trainer.accelerator.process_index, "processes": trainer.accelerator.num_processes}


LAYER_VARIANTS = ("lora", "lrqat-fixed8", "lrqat-int", "lrqat-bf16", "lrqat-fixed8 fused", "lrqat-fixed8 dense-G")


def layer_micro(threads: int, dtype: str, tokens: int, rank: int, repeats: int = 5,
                variants: tuple[str, ...] = LAYER_VARIANTS) -> list[dict]:
    """Forward+backward of one layer: LRQATLinear (each φ; fixed8 also fused, and with the
    dense `G = gᵀx` backward it had before the low-rank form) vs frozen linear + LoRA
    (`variants` picks among them; LoRA always runs, every ratio is to it)."""
    import copy

    import torch
    from torch import nn

    from lrqat.layers import LoRALinear, LRQATLinear
    from lrqat.spec import LRQATSpec, QuantSpec

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    dt = torch.bfloat16 if dtype == "bf16" else torch.float32
    rows = []
    for out_f, in_f in ((4096, 4096), (11008, 4096)):
        linear = nn.Linear(in_f, out_f, bias=False).to(dt)
        x = torch.randn(tokens, in_f, dtype=dt, requires_grad=True)
        layers = {"lora": LoRALinear(linear, LRQATSpec(rank=rank))}
        for phi in ("fixed8", "int", "bf16"):
            layers[f"lrqat-{phi}"] = LRQATLinear(linear, QuantSpec(bits=4), LRQATSpec(rank=rank, phi=phi), init="minmax")
        layers["lrqat-fixed8 fused"] = copy.deepcopy(layers["lrqat-fixed8"])
        layers["lrqat-fixed8 fused"].fused = True
        layers["lrqat-fixed8 dense-G"] = layers["lrqat-fixed8"]
        layers = {name: layer for name, layer in layers.items() if name == "lora" or name in variants}
        timings = {}
        for name, layer in layers.items():
            if isinstance(layer, LRQATLinear):  # "dense-G": the dense backward from the forward on
                layer.sparse_correction_max_density = -1.0 if name.endswith("dense-G") else 0.01
            best = float("inf")
            for _ in range(repeats + 1):  # the first call compiles the fused kernels
                started = time.perf_counter()
                layer(x).float().square().mean().backward()
                best = min(best, time.perf_counter() - started)
            timings[name] = best
        for name, seconds in timings.items():
            rows.append({"shape": f"{out_f}x{in_f}", "layer": name, "fwd_bwd_ms": round(1000 * seconds, 2),
                         "vs_lora": round(seconds / timings["lora"], 2)})
    return rows


def render(rows: list[dict], micro: list[dict], meta: dict) -> str:
    lines = ["# Memory and speed of a training step", "",
             f"Machine: {meta['machine']}. Command: `{meta['command']}`",
             (f"dtype {meta['dtype']}, batch {meta['batch_size']} x {meta['seq_len']} tokens, rank {meta['rank']}, "
             f"W4 per-channel, block activation checkpointing on; min over {meta['steps']} timed steps after one warm-up."), ""]
    for shape in dict.fromkeys(r["shape"] for r in rows):
        group = [r for r in rows if r["shape"] == shape]
        by = {r["variant"]: r for r in group}
        lines += [f"## {shape} ({meta['layers'].get(shape)} layers)", "",
                  "| variant | peak MB (training window, model only) | vs QAT | step s | vs LoRA | frozen quantized base MB | other frozen MB | trainable MB | Adam state MB |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in group:
            qat = by.get("qat", {}).get("peak_mb")
            lora = by.get("lora", {}).get("step_s")
            b = r["bill_mb"]
            lines.append(f"| {r['variant']} | {r['peak_mb']} | {r['peak_mb'] / qat:.2f} | {r['step_s']} | "
                         f"{r['step_s'] / lora:.2f} | {b['frozen_quantized_base']} | {b['frozen_other']} | "
                         f"{b['trainable']} | {b['adam_state']} |" if qat and lora else f"| {r['variant']} | {r['peak_mb']} | - | {r['step_s']} | - | | | | |")
        lines.append("")
    if micro:
        lines += ["## One layer, forward + backward", "", "| shape | layer | ms | vs LoRA |", "|---|---|---:|---:|"]
        lines += [f"| {m['shape']} | {m['layer']} | {m['fwd_bwd_ms']} | {m['vs_lora']} |" for m in micro]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="builtin,llama-1b,llama-7b")
    parser.add_argument("--layers", default="builtin=30,llama-1b=2,llama-7b=1",
                        help="depth per shape (0 = the real depth); CPU defaults keep the big shapes shallow")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--dtype", default="bf16", choices=("fp32", "bf16"))
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--micro-tokens", type=int, default=512, help="tokens in the per-layer benchmark (0 skips it)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--report", help=argparse.SUPPRESS)
    parser.add_argument("--tmp", default="runs/memory_speed", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        args.layers = int(args.layers)
        report = worker(args)
        if args.report:  # one file per process: the lines of several processes would interleave on stdout
            Path(args.report).mkdir(parents=True, exist_ok=True)
            (Path(args.report) / f"process{report['process']}.json").write_text(json.dumps(report))
        else:
            print(json.dumps(report))
        return

    depth = dict(item.split("=") for item in args.layers.split(",")) if "=" in args.layers else {}
    rows = []
    for shape in args.shapes.split(","):
        for variant in args.variants.split(","):
            cmd = [sys.executable, __file__, "--worker", variant, "--shapes", shape, "--layers", depth.get(shape, "0"),
                   "--dtype", args.dtype, "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len),
                   "--rank", str(args.rank), "--steps", str(args.steps), "--threads", str(args.threads),
                   "--tmp", f"{args.tmp}/{shape}-{variant}"]
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if proc.returncode != 0:
                print(f"{shape} {variant} failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
                continue
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(rows[-1], flush=True)
    micro = layer_micro(args.threads, args.dtype, args.micro_tokens, args.rank) if args.micro_tokens else []
    meta = {"machine": f"{machine()}, {args.threads} threads", "dtype": args.dtype,
            "batch_size": args.batch_size, "seq_len": args.seq_len, "rank": args.rank, "steps": args.steps,
            "layers": {s: int(depth.get(s, "0")) or SHAPES[s][2] for s in args.shapes.split(",")},
            "command": command()}
    write_results("memory_speed", {"meta": meta, "rows": rows, "micro": micro}, render(rows, micro, meta))


if __name__ == "__main__":
    main()
