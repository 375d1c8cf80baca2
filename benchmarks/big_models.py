"""Big models on small machines: the real CLI on Llama-2-7B- and 13B-shaped checkpoints
at full depth, with the float model never held whole (`--load stream`).

Random weights (normal, std 0.02; norms 1), written once as sharded bf16 safetensors
with an index, as `save_pretrained` writes a real checkpoint: shape is what memory and
time depend on, so perplexities here mean nothing and are not reported. The embedding
and head have the built-in tokenizer's 49,152 rows instead of Llama-2's 32,000 (+1.4%
of a 7B's parameters), so the built-in corpus tokenizes for them.

Each variant is one `lrqat quantize` process: streamed load → float/RTN evaluation block
by block → range init (minmax) and LR-QAT layers → training at sequence 1,024, batch 1,
bf16 → merge → save → export to compressed-tensors. Per phase: seconds and peak resident
memory of the process (each phase its own window, `results.json` "phases"); for the
whole process, the largest of those (the kernel's
peak, `wait4`, restarts with each phase window). Also the built-in model loaded in
memory and streamed: setup memory, and identical perplexities.

    .venv/bin/python benchmarks/big_models.py --variants builtin           # minutes
    .venv/bin/python benchmarks/big_models.py --variants 7b-fixed8,7b-int   # each ~20-40 min on 2 cores
    .venv/bin/python benchmarks/big_models.py --variants 13b-int
    .venv/bin/python benchmarks/big_models.py --variants 7b-qat,7b-naive-lora,7b-float-lora   # the memory check only
    .venv/bin/python benchmarks/big_models.py --variants tiny-int --output /tmp/big   # smoke test

Writes benchmarks/results/big_models.{json,md}; each invocation adds its variants.
Checkpoints go to --checkpoints (13.5 GB for 7B, 26 GB for 13B), runs to runs/big_models/.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from _results import RESULTS, code_version, machine, write_results

SHAPES = {
    # hidden, intermediate, layers, heads (= KV heads)
    "7b": (4096, 11008, 32, 32),
    "13b": (5120, 13824, 40, 40),
    "tiny": (256, 512, 2, 4),  # a smoke test of this script, seconds
}
# name → (shape, φ, extra CLI flags); "builtin" compares the two loads on the built-in model
VARIANTS = {
    "7b-fixed8": ("7b", "fixed8"),
    "7b-int": ("7b", "int"),
    "13b-int": ("13b", "int"),
    "tiny-int": ("tiny", "int"),
}
# the methods LR-QAT is measured against, on the 7B shape: where do they stop fitting?
OTHER_METHODS = {"7b-qat": ("7b", "qat"), "7b-naive-lora": ("7b", "naive-lora"), "7b-float-lora": ("7b", "float-lora")}
LIMITS_GIB = {"7b-fixed8": 16, "7b-int": 13, "13b-int": 22, "tiny-int": 1}  # the targets on a 24 GiB machine
SHARD_BYTES = 2 * 2**30


def write_checkpoint(shape: str, folder: Path) -> Path:
    """A random Llama-2-shaped checkpoint in bf16 shards (skipped when already complete)."""
    import torch
    from accelerate import init_empty_weights
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, LlamaConfig

    from lrqat.models import convert_builtin, load_tokenizer

    done = folder / ".complete"
    if done.exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = load_tokenizer(convert_builtin("smollm2-135m"))
    hidden, intermediate, layers, heads = SHAPES[shape]
    config = LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=heads, vocab_size=len(tokenizer),
                         max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=False,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, dtype="bfloat16")
    with init_empty_weights():
        shapes = {name: t.shape for name, t in AutoModelForCausalLM.from_config(config).state_dict().items()}
    generator = torch.Generator().manual_seed(0)
    weight_map, shard, shard_bytes, files, total = {}, {}, 0, [], 0

    def flush() -> None:
        nonlocal shard, shard_bytes
        name = f"model-{len(files) + 1:05d}.safetensors"
        save_file(shard, str(folder / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
        files.append(name)
        shard, shard_bytes = {}, 0

    for name, size in shapes.items():
        if name.endswith("norm.weight"):
            value = torch.ones(size, dtype=torch.bfloat16)
        else:
            value = (torch.randn(size, generator=generator) * 0.02).to(torch.bfloat16)
        shard[name] = value
        shard_bytes += value.numel() * 2
        total += value.numel() * 2
        if shard_bytes >= SHARD_BYTES:
            flush()
    if shard:
        flush()
    count = len(files)  # rename to the -of-N form save_pretrained uses
    for i, name in enumerate(files, 1):
        final = f"model-{i:05d}-of-{count:05d}.safetensors"
        os.replace(folder / name, folder / final)
        weight_map = {k: (final if v == name else v) for k, v in weight_map.items()}
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    done.write_text(json.dumps({"bytes": total, "parameters": total // 2}))
    return folder


def launch(flags: list[str], log: Path) -> tuple[int, float]:
    """One `lrqat quantize` process, its output in `log`: exit code and the kernel's peak
    RSS of the process (MiB)."""
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "lrqat.cli", "quantize", *flags], stdout=out,
                                stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    return os.waitstatus_to_exitcode(status), usage.ru_maxrss / 1024


def run_cli(flags: list[str], log: Path) -> dict:
    """One `lrqat quantize` run that must succeed; its results and the process's peak RSS."""
    started = time.time()
    code, kernel_peak = launch(flags, log)
    if code != 0:
        raise SystemExit(f"lrqat quantize failed (see {log}): {' '.join(flags)}")
    output = Path(flags[flags.index("--output") + 1])
    result = json.loads((output / "results.json").read_text())
    # The kernel's peak is reset with each phase window (clear_refs), so the process peak
    # is the largest phase peak (or the last window's, if larger).
    peak = max([kernel_peak, *(p["peak_rss_mb"] for p in result.get("phases", {}).values())])
    return {"result": result, "peak_rss_mib": round(peak, 1),
            "wall_seconds": round(time.time() - started, 1), "flags": " ".join(flags)}


