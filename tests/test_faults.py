"""Faults during runs and exports: nothing lost, a run that can always be resumed."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace

import pytest
import torch

from conftest import metrics_reached, tiny_llama
from lrqat.blocks import PackedBlocks
from lrqat.checkpoint import CHECKPOINT_NAME, PREVIOUS_NAME, TrainState, atomic_write_text
from lrqat.cli import main
from lrqat.errors import LrqatError
from lrqat.methods import apply_lrqat
from lrqat.spec import LRQATSpec, QuantSpec, TrainSpec
from lrqat.trainer import train

FINGERPRINT = {"test": "faults"}


def fresh_model():
    return apply_lrqat(tiny_llama(), QuantSpec(bits=4, group_size=16), LRQATSpec(rank=4), seed=0, init="minmax")


def blocks():
    return torch.randint(0, 128, (20, 16), generator=torch.Generator().manual_seed(1))


def metric_steps(folder):
    return [json.loads(line)["step"] for line in (folder / "metrics.jsonl").read_text().splitlines()]


def quantize_args(model, text, out, *flags):
    return [sys.executable, "-m", "lrqat.cli", "quantize", "--model", str(model), "--data", str(text),
            "--output", str(out), "--steps", "30", "--batch-size", "2", "--seq-len", "32", "--eval-context", "64",
            "--eval-tokens", "128", "--rank", "4", "--init", "minmax", *flags]


# --- divergence ------------------------------------------------------------------

def test_a_diverging_run_stops_naming_the_layer_and_resumes_at_a_lower_rate(tmp_path):
    """Absurd learning rates: the run stops at the first non-finite loss or gradient with
    the step and the first tensor that went non-finite, keeps a checkpoint whose state
    trained finitely, and resumes from it once the rates are lowered."""
    wild = TrainSpec(steps=12, batch_size=2, seq_len=16, lr=1e30, lr_scales=1e30, warmup=0.0, save_every=1)
    with pytest.raises(LrqatError, match=r"diverged at step (\d+).*first non-finite: .*model\.layers\.\d+\..*(A|B|s|loss)"
                       ) as stopped:
        train(fresh_model(), PackedBlocks(blocks()), blocks()[:1], wild, tmp_path, FINGERPRINT)
    message = str(stopped.value)
    assert "--resume" in message and "\n" not in message
    diverged_at = int(message.split("diverged at step ")[1].split(":")[0])
    steps = metric_steps(tmp_path)
    assert steps == list(range(1, diverged_at))  # nothing logged for the step that diverged
    kept = TrainState.peek_step(tmp_path / CHECKPOINT_NAME) if (tmp_path / CHECKPOINT_NAME).exists() else 0
    assert kept < diverged_at - 1  # never the state that produced the non-finite loss
    assert f"step {kept}" in message or (kept == 0 and "from step 0" in message)

    calm = TrainSpec(steps=12, batch_size=2, seq_len=16, lr=1e-2, lr_scales=1e-4, warmup=0.0, save_every=1)
    result = train(fresh_model(), PackedBlocks(blocks()), blocks()[:1], calm, tmp_path, FINGERPRINT, resume=True)
    assert result.steps == 12 and all(map(torch.isfinite, map(torch.tensor, result.losses)))
    assert metric_steps(tmp_path) == list(range(1, 13))  # no duplicate steps


def test_results_json_never_holds_nan(tmp_path):
    from lrqat.rundir import RunResult

    result = RunResult(model="m", data="d", method="lrqat", spec={}, eval_tokens=1, context=2,
                       ppl={"float": 1.0, "rtn": float("nan"), "ptq": 2.0, "lrqat": float("inf"), "lrqat_merged": 3.0},
                       merged_vs_training_rel_diff=0.0, rtn_tie_differences=0, trainable_params=1, processes=1,
                       sharding="none", distributed="NO", train={"final_loss": float("nan")}, model_dir="x")
    parsed = json.loads(result.to_json())  # strict JSON: Python's parser would also accept bare NaN
    assert parsed["ppl"]["rtn"] is None and parsed["ppl"]["lrqat"] is None and parsed["train"]["final_loss"] is None
    assert "NaN" not in result.to_json() and "Infinity" not in result.to_json()


# --- resume robustness -----------------------------------------------------------

SPEC = TrainSpec(steps=6, batch_size=2, seq_len=16, lr=1e-2, lr_scales=1e-4, warmup=0.0, save_every=2)


def test_a_torn_metrics_line_does_not_block_resume(tmp_path):
    short = replace(SPEC, steps=4)
    train(fresh_model(), PackedBlocks(blocks()), blocks()[:1], short, tmp_path, FINGERPRINT)
    with (tmp_path / "metrics.jsonl").open("a") as handle:
        handle.write('{"step": 5, "loss": 3.1')  # the run was killed mid-write
    train(fresh_model(), PackedBlocks(blocks()), blocks()[:1], SPEC, tmp_path, FINGERPRINT, resume=True)
    assert metric_steps(tmp_path) == list(range(1, 7))


def test_resume_without_a_checkpoint_says_so_and_starts_clean(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in (1, 2, 3)))
    (tmp_path / ".checkpoint.pt.abc123").write_bytes(b"")  # left by a checkpoint write that was killed
    said = []
    train(fresh_model(), PackedBlocks(blocks()), blocks()[:1], SPEC, tmp_path, FINGERPRINT, resume=True, log=said.append)
    assert said == [f"no checkpoint in {tmp_path}: training starts from step 0"]
    assert metric_steps(tmp_path) == list(range(1, 7))  # the stale lines are gone, not duplicated
    assert not (tmp_path / ".checkpoint.pt.abc123").exists()


def test_a_kill_between_the_checkpoint_renames_resumes_from_the_newest(tmp_path):
    train(fresh_model(), PackedBlocks(blocks()), blocks()[:1], SPEC, tmp_path, FINGERPRINT)
    assert TrainState.peek_step(tmp_path / PREVIOUS_NAME) == 4
    os.replace(tmp_path / CHECKPOINT_NAME, tmp_path / "checkpoint.next.pt")  # as if killed between the renames
    os.replace(tmp_path / PREVIOUS_NAME, tmp_path / CHECKPOINT_NAME)
    result = train(fresh_model(), PackedBlocks(blocks()), blocks()[:1], SPEC, tmp_path, FINGERPRINT, resume=True)
    assert result.steps == 6 and TrainState.peek_step(tmp_path / CHECKPOINT_NAME) == 6


def test_a_resumed_run_reports_the_peak_memory_of_all_its_processes(tmp_path):
    """The process that trained the first steps peaked higher (here: a planted 1e7 MB)
    than the one that finishes: the run's peak is the higher one, not the last process's.
    A checkpoint written before the peak was kept resumes, reporting this process's peak."""
    from lrqat.checkpoint import load_checkpoint, save_checkpoint

    train(fresh_model(), PackedBlocks(blocks()), blocks()[:1], replace(SPEC, steps=4), tmp_path, FINGERPRINT)
    state = load_checkpoint(tmp_path / CHECKPOINT_NAME)
    assert 0 < state["peak_rss_mb"] < 1e7
    save_checkpoint(tmp_path / CHECKPOINT_NAME, {**state, "peak_rss_mb": 1e7})
    result = train(fresh_model(), PackedBlocks(blocks()), blocks()[:1], SPEC, tmp_path, FINGERPRINT, resume=True)
    assert result.steps == 6 and result.peak_rss_mb == 1e7

    older = tmp_path / "older"
    train(fresh_model(), PackedBlocks(blocks()), blocks()[:1], replace(SPEC, steps=4), older, FINGERPRINT)
    state = load_checkpoint(older / CHECKPOINT_NAME)
    del state["peak_rss_mb"]
    save_checkpoint(older / CHECKPOINT_NAME, state)
    result = train(fresh_model(), PackedBlocks(blocks()), blocks()[:1], SPEC, older, FINGERPRINT, resume=True)
    assert result.steps == 6 and 0 < result.peak_rss_mb < 1e7


