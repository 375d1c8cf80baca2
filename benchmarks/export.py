"""Export benchmark: do the exported files compute what lrqat's merged model computes,
judged by their real consumers, and how big are they?

For each merged run: export compressed-tensors and GGUF, then measure perplexity on the
built-in corpus's eval split with lrqat, with transformers loading each export, and with
llama.cpp running the GGUF; record file sizes against the fp32/bf16 checkpoint. Prints a
table and writes `benchmarks/results/export.{json,md}`.

    .venv/bin/python benchmarks/quality.py ...   # first: the LR-QAT runs to export
    .venv/bin/python benchmarks/export.py        # the runs below, 4,096 eval tokens
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from _results import command, write_results
from transformers import AutoModelForCausalLM, CompressedTensorsConfig

from lrqat.blocks import prepare_data
from lrqat.evaluate import llama_cpp_perplexity, perplexity
from lrqat.export.formats import export_many
from lrqat.export.native import load_quantized, read_grid
from lrqat.models import load_model
from lrqat.rundir import RunDir

RUNS = "runs/quality/w4-channel-sym/lrqat,runs/quality/w4-g64-asym/lrqat"


def measure(run: Path, blocks: torch.Tensor) -> dict:
    ct, gg = export_many(run, ["compressed-tensors", "gguf"])
    ours = load_quantized(RunDir(run).model)
    symmetric = read_grid(RunDir(run).model).symmetric
    # asymmetric packed zero points load only through the dequantizing route (README)
    extra = {} if symmetric else {"quantization_config": CompressedTensorsConfig(dequantize=True)}
    ct_model = AutoModelForCausalLM.from_pretrained(ct["path"], dtype=torch.float32, **extra)
    with torch.no_grad():
        a, b = ours(blocks[:1]).logits, ct_model(blocks[:1]).logits
    gg_model = AutoModelForCausalLM.from_pretrained(Path(gg["path"]).parent, gguf_file=Path(gg["path"]).name,
                                                    dtype=torch.float32)
    return {
        "run": str(run), "quant": ct["quant"], "gguf_type": gg["block_type"],
        "ppl_lrqat": perplexity(ours, blocks).ppl,
        "ppl_compressed_tensors_transformers": perplexity(ct_model, blocks).ppl,
        "compressed_tensors_max_rel_logit_diff": ((a - b).abs().max() / a.abs().max()).item(),
        "ppl_gguf_transformers": perplexity(gg_model, blocks).ppl,
        "ppl_gguf_llama_cpp": llama_cpp_perplexity(gg["path"], blocks).ppl,
        "gguf_mb": gg["bytes"] / 1e6, "gguf_ratio_fp32": gg["ratio_to_fp32"],
        "compressed_tensors_mb": ct["bytes"] / 1e6, "compressed_tensors_ratio_fp32": ct["ratio_to_fp32"],
        "bits_per_weight_compressed_tensors": ct["bits_per_quantized_weight"],
        "bits_per_weight_gguf": gg["bits_per_quantized_weight"],
    }


def render(rows: list[dict], tokens: int, command: str) -> str:
    lines = ["# Exports judged by their consumers", "", f"Command: `{command}`; {tokens} Brown eval tokens, context 1024.", "",
             ("| run | lrqat | compressed-tensors in transformers (max rel logit diff) | GGUF in transformers | "
             "GGUF in llama.cpp | GGUF MB (x fp32) | compressed-tensors MB (x fp32) |"),
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(
            f"| {r['quant']} ({r['gguf_type']}) | {r['ppl_lrqat']:.3f} | {r['ppl_compressed_tensors_transformers']:.3f} "
            f"({r['compressed_tensors_max_rel_logit_diff']:.1e}) | {r['ppl_gguf_transformers']:.3f} | "
            f"{r['ppl_gguf_llama_cpp']:.3f} ({100 * (r['ppl_gguf_llama_cpp'] / r['ppl_lrqat'] - 1):+.2f}%) | "
            f"{r['gguf_mb']:.1f} ({r['gguf_ratio_fp32']:.2f}) | {r['compressed_tensors_mb']:.1f} "
            f"({r['compressed_tensors_ratio_fp32']:.2f}) |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", default=RUNS, help="comma-separated run folders of merged models")
    parser.add_argument("--eval-tokens", type=int, default=4096)
    args = parser.parse_args()
    _, tokenizer = load_model("smollm2-135m")
    blocks = prepare_data(tokenizer, "brown", 256, 1024, args.eval_tokens, 0.1).eval
    rows = [measure(Path(run), blocks) for run in args.runs.split(",")]
    tokens = int(blocks.shape[0] * (blocks.shape[1] - 1))
    write_results("export", {"eval_tokens": tokens, "rows": rows}, render(rows, tokens, command()))


if __name__ == "__main__":
    main()