def big_variant(name: str, args: argparse.Namespace) -> dict:
    shape, phi = VARIANTS[name]
    folder = write_checkpoint(shape, Path(args.checkpoints) / f"llama2-{shape}-random")
    parameters = json.loads((folder / ".complete").read_text())["parameters"]
    out = Path(args.output) / name
    flags = big_flags(folder, out, "lrqat", phi)
    flags[flags.index("--steps") + 1] = str(args.steps)
    if out.exists():
        flags.append("--resume")
    code = code_version()
    run = run_cli(flags, Path(args.output) / f"{name}.log")
    train = run["result"]["train"]
    return {"shape": shape, "phi": phi, "parameters": parameters, "limit_gib": LIMITS_GIB[name], **run, "code": code,
            "estimate_gib": round(estimated_peak(folder, {**run["result"]["spec"], "export": ["compressed-tensors"]})
                                  / 2**30, 2),
            "phases": run["result"]["phases"], "bill_bytes": train["bill_bytes"],
            "train_tokens": train["tokens"], "result": None}


def big_flags(folder: Path, out: Path, method: str, phi: str | None) -> list[str]:
    """The `lrqat quantize` flags of a big variant: every method the same but for --method/--phi."""
    return ["--model", str(folder), "--load", "stream", "--dtype", "bf16", "--method", method,
            *(["--phi", phi] if phi else []), "--init", "minmax", "--bits", "4", "--seq-len", "1024",
            "--batch-size", "1", "--steps", "2", "--save-every", "0", "--eval-tokens", "1024",
            "--eval-context", "1024", "--export", "compressed-tensors", "--output", str(out)]


