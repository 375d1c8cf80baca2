"""Step time against tokens per micro-batch: one Llama-7B-shaped layer, forward+backward,
LR-QAT against frozen linear + LoRA at 512, 2,048 and 8,192 tokens.

LR-QAT's extra work is weight-sized (recomputing Ŵ from Φ0 + A·B, forward and again
backward) and paid once per micro-batch, while the matrix products grow with tokens;
the paper trains 32 × 1,024 tokens per step. So the LR-QAT/LoRA ratio should fall as
tokens grow; this measures how far, side by side in one process (min over repeats).

    .venv/bin/python benchmarks/layer_tokens.py                      # ~10 min on 2 cores
    .venv/bin/python benchmarks/layer_tokens.py --tokens 512 --repeats 1

Writes benchmarks/results/layer_tokens.{json,md}.
"""

from __future__ import annotations

import argparse

from _results import command, machine, write_results
from memory_speed import layer_micro

VARIANTS = ("lrqat-fixed8", "lrqat-int", "lrqat-fixed8 fused")


def render(record: dict) -> str:
    rows = record["rows"]
    tokens = sorted({r["tokens"] for r in rows})
    lines = ["# LR-QAT / LoRA step time against tokens per micro-batch", "",
             (f"Machine: {record['machine']}. Command: `{record['command']}`. One layer of Llama-7B shape, "
             f"{record['dtype']}, rank {record['rank']}, forward+backward, min over {record['repeats']} repeats after "
             "a warm-up; LoRA is a frozen linear in the same dtype plus its adapter."), "",
             "| shape | layer | " + " | ".join(f"{t} tokens: ms (vs LoRA)" for t in tokens) + " |",
             "|---|---|" + "---|" * len(tokens)]
    for shape in dict.fromkeys(r["shape"] for r in rows):
        for layer in dict.fromkeys(r["layer"] for r in rows if r["shape"] == shape):
            cells = []
            for t in tokens:
                r = next((r for r in rows if (r["shape"], r["layer"], r["tokens"]) == (shape, layer, t)), None)
                cells.append("–" if r is None else f"{r['fwd_bwd_ms']:.0f} ({r['vs_lora']:.2f})")
            lines.append(f"| {shape} | {layer} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", default="512,2048,8192")
    parser.add_argument("--dtype", default="bf16", choices=("fp32", "bf16"))
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    rows = []
    for tokens in (int(t) for t in args.tokens.split(",")):
        for row in layer_micro(args.threads, args.dtype, tokens, args.rank, args.repeats, VARIANTS):
            rows.append({**row, "tokens": tokens})
            print(rows[-1], flush=True)
    record = {"machine": f"{machine()}, {args.threads} threads", "command": command(), "dtype": args.dtype,
              "rank": args.rank, "repeats": args.repeats, "rows": rows}
    write_results("layer_tokens", record, render(record))


if __name__ == "__main__":
    main()