@pytest.mark.parametrize("how", ["sigterm", "sigkill"])
def test_a_signalled_run_resumes_without_duplicate_metrics(tmp_path, tiny_model_dir, text_file, how):
    """SIGTERM (schedulers, `kill`) checkpoints and exits with one line; SIGKILL before
    the first checkpoint loses those steps but the rerun logs each step once."""
    out = tmp_path / "run"
    args = quantize_args(tiny_model_dir, text_file, out, "--save-every", "100")
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while time.time() < deadline and not metrics_reached(out, 3):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM if how == "sigterm" else signal.SIGKILL)
    _, err = proc.communicate(timeout=120)
    assert not (out / "results.json").exists(), "the run finished before it was signalled"
    if how == "sigterm":
        assert proc.returncode == 2, err
        assert "terminated (SIGTERM)" in err and "Traceback" not in err
        assert TrainState.peek_step(out / CHECKPOINT_NAME) >= 3
    else:
        assert not (out / CHECKPOINT_NAME).exists()
    resumed = subprocess.run([*args, "--resume"], capture_output=True, text=True, check=False, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert metric_steps(out) == list(range(1, 31))
    if how == "sigkill":
        assert "training starts from step 0" in resumed.stdout


def test_a_full_disk_is_one_clear_line(tmp_path, monkeypatch):
    def no_space(_fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(LrqatError, match=r"no space left on the device to write .*results.json \(.* MB free"):
        atomic_write_text(tmp_path / "results.json", "{}")
    assert list(tmp_path.iterdir()) == []  # no temporary file left behind


def test_written_files_get_the_usual_permissions(tmp_path):
    mask = os.umask(0o022)
    os.umask(mask)
    atomic_write_text(tmp_path / "report.md", "# hi")
    from lrqat.checkpoint import FILE_MODE

    assert (tmp_path / "report.md").stat().st_mode & 0o777 == FILE_MODE == 0o666 & ~mask


# --- exports ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def merged_run(tiny_model_dir, text_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("faults") / "run"
    assert main(["quantize", "--model", str(tiny_model_dir), "--data", str(text_file), "--output", str(out), "--method",
                 "rtn", "--eval-context", "64", "--eval-tokens", "128", "--init", "minmax"]) == 0
    return out


def folder_files(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def test_exporting_again_replaces_the_earlier_export_and_leaves_no_staging(merged_run):
    from lrqat.export.formats import export

    first = export(merged_run, "compressed-tensors")
    second = export(merged_run, "compressed-tensors")
    assert first["path"] == second["path"]
    parent = merged_run / "export"
    assert sorted(p.name for p in parent.iterdir()) == ["compressed-tensors"]  # no .partial or .old folders
    assert (parent / "compressed-tensors" / "model.safetensors").is_file()


def test_export_into_a_foreign_folder_needs_force_and_into_the_run_never(merged_run, tmp_path):
    from lrqat.export.formats import export

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(LrqatError, match="--force"):
        export(merged_run, "hf-dequantized", mine)
    assert (mine / "notes.txt").read_text() == "keep me"
    before = folder_files(merged_run)
    for target in (merged_run, merged_run.parent, merged_run / "model"):
        with pytest.raises(LrqatError, match="holds the merged model"):
            export(merged_run, "hf-dequantized", target, force=True)
    assert folder_files(merged_run) == before
    report = export(merged_run, "hf-dequantized", mine, force=True)
    assert report["path"] == str(mine) and not (mine / "notes.txt").exists()
    assert (mine / "model.safetensors").is_file()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert export(merged_run, "hf-dequantized", empty)["path"] == str(empty)  # an empty folder loses nothing


def test_gguf_names_the_model_not_a_local_path(merged_run, tiny_model_dir, tmp_path):
    from lrqat.export.formats import export
    from lrqat.export.gguf_read import FastGGUFReader

    path = export(merged_run, "gguf", tmp_path / "tiny.gguf")["path"]
    reader = FastGGUFReader(path)
    field = reader.fields["general.name"]
    name = bytes(field.parts[field.data[0]]).decode()
    assert name == tiny_model_dir.name and "/" not in name
    assert export(merged_run, "gguf", tmp_path / "tiny.gguf")["path"] == path  # our own GGUF may be replaced


def test_the_cli_resumes_a_diverged_run_at_lower_rates(tmp_path, tiny_model_dir, text_file, capsys):
    """The user's path: `--lr` far too high stops with one line; the same command with lower
    rates and `--resume` finishes the run from the kept checkpoint (rates may change on resume,
    nothing else may)."""
    common = ["quantize", "--model", str(tiny_model_dir), "--data", str(text_file), "--output", str(tmp_path / "run"),
              "--steps", "8", "--batch-size", "2", "--seq-len", "32", "--eval-context", "64", "--eval-tokens", "128",
              "--rank", "4", "--init", "minmax", "--warmup", "0", "--save-every", "1"]
    assert main([*common, "--lr", "1e30", "--lr-scales", "1e30"]) == 2
    err = capsys.readouterr().err
    assert "training diverged at step" in err and "--resume" in err and "Traceback" not in err
    assert not (tmp_path / "run" / "results.json").exists()
    assert main([*common, "--lr", "1e-2", "--lr-scales", "1e-4", "--resume"]) == 0
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["train"]["steps"] == 8 and results["spec"]["train"]["lr"] == 1e-2
    assert metric_steps(tmp_path / "run") == list(range(1, 9))
    assert main([*common, "--bits", "3", "--lr", "1e-2", "--resume"]) == 2  # other settings: still refused
    assert "other settings" in capsys.readouterr().err
