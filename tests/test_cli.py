"""The CLI on bad input: a clear message, a non-zero exit, no traceback."""

import contextlib
import io
import json
import subprocess
import sys
import time

import pytest

from conftest import metrics_reached
from lrqat.cli import main


def run_cli(*args, cwd=None):
    """A real `lrqat` process: what a user's shell sees."""
    return subprocess.run([sys.executable, "-m", "lrqat.cli", *args], check=False, capture_output=True, text=True, cwd=cwd,
                          timeout=300)


def run_main(*args):
    """`lrqat` in this process (`cli.main`): its exit code, stdout and stderr as the real
    process would give them, without an interpreter and torch's import per refusal. An
    exception escaping `main` (the traceback a user would see) fails the test."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(args))
        except SystemExit as exit_:  # argparse's own refusals
            code = exit_.code
    return subprocess.CompletedProcess(list(args), code, out.getvalue(), err.getvalue())


def assert_clean_error(proc, *fragments):
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    for fragment in fragments:
        assert fragment in proc.stderr, proc.stderr


def test_unknown_model(tmp_path):
    proc = run_main("quantize", "--model", "no-such-model-xyz", "--output", str(tmp_path / "run"))
    assert_clean_error(proc, "unknown model 'no-such-model-xyz'", "smollm2-135m")


def test_missing_data_file(tmp_path):
    proc = run_main("quantize", "--data", str(tmp_path / "missing.txt"), "--output", str(tmp_path / "run"))
    assert_clean_error(proc, "missing.txt", "does not exist")


@pytest.mark.parametrize("bits", ["1", "9"])
def test_bits_out_of_range(tmp_path, bits):
    assert_clean_error(run_main("quantize", "--bits", bits, "--output", str(tmp_path)), f"bits={bits}", "2 to 8")


def test_rank_must_be_positive(tmp_path):
    assert_clean_error(run_main("quantize", "--rank", "0", "--output", str(tmp_path)), "rank=0", "positive")


def test_group_size_that_does_not_divide(tmp_path, tiny_model_dir, text_file):
    proc = run_main("quantize", "--model", str(tiny_model_dir), "--data", str(text_file), "--granularity", "group",
                   "--group-size", "48", "--eval-context", "64", "--eval-tokens", "128", "--output", str(tmp_path / "run"))
    assert_clean_error(proc, "group size 48 does not divide the input dimension 64")


def test_unknown_flag_and_bad_choice():
    assert_clean_error(run_cli("quantize", "--no-such-flag"), "unrecognized arguments")
    assert_clean_error(run_main("quantize", "--phi", "fp8"), "invalid choice")


def test_bad_recipe_key(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("quant:\n  bitz: 4\n")
    assert_clean_error(run_main("quantize", "--recipe", str(recipe)), "bitz")


def test_quantize_runs_end_to_end_on_a_tiny_model(tmp_path, tiny_model_dir, text_file):
    out = tmp_path / "run"
    args = ["quantize", "--model", str(tiny_model_dir), "--data", str(text_file), "--steps", "3",
            "--batch-size", "2", "--seq-len", "32", "--eval-context", "64", "--eval-tokens", "128", "--rank", "4",
            "--granularity", "g32", "--asymmetric", "--bits", "3", "--init", "minmax", "--output", str(out)]
    proc = run_cli(*args)
    assert proc.returncode == 0, proc.stderr
    results = json.loads((out / "results.json").read_text())
    assert set(results["ppl"]) == {"float", "rtn", "ptq", "lrqat", "lrqat_merged"}
    assert results["ppl"]["lrqat_merged"] == results["ppl"]["lrqat"]
    assert results["spec"]["quant"] == {"bits": 3, "symmetric": False, "group_size": 32}
    assert results["spec"]["ptq"] == {"init": "minmax", "act_order": True, "damp": 0.01, "calib_tokens": 16384,
                                      "gptq_inputs": "quantized", "gptq_baseline": False, "blockap_epochs": 2, "blockap_lr": 1e-5,
                                      "blockap_lr_scales": 1e-4}
    assert results["train"]["steps"] == 3 and results["train"]["tokens"] == 3 * 2 * 32
    assert results["context"] == 64 and results["eval_tokens"] == 2 * 63
    assert "| LR-QAT, merged integer model |" in (out / "report.md").read_text()
    assert (out / "model" / "model.safetensors").exists()

    again = run_cli(*args)
    assert_clean_error(again, "already holds a run", "--resume")
    resumed = run_cli(*args, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads((out / "results.json").read_text())["ppl"] == results["ppl"]


def test_killed_run_resumes_to_the_same_result(tmp_path, tiny_model_dir, text_file):
    """SIGKILL mid-training (no chance to clean up), then --resume: same model as a clean run."""
    common = ["quantize", "--model", str(tiny_model_dir), "--data", str(text_file), "--steps", "40", "--batch-size", "2",
              "--seq-len", "32", "--eval-context", "64", "--eval-tokens", "128", "--rank", "4", "--init", "minmax",
              "--save-every", "1", "--lr", "0.01"]
    clean = run_cli(*common, "--output", str(tmp_path / "clean"))
    assert clean.returncode == 0, clean.stderr

    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "lrqat.cli", *common, "--output", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and not metrics_reached(out, 5):
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    assert not (out / "results.json").exists(), "the run finished before it could be killed"
    resumed = run_cli(*common, "--output", str(out), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    clean_results = json.loads((tmp_path / "clean" / "results.json").read_text())
    resumed_results = json.loads((out / "results.json").read_text())
    assert resumed_results["ppl"] == pytest.approx(clean_results["ppl"], rel=1e-6)


def test_compare_runs_every_method_on_equal_terms(tmp_path, tiny_model_dir, text_file):
    out = tmp_path / "cmp"
    args = ("compare", "--methods", "rtn,gptq,peqa,naive-lora,qat,lrqat", "--model", str(tiny_model_dir),
            "--data", str(text_file), "--steps", "2", "--batch-size", "2", "--seq-len", "32",
            "--eval-context", "64", "--eval-tokens", "128", "--rank", "4", "--init", "minmax",
            "--calib-tokens", "128", "--output", str(out))
    proc = run_cli(*args)
    assert proc.returncode == 0, proc.stderr
    # A rerun of a finished comparison reuses every method's results instead of recomputing
    # them (a PTQ method keeps no checkpoint, so without this it would be redone).
    results = {m: (out / m / "results.json").stat().st_mtime_ns for m in ("rtn", "gptq", "lrqat")}
    again = run_cli(*args)
    assert again.returncode == 0, again.stderr
    assert again.stdout.count("reusing") == 6
    assert {m: (out / m / "results.json").stat().st_mtime_ns for m in results} == results
    summary = json.loads((out / "compare.json").read_text())
    methods = summary["methods"]
    assert list(methods) == ["rtn", "gptq", "peqa", "naive-lora", "qat", "lrqat"]
    assert methods["rtn"]["gap_recovered"] == 0.0 and methods["rtn"]["trainable_params"] == 0
    assert {methods[m]["train_tokens"] for m in ("peqa", "naive-lora", "qat", "lrqat")} == {2 * 2 * 32}
    assert methods["qat"]["trainable_params"] > methods["lrqat"]["trainable_params"] > methods["peqa"]["trainable_params"]
    assert "| LR-QAT |" in (out / "compare.md").read_text()
    assert (out / "compare.png").stat().st_size > 10_000


def test_compare_refuses_unknown_methods(tmp_path):
    assert_clean_error(run_main("compare", "--methods", "rtn,magic", "--output", str(tmp_path)), "magic")


def test_quantize_exports_and_generates(tmp_path, tiny_model_dir, text_file):
    out = tmp_path / "run"
    proc = run_cli("quantize", "--model", str(tiny_model_dir), "--data", str(text_file), "--steps", "2",
                   "--batch-size", "2", "--seq-len", "32", "--eval-context", "64", "--eval-tokens", "128", "--rank", "4",
                   "--bits", "4", "--granularity", "channel", "--output", str(out), "--export", "gguf,compressed-tensors")
    assert proc.returncode == 0, proc.stderr
    assert (out / "export" / "gguf" / "model.gguf").is_file()
    assert (out / "export" / "compressed-tensors" / "config.json").is_file()

    dequantized = run_cli("export", str(out), "--format", "hf-dequantized", "--output", str(tmp_path / "float"))
    assert dequantized.returncode == 0, dequantized.stderr
    report = json.loads(dequantized.stdout[dequantized.stdout.index("{"):])
    assert report["format"] == "hf-dequantized" and (tmp_path / "float" / "model.safetensors").is_file()

    generated = run_cli("generate", str(out), "--prompt", "The jury said", "--max-new-tokens", "5")
    assert generated.returncode == 0, generated.stderr
    assert generated.stdout.strip()


def test_export_refusals_are_clear(tmp_path, tiny_model_dir, text_file):
    out = tmp_path / "run"
    refused = run_main("quantize", "--model", str(tiny_model_dir), "--data", str(text_file), "--bits", "3",
                      "--output", str(out), "--export", "gguf")
    assert_clean_error(refused, "no lossless GGUF block type", "compressed-tensors")
    assert not out.exists()  # refused before any work
    assert_clean_error(run_main("export", str(tmp_path), "--format", "gguf"), "quantization.json")
    assert_clean_error(run_main("export", str(tmp_path), "--format", "onnx"), "unknown export format")


def test_token_budget_and_tensorboard_log(tmp_path, tiny_model_dir, text_file):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    proc = run_cli("quantize", "--model", str(tiny_model_dir), "--data", str(text_file), "--max-tokens", "300",
                   "--batch-size", "2", "--seq-len", "32", "--eval-context", "64", "--eval-tokens", "128", "--rank", "4",
                   "--granularity", "g32", "--output", str(out), "--tensorboard")
    assert proc.returncode == 0, proc.stderr
    results = json.loads((out / "results.json").read_text())
    assert results["train"]["steps"] == 5  # ceil(300 / (2 x 32))
    assert results["train"]["tokens"] == 5 * 64
    events = EventAccumulator(str(next((out / "tensorboard").rglob("events.out.tfevents.*")).parent))
    events.Reload()
    losses = [e.value for e in events.Scalars("loss")]
    metrics = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert losses == pytest.approx(metrics, rel=1e-6)


def test_streaming_run_from_a_folder(tmp_path, tiny_model_dir, text_file):
    folder = tmp_path / "corpus"
    folder.mkdir()
    paragraphs = text_file.read_text().split("\n\n")
    for i in range(0, len(paragraphs), 4):
        (folder / f"part{i:03d}.txt").write_text("\n\n".join(paragraphs[i : i + 4]))
    out = tmp_path / "run"
    proc = run_cli("quantize", "--model", str(tiny_model_dir), "--data", str(folder), "--streaming", "--steps", "3",
                   "--batch-size", "2", "--seq-len", "32", "--eval-context", "64", "--eval-tokens", "128", "--rank", "4",
                   "--granularity", "g32", "--output", str(out))
    assert proc.returncode == 0, proc.stderr
    results = json.loads((out / "results.json").read_text())
    assert results["spec"]["data"]["streaming"] is True
    assert results["train"]["tokens"] == 3 * 2 * 32
    assert results["ppl"]["lrqat_merged"] == results["ppl"]["lrqat"]
