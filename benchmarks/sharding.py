"""Memory per process of LR-QAT training under DDP and FSDP (2 processes) against one process.

Each setup runs `memory_speed.py`'s worker (random-weight model of the given shape,
LR-QAT fixed8, W4 per-channel, bf16) under `accelerate launch` with the project's ready
configs, one thread per process; every process reports its own training-window peak and
the static bill of what it holds (its shards under FSDP). The per-process batch is the
same in every setup, so the memory figures compare like with like.

    .venv/bin/python benchmarks/sharding.py                       # CPU defaults (gloo)
    .venv/bin/python benchmarks/sharding.py --shapes llama-7b --layers 0 --seq-len 1024   # GPUs

Writes benchmarks/results/sharding-LAYERS-layers.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

from _results import command, machine, write_results

ROOT = Path(__file__).parent.parent
SETUPS = {"one": ("1 process", None), "ddp": ("DDP, 2 processes", "ddp.yaml"), "fsdp": ("FSDP, 2 processes", "fsdp.yaml")}


def run_setup(config: str | None, args, shape: str, port: int) -> list[dict]:
    reports = Path("runs/sharding") / f"{shape}-{config}-reports"
    shutil.rmtree(reports, ignore_errors=True)
    worker = [str(Path(__file__).parent / "memory_speed.py"), "--worker", args.variant, "--shapes", shape,
              "--report", str(reports),
              "--layers", args.layers, "--dtype", args.dtype, "--seq-len", str(args.seq_len), "--rank", str(args.rank),
              "--steps", str(args.steps), "--threads", "1", "--tmp", f"runs/sharding/{shape}-{config}"]
    launcher = [] if config is None else ["-m", "accelerate.commands.launch", "--config_file",
                                          str(ROOT / "configs" / "accelerate" / config), "--main_process_port", str(port)]
    proc = subprocess.run([sys.executable, *launcher, *worker], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"{shape} {config} failed:\n{proc.stderr[-3000:]}")
    return [json.loads(path.read_text()) for path in sorted(reports.glob("process*.json"))]


def render(rows: list[dict], meta: dict) -> str:
    lines = ["# LR-QAT memory per process: one process, DDP, FSDP", "",
             f"Machine: {meta['machine']}. Command: `{meta['command']}`",
             (f"{meta['variant']}, dtype {meta['dtype']}, batch 1 x {meta['seq_len']} tokens per process, rank "
             f"{meta['rank']}, W4 per-channel, one thread per process; min step time over {meta['steps']} steps."), "",
             ("| shape | setup | peak MB per process (max) | vs 1 process | static bill MB per process | "
             "frozen quantized base MB | other frozen MB | step s |"),
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    single = {r["shape"]: r["peak_mb"] for r in rows if r["setup"] == SETUPS["one"][0]}
    for r in rows:
        b = r["bill_mb"]
        ratio = f"{r['peak_mb'] / single[r['shape']]:.2f}" if r["shape"] in single else "-"
        lines.append(f"| {r['shape']} ({r['layers']} layers) | {r['setup']} | {r['peak_mb']} | {ratio} | {b['total']} | "
                     f"{b['frozen_quantized_base']} | {b['frozen_other']} | {r['step_s']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="builtin,llama-7b")
    parser.add_argument("--layers", default="2", help="decoder layers of each shape (0: the real depth)")
    parser.add_argument("--variant", default="lrqat-fixed8")
    parser.add_argument("--setups", default=",".join(SETUPS), help="of: " + ", ".join(SETUPS))
    parser.add_argument("--dtype", default="bf16", choices=("fp32", "bf16"))
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--steps", type=int, default=2)
    args = parser.parse_args()
    rows = []
    for shape in args.shapes.split(","):
        for i, key in enumerate(args.setups.split(",")):
            setup, config = SETUPS[key]
            reports = run_setup(config, args, shape, 29600 + i)
            worst = max(reports, key=lambda r: r["peak_mb"])
            rows.append({"shape": shape, "setup": setup, "layers": args.layers, "processes": len(reports),
                         "peak_mb": worst["peak_mb"], "bill_mb": worst["bill_mb"],
                         "step_s": max(r["step_s"] for r in reports), "per_process": reports})
            print({k: v for k, v in rows[-1].items() if k != "per_process"}, flush=True)
    meta = {"machine": machine(), "variant": args.variant, "dtype": args.dtype,
            "seq_len": args.seq_len, "rank": args.rank, "steps": args.steps,
            "command": command()}
    # one file per depth: shallow and deep models tell different stories
    write_results(f"sharding-{args.layers}-layers", {"meta": meta, "rows": rows}, render(rows, meta))


if __name__ == "__main__":
    main()
