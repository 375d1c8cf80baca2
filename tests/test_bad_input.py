"""Bad or unusual input, as a new user gives it: every case stops with exit 2 and one
stderr line (no traceback) that names the offending value or file, and changes no file
that existed before. Cases run the CLI in-process (`lrqat.cli.main`), so the many that
are refused before any model is loaded cost milliseconds."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from lrqat.cli import main

SMALL = ["--steps", "1", "--batch-size", "1", "--seq-len", "16", "--eval-context", "32", "--eval-tokens", "64",
         "--rank", "4", "--init", "minmax"]


@dataclass
class Ctx:
    """Paths a case may use: a tiny model, a text file, a finished run, a scratch folder."""

    model: Path
    text: Path
    run: Path
    tmp: Path

    def quantize(self, *flags: str, model: str | None = None) -> list[str]:
        return ["quantize", "--model", model or str(self.model), "--data", str(self.text), "--output",
                str(self.tmp / "out"), *SMALL, *flags]

    def fresh_model(self, **changes) -> str:
        """A random model like the tiny one with `changes` to its config, saved with its tokenizer."""
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        config = AutoConfig.from_pretrained(self.model)
        for key, value in changes.items():
            setattr(config, key, value)
        from safetensors.torch import save_file

        dest = self.tmp / "fresh-model"
        dest.mkdir()
        config.save_pretrained(dest)  # weights written directly: save_pretrained draws a progress bar
        save_file({k: v.contiguous() for k, v in AutoModelForCausalLM.from_config(config).state_dict().items()
                   if k != "lm_head.weight"}, str(dest / "model.safetensors"), metadata={"format": "pt"})
        AutoTokenizer.from_pretrained(self.model).save_pretrained(dest)
        return str(dest)

    def write(self, name: str, content: str | bytes) -> str:
        path = self.tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)
        return str(path)

    def recipe(self, yaml_text: str) -> list[str]:
        return ["quantize", "--recipe", self.write("recipe.yaml", yaml_text), "--output", str(self.tmp / "out")]

    def copy_model(self, drop: str | None = None, corrupt: str | None = None, extra: dict | None = None) -> str:
        """A copy of the merged model of the finished run (or of the float model when
        `extra` edits its config), with one file dropped or corrupted."""
        import shutil

        source = self.model if extra is not None else self.run / "model"
        dest = self.tmp / "model-copy"
        shutil.copytree(source, dest)
        if drop:
            (dest / drop).unlink()
        if corrupt:
            (dest / corrupt).write_bytes(b"\x00garbage" * 8)
        if extra:
            config = json.loads((dest / "config.json").read_text())
            config.update(extra)
            (dest / "config.json").write_text(json.dumps(config))
        return str(dest)


@pytest.fixture(scope="module")
def finished_run(tiny_model_dir, text_file, tmp_path_factory):
    """A finished 2-step LR-QAT run of the tiny model (W4 per channel: GGUF-exportable)."""
    out = tmp_path_factory.mktemp("bad-input") / "run"
    assert main(["quantize", "--model", str(tiny_model_dir), "--data", str(text_file), "--output", str(out),
                 "--steps", "2", "--batch-size", "2", "--seq-len", "32", "--eval-context", "64", "--eval-tokens", "128",
                 "--rank", "4", "--init", "minmax"]) == 0
    return out


@pytest.fixture(scope="module")
def w3_run(tiny_model_dir, text_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("bad-input-w3") / "run"
    assert main(["quantize", "--model", str(tiny_model_dir), "--data", str(text_file), "--output", str(out),
                 "--method", "rtn", "--bits", "3", "--granularity", "g32", "--eval-context", "64", "--eval-tokens", "128",
                 "--init", "minmax"]) == 0
    return out


Case = tuple[str, Callable[[Ctx], list[str]], str]

CASES: list[Case] = [
    # --- quantize: settings, refused before the model is loaded ---
    ("bits-low", lambda c: c.quantize("--bits", "1"), "bits=1"),
    ("bits-high", lambda c: c.quantize("--bits", "9"), "bits=9"),
    ("bits-not-a-number", lambda c: c.quantize("--bits", "four"), "'four'"),
    ("rank-zero", lambda c: c.quantize("--rank", "0"), "rank=0"),
    ("rank-negative", lambda c: c.quantize("--rank", "-3"), "rank=-3"),
    ("alpha-zero", lambda c: c.quantize("--alpha", "0"), "alpha=0"),
    ("alpha-nan", lambda c: c.quantize("--alpha", "nan"), "alpha=nan"),
    ("alpha-inf", lambda c: c.quantize("--alpha", "inf"), "alpha=inf"),
    ("lr-nan", lambda c: c.quantize("--lr", "nan"), "lr=nan"),
    ("lr-inf", lambda c: c.quantize("--lr", "inf"), "lr=inf"),
    ("lr-negative", lambda c: c.quantize("--lr", "-1"), "lr=-1.0"),
    ("lr-scales-nan", lambda c: c.quantize("--lr-scales", "nan"), "lr-scales=nan"),
    ("lr-scales-negative", lambda c: c.quantize("--lr-scales", "-0.1"), "lr-scales=-0.1"),
    ("warmup-one", lambda c: c.quantize("--warmup", "1.5"), "warmup=1.5"),
    ("warmup-nan", lambda c: c.quantize("--warmup", "nan"), "warmup=nan"),
    ("clip-negative", lambda c: c.quantize("--clip", "-1"), "clip=-1"),
    ("clip-nan", lambda c: c.quantize("--clip", "nan"), "clip=nan"),
    ("steps-zero", lambda c: c.quantize("--steps", "0"), "steps=0"),
    ("batch-size-zero", lambda c: c.quantize("--batch-size", "0"), "batch-size=0"),
    ("seq-len-one", lambda c: c.quantize("--seq-len", "1"), "seq-len=1"),
    ("grad-accum-zero", lambda c: c.quantize("--grad-accum", "0"), "grad-accum=0"),
    ("eval-context-one", lambda c: c.quantize("--eval-context", "1"), "eval context 1"),
    ("act-bits-not-offered", lambda c: c.quantize("--act-bits", "6"), "--act-bits 6"),
    ("kv-bits-not-offered", lambda c: c.quantize("--kv-bits", "2"), "--kv-bits 2"),
    ("rotate-unknown", lambda c: c.quantize("--rotate", "givens"), "'givens'"),
    ("rotate-odd-head-dim", lambda c: c.quantize("--rotate", "hadamard", model=c.fresh_model(
        hidden_size=24, intermediate_size=48, head_dim=6)), "head dimension 6"),
    ("export-a8-to-gguf", lambda c: c.quantize("--act-bits", "8", "--export", "gguf"), "--act-bits 16"),
    ("export-rotated-kv4", lambda c: c.quantize("--rotate", "hadamard", "--kv-bits", "4", "--export",
                                                 "compressed-tensors"), "R3"),
    ("recipe-act-bits-string", lambda c: c.recipe("act:\n  bits: eight\n"), "act.bits"),
    ("eval-tokens-below-context", lambda c: c.quantize("--eval-tokens", "10"), "eval tokens 10"),
    ("eval-every-negative", lambda c: c.quantize("--eval-every", "-1"), "eval-every=-1"),
    ("save-every-negative", lambda c: c.quantize("--save-every", "-2"), "save-every=-2"),
    ("max-tokens-zero", lambda c: c.quantize("--max-tokens", "0"), "max-tokens=0"),
    ("granularity-unknown", lambda c: c.quantize("--granularity", "rows"), "'rows'"),
    ("granularity-channel-with-group-size", lambda c: c.quantize("--granularity", "channel", "--group-size", "64"),
     "--group-size"),
    ("group-size-zero", lambda c: c.quantize("--group-size", "0"), "group size 0"),
    ("phi-unknown", lambda c: c.quantize("--phi", "fp8"), "'fp8'"),
    ("init-unknown", lambda c: c.quantize("--init", "mse"), "'mse'"),
    ("schedule-unknown", lambda c: c.quantize("--schedule", "step"), "'step'"),
    ("dtype-unknown", lambda c: c.quantize("--dtype", "fp8"), "'fp8'"),
    ("method-unknown", lambda c: c.quantize("--method", "awq"), "'awq'"),
    ("targets-bad-regex", lambda c: c.quantize("--targets", "(q_proj"), "(q_proj"),
    ("damp-too-large", lambda c: c.quantize("--damp", "1.5"), "1.5"),
    ("calib-tokens-zero", lambda c: c.quantize("--calib-tokens", "0"), "calib-tokens=0"),
    ("export-unknown", lambda c: c.quantize("--export", "onnx"), "onnx"),
    ("export-gguf-w3", lambda c: c.quantize("--bits", "3", "--export", "gguf"), "no lossless GGUF block type"),
    ("flag-unknown", lambda c: c.quantize("--no-such-flag"), "--no-such-flag"),
    # --- quantize: data ---
    ("data-missing", lambda c: c.quantize("--data", str(c.tmp / "missing.txt")), "missing.txt"),
    ("data-wrong-suffix", lambda c: c.quantize("--data", c.write("corpus.csv", "a,b\n")), "corpus.csv"),
    ("data-empty-folder", lambda c: c.quantize("--data", str(c.tmp / "empty-dir")), "empty-dir"),
    ("data-not-utf8-txt", lambda c: c.quantize("--data", c.write("latin1.txt", "caf\xe9 ".encode("latin-1") * 400)),
     "latin1.txt"),
    ("data-not-utf8-jsonl", lambda c: c.quantize("--data", c.write("bad.jsonl", b'{"text": "ok"}\n{"text": "\xff"}\n')),
     "bad.jsonl:2"),
    ("data-jsonl-number", lambda c: c.quantize("--data", c.write("num.jsonl", '{"text": "fine"}\n{"text": 3}\n')),
     "num.jsonl:2"),
    ("data-jsonl-null", lambda c: c.quantize("--data", c.write("null.jsonl", '{"text": null}\n')), "null.jsonl:1"),
    ("data-jsonl-not-json", lambda c: c.quantize("--data", c.write("broken.jsonl", "{text: nope\n")), "broken.jsonl:1"),
    ("data-jsonl-no-text", lambda c: c.quantize("--data", c.write("notext.jsonl", '{"body": "x"}\n')), "notext.jsonl:1"),
    ("data-hf-missing", lambda c: c.quantize("--data", f"hf:{c.tmp / 'no-dataset'}"), "no-dataset"),
    # --- quantize: model ---
    ("model-unknown", lambda c: [*c.quantize(), "--model", "no-such-model-xyz"], "no-such-model-xyz"),
    ("model-is-a-file", lambda c: [*c.quantize(), "--model", c.write("weights.bin", b"\x00")], "weights.bin"),
    ("model-folder-without-config", lambda c: [*c.quantize(), "--model", str(c.tmp / "empty-dir")], "config.json"),
    ("model-remote-code", lambda c: [*c.quantize(), "--model", c.copy_model(extra={"auto_map": {"AutoConfig": "x.Y"}})],
     "own modelling code"),
    ("model-no-weights", lambda c: [*c.quantize(), "--model", c.copy_model(drop="model.safetensors", extra={})],
     "weights cannot be loaded"),
    ("model-garbage-weights", lambda c: [*c.quantize(), "--model", c.copy_model(corrupt="model.safetensors", extra={})],
     "weights cannot be loaded"),
    ("model-no-tokenizer", lambda c: [*c.quantize(), "--model", c.copy_model(drop="tokenizer.json", extra={})],
     "tokenizer"),
    ("seq-len-beyond-positions", lambda c: c.quantize("--seq-len", "4096"), "--seq-len 4096"),
    ("eval-context-beyond-positions", lambda c: c.quantize("--eval-context", "1024", "--eval-tokens", "2048"),
     "--eval-context 1024"),
    ("rank-wider-than-a-layer", lambda c: c.quantize("--rank", "100"), "--rank 100"),
    ("group-size-not-dividing", lambda c: c.quantize("--granularity", "g48"), "group size 48"),
    # --- quantize: the output folder ---
    ("output-is-a-file", lambda c: [*c.quantize(), "--output", c.write("a-file", "x")], "a-file"),
    ("output-holds-a-run", lambda c: [*c.quantize(), "--output", str(c.run)], "already holds a run"),
    ("resume-other-settings", lambda c: [*c.quantize("--bits", "3"), "--output", str(c.run), "--resume"],
     "other settings"),
    # --- recipes ---
    ("recipe-missing", lambda c: ["quantize", "--recipe", str(c.tmp / "nope.yaml")], "nope.yaml"),
    ("recipe-not-yaml", lambda c: c.recipe("quant: [unclosed\n"), "not valid YAML"),
    ("recipe-scalar", lambda c: c.recipe("just a string\n"), "mapping"),
    ("recipe-unknown-key", lambda c: c.recipe("trian: {}\n"), "'trian'"),
    ("recipe-unknown-section-key", lambda c: c.recipe("quant:\n  bitz: 4\n"), "bitz"),
    ("recipe-moved-key", lambda c: c.recipe("quant:\n  init: lp\n"), "now under ptq"),
    ("recipe-alpha-string", lambda c: c.recipe("lrqat:\n  alpha: x\n"), "lrqat.alpha = 'x'"),
    ("recipe-lr-string", lambda c: c.recipe("train:\n  lr: fast\n"), "train.lr = 'fast'"),
    ("recipe-section-scalar", lambda c: c.recipe("train: 3\n"), "'train'"),
    ("recipe-section-list", lambda c: c.recipe("data: [1, 2]\n"), "'data'"),
    ("recipe-eval-context-string", lambda c: c.recipe("data:\n  eval_context: 1k\n"), "data.eval_context = '1k'"),
    ("recipe-betas-scalar", lambda c: c.recipe("train:\n  betas: 0.9\n"), "train.betas = 0.9"),
    ("recipe-eval-every-string", lambda c: c.recipe("train:\n  eval_every: '10'\n"), "train.eval_every = '10'"),
    ("recipe-model-number", lambda c: c.recipe("model: 3\n"), "model = 3"),
    ("recipe-damp-string", lambda c: c.recipe("ptq:\n  damp: a\n"), "ptq.damp = 'a'"),
    ("recipe-bits-float", lambda c: c.recipe("quant:\n  bits: 4.5\n"), "quant.bits = 4.5"),
    ("recipe-symmetric-string", lambda c: c.recipe("quant:\n  symmetric: 'yes'\n"), "quant.symmetric = 'yes'"),
    ("recipe-export-string", lambda c: c.recipe("export: gguf\n"), "export = 'gguf'"),
    # --- compare ---
    ("compare-unknown-method", lambda c: ["compare", "--methods", "rtn,magic", "--output", str(c.tmp / "cmp")], "magic"),
    ("compare-no-method", lambda c: ["compare", "--methods", ",", "--output", str(c.tmp / "cmp")], "(none)"),
    ("compare-bad-bits", lambda c: ["compare", "--bits", "1", "--output", str(c.tmp / "cmp")], "bits=1"),
    ("compare-nan-lr", lambda c: ["compare", "--lr", "nan", "--output", str(c.tmp / "cmp")], "lr=nan"),
    # --- export ---
    ("export-run-missing", lambda c: ["export", str(c.tmp / "no-run"), "--format", "gguf"], "no-run"),
    ("export-not-a-run", lambda c: ["export", str(c.tmp), "--format", "gguf"], "quantization.json"),
    ("export-format-unknown", lambda c: ["export", str(c.run), "--format", "onnx"], "onnx"),
    ("export-two-formats-one-output", lambda c: ["export", str(c.run), "--format", "gguf,compressed-tensors",
                                                 "--output", str(c.tmp / "x")], "one destination"),
    ("export-into-the-run", lambda c: ["export", str(c.run), "--format", "compressed-tensors", "--output", str(c.run)],
     "holds the merged model"),
    ("export-into-the-model", lambda c: ["export", str(c.run), "--format", "hf-dequantized", "--output",
                                         str(c.run / "model")], "holds the merged model"),
    ("export-into-the-parent", lambda c: ["export", str(c.run), "--format", "compressed-tensors", "--output",
                                          str(c.run.parent)], "holds the merged model"),
    ("export-into-home", lambda c: ["export", str(c.run), "--format", "hf-dequantized", "--output", str(Path.home())],
     "home"),
    ("export-into-a-folder-with-files", lambda c: ["export", str(c.run), "--format", "compressed-tensors", "--output",
                                                   str(Path(c.write("mine/notes.txt", "keep me")).parent)],
     "not an earlier lrqat compressed-tensors export"),
    ("export-over-a-foreign-gguf", lambda c: ["export", str(c.run), "--format", "gguf", "--output",
                                              c.write("other.gguf", b"GGUF not ours")], "other.gguf"),
    ("export-into-another-run", lambda c: ["export", str(c.run), "--format", "compressed-tensors", "--output",
                                           str(Path(c.write("other-run/results.json", "{}")).parent)],
     "run or merged model folder"),
    ("export-damaged-quantization-json", lambda c: ["export", str(Path(c.copy_model(corrupt="quantization.json"))),
                                                    "--format", "compressed-tensors"], "quantization.json"),
    ("export-missing-weights", lambda c: ["export", c.copy_model(drop="model.safetensors"), "--format",
                                          "compressed-tensors", "--output", str(c.tmp / "ct")], "model.safetensors"),
    ("export-garbage-weights", lambda c: ["export", c.copy_model(corrupt="model.safetensors"), "--format",
                                          "compressed-tensors", "--output", str(c.tmp / "ct")], "model.safetensors"),
    ("export-no-tokenizer", lambda c: ["export", c.copy_model(drop="tokenizer.json"), "--format", "compressed-tensors",
                                       "--output", str(c.tmp / "ct")], "tokenizer"),
    # --- generate ---
    ("generate-empty-prompt", lambda c: ["generate", str(c.run), "--prompt", "  "], "prompt is empty"),
    ("generate-zero-tokens", lambda c: ["generate", str(c.run), "--prompt", "Hi", "--max-new-tokens", "0"],
     "--max-new-tokens 0"),
    ("generate-negative-tokens", lambda c: ["generate", str(c.run), "--prompt", "Hi", "--max-new-tokens", "-5"],
     "--max-new-tokens -5"),
    ("generate-negative-temperature", lambda c: ["generate", str(c.run), "--prompt", "Hi", "--temperature", "-1"],
     "--temperature -1"),
    ("generate-not-a-run", lambda c: ["generate", str(c.tmp), "--prompt", "Hi"], "quantization.json"),
]


def is_progress_bar(line: str) -> bool:
    """transformers' weight-loading bar (a model that loads fine before a later refusal)."""
    return line.startswith("Loading weights") and "it/s]" in line