def other_method(name: str, args: argparse.Namespace) -> dict:
    """Full QAT or LoRA on the 7B shape at the same settings: what lrqat's memory check
    says before any weight is read (the one-line refusal, when it refuses), its bill,
    and the deepest model of that shape whose estimate fits the memory this machine has."""
    import dataclasses

    from lrqat.fit import available_bytes, estimate
    from lrqat.models import load_config
    from lrqat.spec import RunSpec

    shape, method = OTHER_METHODS[name]
    folder = write_checkpoint(shape, Path(args.checkpoints) / f"llama2-{shape}-random")
    flags = big_flags(folder, Path(args.output) / name, method, None)
    if method == "float-lora":  # a float reference: nothing to export
        flags = flags[:flags.index("--export")] + flags[flags.index("--export") + 2:]
    config = load_config(str(folder))
    spec = RunSpec(model=str(folder), method=method, load="stream", dtype="bf16",
                   train=dataclasses.replace(RunSpec().train, seq_len=1024, batch_size=1))
    found = estimate(config, spec)
    budget = available_bytes()
    code, lines = 0, []
    if budget is not None and found.peak > budget:  # the CLI's own refusal, before any weight is read
        log = Path(args.output) / f"{name}.log"
        code, _ = launch(flags, log)
        lines = [line for line in log.read_text().splitlines() if line.strip()]
    fitting, too_deep = 0, config.num_hidden_layers + 1  # the estimate grows with depth: bisect
    if budget is None or found.peak <= budget:
        fitting = config.num_hidden_layers
    while too_deep - fitting > 1:
        config.num_hidden_layers = (fitting + too_deep) // 2
        if estimate(config, spec).peak <= budget:
            fitting = config.num_hidden_layers
        else:
            too_deep = config.num_hidden_layers
    return {"method": method, "refused": code != 0, "message": lines[-1] if lines else "",
            "estimate_gib": round(found.peak / 2**30, 2), "bill": found.describe(),
            "budget_gib": round(budget / 2**30, 2) if budget else None, "deepest_fitting_layers": fitting,
            "layers": json.loads((folder / "config.json").read_text())["num_hidden_layers"], "flags": " ".join(flags)}


def estimated_peak(folder: Path, settings: dict) -> int:
    """What lrqat's memory check (`lrqat.fit`) predicted for the run, beside what it measured
    (`settings` as results.json records them, plus the run's exports)."""
    from lrqat.fit import estimate
    from lrqat.models import load_config
    from lrqat.spec import RunSpec

    return estimate(load_config(str(folder)), RunSpec.from_dict({**settings, "output": "unused"})).peak


def builtin_loads(args: argparse.Namespace) -> dict:
    """The built-in model loaded whole and streamed: same perplexities, setup memory."""
    rows = {}
    for load in ("memory", "stream"):
        out = Path(args.output) / f"builtin-{load}"
        flags = ["--load", load, "--steps", "2", "--batch-size", "2", "--seq-len", "256", "--eval-tokens", "2048",
                 "--save-every", "0", "--output", str(out)]
        if out.exists():
            flags.append("--resume")
        run = run_cli(flags, Path(args.output) / f"builtin-{load}.log")
        rows[load] = {"phases": run["result"]["phases"], "ppl": run["result"]["ppl"],
                      "peak_rss_mib": run["peak_rss_mib"], "flags": run["flags"]}
    return rows


