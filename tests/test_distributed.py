"""Two processes (torch.distributed on CPU, gloo) train what one process trains."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import metrics_reached
from lrqat.export.native import load_quantized
from lrqat.export.tensors import quant_layers

CONFIGS = Path(__file__).parent.parent / "configs" / "accelerate"


def quantize_args(model_dir, text_file, out, batch_size, steps=4):
    return ["quantize", "--model", str(model_dir), "--data", str(text_file), "--steps", str(steps), "--batch-size",
            str(batch_size), "--seq-len", "32", "--eval-context", "64", "--eval-tokens", "128", "--rank", "4",
            "--granularity", "g32", "--lr", "1e-2", "--warmup", "0", "--output", str(out)]


def losses(out):
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def run_cli(args, launcher=(), timeout=600):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([*launcher, *args], capture_output=True, text=True, env=env, timeout=timeout, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def process_tree(pid):
    """`pid` and all its descendants (Linux). torch's launcher starts each worker in a new
    session, so killing the launcher's process group would leave the workers running."""
    children = Path(f"/proc/{pid}/task/{pid}/children")
    kids = children.read_text().split() if children.exists() else []
    return [pid] + [p for kid in kids for p in process_tree(int(kid))]


def accelerate_launcher(config, port):
    """The README's ready Accelerate config, as a user would launch it (CPU here: gloo)."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / config),
            "--main_process_port", str(port), "-m", "lrqat.cli"]


def assert_same_training(one, two, steps=4):
    one_losses, two_losses = losses(one), losses(two)
    assert len(one_losses) == len(two_losses) == steps
    assert one_losses == pytest.approx(two_losses, rel=1e-4)
    a_model, b_model = load_quantized(one / "model"), load_quantized(two / "model")
    for (name, a), (_, b) in zip(quant_layers(a_model), quant_layers(b_model)):
        assert torch.equal(a.int_weight(), b.int_weight()), name
        assert torch.allclose(a.scales, b.scales, rtol=1e-5, atol=0), name


@pytest.fixture(scope="module")
def one_process_run(tmp_path_factory, tiny_model_dir, text_file):
    out = tmp_path_factory.mktemp("one") / "run"
    run_cli([sys.executable, "-m", "lrqat.cli", *quantize_args(tiny_model_dir, text_file, out, 4)])
    return out


@pytest.mark.slow
@pytest.mark.parametrize(("config", "sharding", "port", "load"),
                         [("ddp.yaml", "ddp", 29517, "memory"), ("fsdp.yaml", "fsdp", 29518, "memory"),
                          ("ddp.yaml", "ddp", 29523, "stream"), ("fsdp.yaml", "fsdp", 29524, "stream")])
def test_two_processes_match_one_process_with_the_same_global_batch(
    tmp_path, tiny_model_dir, text_file, one_process_run, config, sharding, port, load
):
    """Against one process loading the model whole: `--load stream` gives the same model."""
    out = tmp_path / "two"
    run_cli([*quantize_args(tiny_model_dir, text_file, out, 2), "--load", load], accelerate_launcher(config, port))
    results = json.loads((out / "results.json").read_text())
    assert (results["processes"], results["sharding"]) == (2, sharding)
    # FSDP: each process holds half of every parameter, Φ0 and embeddings included
    # (buffers and padding aside); DDP: the whole model in each.
    held, whole = results["train"]["bill_bytes"], json.loads((one_process_run / "results.json").read_text())["train"]["bill_bytes"]
    share = 0.5 if sharding == "fsdp" else 1.0
    for role in ("frozen_quantized_base", "frozen_other", "trainable"):
        assert held[role] == pytest.approx(share * whole[role], rel=0.1), role
    assert_same_training(one_process_run, out)


@pytest.mark.slow
def test_killed_fsdp_run_resumes_to_what_one_process_trains(tmp_path, tiny_model_dir, text_file):
    """SIGKILL both sharded processes mid-training, relaunch with --resume: the checkpoint
    (whole tensors, gathered from the shards) continues the same trajectory."""
    steps, save = 30, ["--save-every", "1"]
    one = tmp_path / "one"
    run_cli([sys.executable, "-m", "lrqat.cli", *quantize_args(tiny_model_dir, text_file, one, 4, steps), *save])

    out = tmp_path / "fsdp"
    args = [*quantize_args(tiny_model_dir, text_file, out, 2, steps), *save]
    launcher = accelerate_launcher("fsdp.yaml", 29519)
    proc = subprocess.Popen([*launcher, *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 300
    while time.time() < deadline and not metrics_reached(out, 5):
        time.sleep(0.05)
    for pid in reversed(process_tree(proc.pid)):  # every worker and the launcher, as a machine failure would
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "results.json").exists(), "the run finished before it could be killed"
    killed_at = len(losses(out))
    run_cli([*args, "--resume"], launcher)
    assert 5 <= killed_at < steps
    assert_same_training(one, out, steps)


@pytest.mark.slow
def test_two_machines_match_one_process(tmp_path, tiny_model_dir, text_file, one_process_run):
    """Multi-node as a user launches it (one `accelerate launch` per machine, rendezvous at
    the first machine's address), here as two "machines" on localhost sharing a disk."""
    out = tmp_path / "nodes"
    args = quantize_args(tiny_model_dir, text_file, out, 2)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launchers = [[sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / "ddp.yaml"),
                  "--num_machines", "2", "--num_processes", "2", "--machine_rank", str(rank),
                  "--main_process_ip", "127.0.0.1", "--main_process_port", "29520", "-m", "lrqat.cli", *args]
                 for rank in (0, 1)]
    logs = [tmp_path / f"machine{rank}.log" for rank in (0, 1)]  # files, not pipes: neither may block the other
    nodes = [subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log.open("w"), env=env)
             for cmd, log in zip(launchers, logs)]
    for node, log in zip(nodes, logs):
        node.wait(timeout=600)
        assert node.returncode == 0, log.read_text()[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert (results["processes"], results["sharding"]) == (2, "ddp")
    assert_same_training(one_process_run, out)


@pytest.mark.slow
def test_fsdp_with_bf16_and_packed_phi_trains_what_one_process_trains(tmp_path, tiny_model_dir, text_file):
    """With --dtype bf16 --phi int a sharded unit mixes bf16 (frozen floats), fp32 (A, B, s)
    and uint8 (Φ0, two 4-bit integers per byte) parameters; FSDP keeps each as it is."""
    bf16 = ["--dtype", "bf16", "--phi", "int"]
    one, two = tmp_path / "one", tmp_path / "two"
    run_cli([sys.executable, "-m", "lrqat.cli", *quantize_args(tiny_model_dir, text_file, one, 4), *bf16])
    run_cli([*quantize_args(tiny_model_dir, text_file, two, 2), *bf16], accelerate_launcher("fsdp.yaml", 29521))
    assert losses(one) == pytest.approx(losses(two), rel=1e-3)
    for (name, a), (_, b) in zip(quant_layers(load_quantized(one / "model")), quant_layers(load_quantized(two / "model"))):
        assert (a.int_weight() == b.int_weight()).float().mean() > 0.999, name


def wide_model_dir(folder: Path) -> Path:
    """A random Llama whose blocks hold ~100M parameters (400 MB in fp32) next to a
    512-token vocabulary: memory here is the blocks', not the runtime's or embeddings'."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from lrqat.data import brown_documents

    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.Whitespace()
    bpe.train_from_iterator([d.text for d in brown_documents()[:40]],
                            trainers.BpeTrainer(vocab_size=512, special_tokens=["<unk>", "<s>", "</s>"]))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=1024, intermediate_size=4096, num_hidden_layers=6,
                         num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=256,
                         tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.slow
def test_streamed_fsdp_holds_half_the_model_per_process_and_trains_what_one_process_trains(tmp_path, text_file):
    """`--load stream` under FSDP: each process reads the checkpoint and shards every block
    as soon as it is built, so its setup grows by half of what one process's does; after
    training only the main process gathers the model. Full QAT, whose trained float
    weights make the model's memory easy to see."""
    model_dir = wide_model_dir(tmp_path / "wide")
    one, two = tmp_path / "one", tmp_path / "two"
    extra = ["--load", "stream", "--method", "qat", "--init", "minmax"]
    run_cli([sys.executable, "-m", "lrqat.cli", *quantize_args(model_dir, text_file, one, 4, steps=2), *extra])
    run_cli([*quantize_args(model_dir, text_file, two, 2, steps=2), *extra], accelerate_launcher("fsdp.yaml", 29522))
    results = {run: json.loads((run / "results.json").read_text()) for run in (one, two)}
    assert (results[two]["processes"], results[two]["sharding"]) == (2, "fsdp")
    assert losses(one) == pytest.approx(losses(two), rel=1e-4)
    for (name, a), (_, b) in zip(quant_layers(load_quantized(one / "model")), quant_layers(load_quantized(two / "model"))):
        assert (a.int_weight() == b.int_weight()).float().mean() > 0.999, name
    # setup's growth over the loaded skeleton (runtime, tokenizer): the model's share
    grown = {run: r["phases"]["setup"]["peak_rss_mb"] - r["phases"]["load"]["peak_rss_mb"]
             for run, r in results.items()}
    print(f"setup growth over the skeleton: one process {grown[one]:.0f} MiB, each of two {grown[two]:.0f} MiB")
    assert grown[one] > 300, grown  # the blocks' 400 MB, read one layer at a time
    block = 16e6 * 4 / 2**20  # one block (64 MiB) is whole while it is built, before it is sharded
    assert grown[two] < grown[one] / 2 + 1.5 * block, grown