def checksums(*roots: Path) -> dict[str, str]:
    out = {}
    for root in roots:
        for path in sorted(root.rglob("*")):
            if path.is_file():
                out[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def test_there_are_at_least_eighty_kinds_of_bad_input():
    assert len(CASES) >= 80
    assert len({name for name, _, _ in CASES}) == len(CASES)


@pytest.mark.parametrize(("name", "argv", "fragment"), CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_clear_line_and_changes_nothing(name, argv, fragment, tmp_path, capsys, monkeypatch,
                                                         tiny_model_dir, text_file, finished_run):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # an unknown name is refused at once, not after the hub's retries
    (tmp_path / "empty-dir").mkdir()
    ctx = Ctx(model=tiny_model_dir, text=text_file, run=finished_run, tmp=tmp_path)
    args = argv(ctx)
    before = checksums(tmp_path, finished_run)
    try:
        code = main(args)
    except SystemExit as stop:  # argparse refuses a flag by exiting
        code = stop.code
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip() and not is_progress_bar(line)]
    assert code == 2, err
    assert "Traceback" not in err
    assert len(lines) == 1, err
    assert fragment in lines[0], err
    after = checksums(tmp_path, finished_run)
    assert {path: after.get(path) for path in before} == before, "a refused command changed or removed existing files"


def test_a_w3_model_is_refused_by_the_gguf_export_before_loading(w3_run, capsys):
    assert main(["export", str(w3_run), "--format", "gguf"]) == 2
    assert "no lossless GGUF block type" in capsys.readouterr().err
    assert not (w3_run / "export").exists()
