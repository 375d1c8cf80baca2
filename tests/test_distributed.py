"""Two processes (torch.distributed on CPU, gloo) train what one process trains."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lrqat.export.native import load_quantized
from lrqat.export.tensors import quant_layers

CONFIGS = Path(__file__).parent.parent / "configs" / "accelerate"


def quantize_args(model_dir, text_file, out, batch_size):
    return ["quantize", "--model", str(model_dir), "--data", str(text_file), "--steps", "4", "--batch-size",
            str(batch_size), "--seq-len", "32", "--eval-context", "64", "--eval-tokens", "128", "--rank", "4",
            "--granularity", "g32", "--lr", "1e-2", "--warmup", "0", "--output", str(out)]


def losses(out):
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_two_process_ddp_matches_one_process_with_the_same_global_batch(tmp_path, tiny_model_dir, text_file):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single = subprocess.run([sys.executable, "-m", "lrqat.cli", *quantize_args(tiny_model_dir, text_file, tmp_path / "one", 4)],
                            capture_output=True, text=True, env=env, timeout=600, check=False)
    assert single.returncode == 0, single.stderr
    # the README's ready Accelerate config, as a user would launch it (CPU here: gloo)
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / "ddp.yaml"),
                "--main_process_port", "29517", "-m", "lrqat.cli"]
    double = subprocess.run([*launcher, *quantize_args(tiny_model_dir, text_file, tmp_path / "two", 2)],
                            capture_output=True, text=True, env=env, timeout=600, check=False)
    assert double.returncode == 0, double.stderr[-3000:]

    assert json.loads((tmp_path / "two" / "results.json").read_text())["processes"] == 2
    one_losses, two_losses = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert len(one_losses) == len(two_losses) == 4
    assert one_losses == pytest.approx(two_losses, rel=1e-4)

    one, two = load_quantized(tmp_path / "one" / "model"), load_quantized(tmp_path / "two" / "model")
    for (name, a), (_, b) in zip(quant_layers(one), quant_layers(two)):
        assert torch.equal(a.int_weight(), b.int_weight()), name
        assert torch.allclose(a.scales, b.scales, rtol=1e-5, atol=0), name