def render(record: dict) -> str:
    lines = ["# Big models on small machines", "", f"Machine: {record['machine']}.", ""]
    built = record.get("builtin")
    if built:
        mem, stream = built["memory"], built["stream"]
        same = all(abs(stream["ppl"][k] - v) <= 1e-6 * v for k, v in mem["ppl"].items())
        lines += ["## The built-in model, loaded whole and streamed", "",
                  (f"`lrqat quantize {stream['flags']}` and the same with `--load memory` (LR-QAT W4, 2 steps). "
                  f"Perplexities {'identical' if same else 'DIFFERENT'} (float {mem['ppl']['float']:.3f}, "
                  f"RTN {mem['ppl']['rtn']:.3f}, merged {mem['ppl']['lrqat_merged']:.3f})."), "",
                  "| load | load phase peak MiB | setup phase peak MiB | train peak MiB | process peak MiB |",
                  "|---|---|---|---|---|"]
        for load in ("memory", "stream"):
            p = built[load]["phases"]
            lines.append(f"| {load} | {p['load']['peak_rss_mb']:.0f} | {p['setup']['peak_rss_mb']:.0f} | "
                         f"{p['train']['peak_rss_mb']:.0f} | {built[load]['peak_rss_mib']:.0f} |")
        lines.append("")
    big = record.get("variants", {})
    if big:
        lines += ["## Full-depth 7B and 13B shapes (random weights), streamed", "",
                  "| variant | parameters | process peak GiB | lrqat's estimate GiB | target GiB | " + " | ".join(
                      f"{p} s / GiB" for p in ("load", "setup", "train", "merge", "save", "export")) + " | static bill GiB |",
                  "|---|---|---|---|---|" + "---|" * 7]
        for name, v in big.items():
            cells = [f"{v['phases'][p]['seconds']:.0f} / {v['phases'][p]['peak_rss_mb'] / 1024:.1f}"
                     if p in v["phases"] else "–" for p in ("load", "setup", "train", "merge", "save", "export")]
            bill = v["bill_bytes"]["total"] / 2**30 if isinstance(v["bill_bytes"], dict) else v["bill_bytes"] / 2**30
            lines.append(f"| {name} | {v['parameters'] / 1e9:.2f} B | {v['peak_rss_mib'] / 1024:.1f} | "
                         f"{v['estimate_gib']:.1f} | ≤ {v['limit_gib']} | "
                         + " | ".join(cells) + f" | {bill:.1f} |")
        lines += ["", ("lrqat's estimate: `lrqat.fit.estimate` for the variant's settings and export, by the "
                       "current code (a run over the available memory is refused by it)."),
                  "", "Commands (`lrqat quantize` flags per variant):", "",
                  *[f"- {name}: `{v['flags']}` ({v['wall_seconds'] / 60:.1f} min, {v['train_tokens']} training tokens; "
                    f"code at {v.get('code', 'unknown')})" for name, v in big.items()]]
    others = record.get("other_methods", {})
    if others:
        lines += ["", "## Full QAT and LoRA on the 7B shape", "",
                  ("The same settings (streamed load, bf16, sequence 1,024, batch 1) with `--method` changed: "
                   "lrqat's memory check before any weight is read, and the deepest model of the 7B shape whose "
                   "estimate fits this machine's available memory."), "",
                  "| method | estimated peak GiB | available GiB | refused | deepest fitting depth | bill |",
                  "|---|---|---|---|---|---|"]
        for v in others.values():
            lines.append(f"| {v['method']} | {v['estimate_gib']:.1f} | {v['budget_gib']} | "
                         f"{'yes' if v['refused'] else 'no: fits (not run here)'} | {v['deepest_fitting_layers']} of {v['layers']} layers | "
                         f"{v['bill']} |")
        lines += ["", *[f"- {v['method']}: `{v['message']}`" for v in others.values() if v["refused"]]]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", default="builtin,7b-fixed8,7b-int,13b-int")
    parser.add_argument("--steps", type=int, default=2, help="LR-QAT steps of the big variants")
    parser.add_argument("--checkpoints", default="runs/big_models/checkpoints")
    parser.add_argument("--output", default="runs/big_models")
    args = parser.parse_args()
    Path(args.output).mkdir(parents=True, exist_ok=True)
    path = RESULTS / "big_models.json"
    record = json.loads(path.read_text()) if path.exists() else {"variants": {}}
    for name in args.variants.split(","):
        if name == "builtin":
            record["builtin"] = builtin_loads(args)
        elif name in OTHER_METHODS:
            record.setdefault("other_methods", {})[name] = other_method(name, args)
        else:
            record["variants"][name] = big_variant(name, args)
        record["machine"] = machine()
        write_results("big_models", record, render(record))


if __name__ == "__main__":
    main()
