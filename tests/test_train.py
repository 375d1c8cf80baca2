import json

import pytest
import torch

from conftest import tiny_llama
from lrqat.blocks import PackedBlocks, step_indices
from lrqat.checkpoint import CHECKPOINT_NAME
from lrqat.errors import LrqatError
from lrqat.methods import apply_lrqat
from lrqat.spec import LRQATSpec, QuantSpec, TrainSpec
from lrqat.surgery import lrqat_layers
from lrqat.trainer import Trainer, lr_factor, train

SPEC = TrainSpec(steps=6, batch_size=2, seq_len=16, grad_accum=2, lr=0.01, lr_scales=1e-3, save_every=2, warmup=0.2)
FINGERPRINT = {"test": 1}


def fresh_model(fused=False):
    model = tiny_llama()
    return apply_lrqat(model, QuantSpec(bits=4, group_size=16), LRQATSpec(rank=4, fused=fused), seed=0, init="minmax")


def blocks():
    return torch.randint(0, 128, (20, 16), generator=torch.Generator().manual_seed(1))


def trained_state(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_lr_schedule_warms_up_then_decays_to_zero():
    spec = TrainSpec(steps=10, warmup=0.2, schedule="linear")
    factors = [lr_factor(i, spec) for i in range(10)]
    assert factors[:2] == [0.5, 1.0] and factors[-1] < factors[2] and factors[-1] >= 0
    cosine = TrainSpec(steps=10, warmup=0.0, schedule="cosine")
    assert lr_factor(0, cosine) == 1.0 and lr_factor(9, cosine) < 0.05


def test_step_indices_are_deterministic_and_cover_an_epoch():
    first = [step_indices(s, 12, 4, seed=3) for s in range(3)]
    again = [step_indices(s, 12, 4, seed=3) for s in range(3)]
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert sorted(torch.cat(first).tolist()) == list(range(12))


def test_training_lowers_the_loss_and_writes_metrics(tmp_path):
    model = fresh_model()
    spec = TrainSpec(steps=15, batch_size=4, seq_len=16, lr=0.02, lr_scales=1e-3, eval_every=5)
    data = torch.randint(0, 128, (4, 16)).repeat(5, 1)  # a small repeated set the model can fit
    result = train(model, PackedBlocks(data), data[:2], spec, tmp_path, FINGERPRINT)
    assert result.steps == 15 and result.tokens == 15 * 4 * 16
    assert result.losses[-1] < result.losses[0]
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 16))
    assert sum("eval_ppl" in r for r in records) == 3
    assert (tmp_path / CHECKPOINT_NAME).exists()


def test_interrupted_run_resumes_on_the_same_trajectory(tmp_path, monkeypatch):
    reference = fresh_model()
    train(reference, PackedBlocks(blocks()), blocks()[:1], SPEC, tmp_path / "full", FINGERPRINT)

    calls = {"n": 0}
    original = Trainer.train_step

    def dies_at_step_4(self):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return original(self)

    monkeypatch.setattr(Trainer, "train_step", dies_at_step_4)
    with pytest.raises(LrqatError, match="--resume"):
        train(fresh_model(), PackedBlocks(blocks()), blocks()[:1], SPEC, tmp_path / "cut", FINGERPRINT)
    monkeypatch.setattr(Trainer, "train_step", original)

    resumed = fresh_model()
    result = train(resumed, PackedBlocks(blocks()), blocks()[:1], SPEC, tmp_path / "cut", FINGERPRINT, resume=True)
    assert result.steps == SPEC.steps
    for name, value in trained_state(reference).items():
        torch.testing.assert_close(trained_state(resumed)[name], value, rtol=1e-5, atol=1e-6)
    steps = [json.loads(line)["step"] for line in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, SPEC.steps + 1))


def test_corrupt_checkpoint_is_reported_clearly(tmp_path):
    (tmp_path / CHECKPOINT_NAME).write_bytes(b"not a checkpoint")
    with pytest.raises(LrqatError, match="corrupt or unreadable"):
        train(fresh_model(), PackedBlocks(blocks()), blocks()[:1], SPEC, tmp_path, FINGERPRINT, resume=True)


def test_checkpoint_of_other_settings_is_refused(tmp_path):
    train(fresh_model(), PackedBlocks(blocks()), blocks()[:1], SPEC, tmp_path, FINGERPRINT)
    with pytest.raises(LrqatError, match="other settings"):
        train(fresh_model(), PackedBlocks(blocks()), blocks()[:1], SPEC, tmp_path, {"test": 2}, resume=True)


def test_fused_training_follows_the_plain_trajectory(tmp_path):
    """`LRQATSpec.fused` (--fused) switches every LR-QAT layer to the compiled kernels,
    which train the same model."""
    plain = train(fresh_model(), PackedBlocks(blocks()), blocks()[:1], SPEC, tmp_path / "plain", FINGERPRINT)
    fused = train(fresh_model(fused=True), PackedBlocks(blocks()), blocks()[:1], SPEC, tmp_path / "fused", FINGERPRINT)
    assert all(layer.fused for _, layer in lrqat_layers(fused.model))
    assert fused.losses == pytest.approx(plain.losses, rel=1e-4)


def test_checkpoint_of_an_older_format_is_refused_clearly(tmp_path):
    train(fresh_model(), PackedBlocks(blocks()), blocks()[:1], SPEC, tmp_path, FINGERPRINT)
    state = torch.load(tmp_path / CHECKPOINT_NAME, weights_only=False)
    state["optimizer"]["state"] = {0: {}}  # keyed by position, as before checkpoints named tensors
    torch.save(state, tmp_path / CHECKPOINT_NAME)
    with pytest.raises(LrqatError, match="older lrqat"):
        train(fresh_model(), PackedBlocks(blocks()), blocks()[:1], SPEC, tmp_path, FINGERPRINT, resume=True)
