"""Distillation: the KD loss, the two teachers (a float copy; LR-QAT's own Φ0 without
rounding), their cost in the memory bill, and runs that train with them."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_llama
from lrqat.activations import ActSpec, install, placements
from lrqat.distill import CacheTeacher, FloatTeacher, Objective, Phi0Teacher, kd_loss, phi0_teacher_mode
from lrqat.errors import LrqatError
from lrqat.methods import DEFAULT_TARGETS, apply_method
from lrqat.pipeline import run_quantize
from lrqat.rundir import RunDir
from lrqat.spec import LRQATSpec, QuantSpec, RunSpec
from lrqat.surgery import find_targets, init_ranges

W4 = QuantSpec(bits=4, symmetric=True, group_size=None)


def relative(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_kd_loss_is_zero_at_the_teacher_and_its_gradient_is_the_probability_gap():
    torch.manual_seed(0)
    teacher = torch.randn(2, 5, 11)
    assert kd_loss(teacher, teacher, 2.0).item() == pytest.approx(0.0, abs=1e-6)
    student = torch.randn(2, 5, 11, requires_grad=True)
    kd_loss(student, teacher, 1.0).backward()
    expected = (F.softmax(student.detach(), -1) - F.softmax(teacher, -1)) / 10  # mean over 2·5 positions
    assert torch.allclose(student.grad, expected, atol=1e-6)
    # T² keeps the loss on the scale of T = 1 for small logit gaps
    near = teacher + 0.01 * torch.randn_like(teacher)
    assert kd_loss(near, teacher, 4.0).item() == pytest.approx(kd_loss(near / 4, teacher / 4, 1.0).item() * 16, rel=1e-4)


def lrqat_model(phi: str, init: str = "minmax", act: ActSpec | None = None):
    model = tiny_llama()
    names = [n for n, _ in find_targets(model, DEFAULT_TARGETS)]
    if act is not None:
        install(model, act, names)
    apply_method("lrqat", model, W4, LRQATSpec(rank=4, phi=phi), init_ranges(model, W4, DEFAULT_TARGETS, init))
    return model


@pytest.mark.parametrize(("phi", "bound"), [("fp32", 1e-5), ("fixed8", 0.02)])
def test_phi0_teacher_is_the_float_model_to_within_phi0s_precision(phi, bound):
    """minmax ranges clip nothing: s0·(Φ0 − z) is W0 up to Φ0's storage (exact in fp32;
    1/16 of a grid step with fixed8 at W4), far closer than the rounded model."""
    ids = torch.randint(0, 128, (2, 16))
    with torch.no_grad():
        reference = tiny_llama()(ids).logits
        model = lrqat_model(phi)
        student = model(ids).logits
        teacher = Phi0Teacher().logits(model, ids)
    assert relative(teacher, reference) < bound
    assert relative(teacher, reference) < 0.25 * relative(student, reference)
    assert not model.model.layers[0].self_attn.q_proj.teacher  # the mode ends with the pass


def test_phi0_teacher_bypasses_activation_quantizers():
    ids = torch.randint(0, 128, (2, 16))
    with torch.no_grad():
        plain = Phi0Teacher().logits(lrqat_model("fp32"), ids)
        quantized = lrqat_model("fp32", act=ActSpec(4, 4))
        assert placements(quantized)
        assert torch.allclose(Phi0Teacher().logits(quantized, ids), plain, atol=1e-5)
        with phi0_teacher_mode(quantized):
            pass
        assert not torch.allclose(quantized(ids).logits, plain, atol=1e-3)  # quantizers back on


def test_float_teacher_is_a_frozen_bf16_copy_counted_in_the_bill():
    model = tiny_llama()
    teacher = FloatTeacher.of(model)
    assert all(p.dtype == torch.bfloat16 and not p.requires_grad for p in teacher.model.parameters())
    n = sum(p.numel() for p in model.parameters())  # a tied head once
    buffers = sum(b.numel() * b.element_size() for b in teacher.model.buffers())
    assert teacher.bytes() == 2 * n + buffers
    objective = Objective("ce+kd", teacher, 2.0, 0.5)
    ids = torch.randint(0, 128, (2, 16))
    student = lrqat_model("fixed8")
    loss = objective(student, ids)
    loss.backward()
    assert loss.item() > 0 and student.model.layers[0].mlp.up_proj.B.grad is not None


def spec_for(tiny_model_dir, text_file, out, **train):
    raw = {"model": str(tiny_model_dir), "output": str(out), "ptq": {"init": "minmax"}, "lrqat": {"rank": 4},
           "train": {"steps": 3, "batch_size": 2, "seq_len": 32, "save_every": 0, **train},
           "data": {"source": str(text_file), "eval_context": 64, "eval_tokens": 128}}
    return RunSpec.from_dict(raw)


def test_cache_teacher_holds_the_float_top_k_and_full_k_is_exact_kd(tmp_path):
    model = tiny_llama()
    rows = [torch.randint(0, 128, (16,), generator=torch.Generator().manual_seed(i)) for i in range(3)]
    cache = CacheTeacher.build(model, [*rows, rows[0]], k=128, folder=tmp_path / "cache", log=lambda _: None)
    assert len(cache.rows) == 3  # a repeated sequence is stored once
    ids = torch.stack([rows[2], rows[0]])
    values, indices = cache.targets(model, ids)
    with torch.no_grad():
        dense = model(ids).logits[:, :-1]
    assert torch.allclose(values.float(), dense.gather(-1, indices.long()), atol=1e-2)  # fp16 storage
    student = torch.randn_like(dense)
    assert kd_loss(student, values, 2.0, indices).item() == pytest.approx(kd_loss(student, dense, 2.0).item(), rel=1e-2)
    small = CacheTeacher.build(model, rows, k=8, folder=tmp_path / "small", log=lambda _: None)
    assert small.targets(model, ids)[0].shape == (2, 15, 8)
    assert CacheTeacher.size(tmp_path / "small") < CacheTeacher.size(tmp_path / "cache")
    with pytest.raises(LrqatError, match="lacks a training sequence"):
        small.targets(model, torch.randint(0, 128, (1, 16), generator=torch.Generator().manual_seed(99)))


@pytest.mark.parametrize(("loss", "teacher"), [("kd", "float"), ("ce+kd", "phi0"), ("kd", "cache")])
def test_runs_train_with_a_teacher_and_merge_exactly(tmp_path, tiny_model_dir, text_file, loss, teacher):
    result = run_quantize(spec_for(tiny_model_dir, text_file, tmp_path / "run", loss=loss, teacher=teacher,
                                   kd_temperature=2.0), log=lambda _: None)
    assert result.ppl["lrqat_merged"] == pytest.approx(result.ppl["lrqat"], rel=1e-4)
    losses = [r["loss"] for r in RunDir(tmp_path / "run").read_metrics()]
    assert len(losses) == 3 and all(x > 0 for x in losses)
    if teacher == "float":
        assert result.train["bill_bytes"]["teacher"] > 0
    elif teacher == "cache":  # on disk, not in memory
        assert result.train["bill_bytes"]["teacher"] == 0 and result.train["teacher_cache_bytes"] > 0
        assert (tmp_path / "run" / "teacher_cache" / "index.json").is_file()
    else:  # no extra weights, and its closeness to float is reported
        assert result.train["bill_bytes"]["teacher"] == 0
        assert abs(result.ppl["teacher_phi0"] - result.ppl["float"]) / result.ppl["float"] < 0.05


@pytest.mark.parametrize(("raw", "message"), [
    ({"method": "qat", "train": {"loss": "kd", "teacher": "phi0"}}, "--method lrqat"),
    ({"lrqat": {"phi": "int"}, "train": {"loss": "kd", "teacher": "phi0"}}, "--phi int"),
    ({"ptq": {"init": "block-ap"}, "train": {"loss": "ce+kd", "teacher": "phi0"}}, "block-ap's quantized model"),
    ({"ptq": {"init": "gptq"}, "train": {"loss": "kd", "teacher": "phi0"}}, "--teacher float or cache"),
    ({"train": {"loss": "mse"}}, "unknown loss"),
    ({"train": {"teacher": "oracle"}}, "unknown teacher"),
    ({"train": {"kd_weight": 1.5}}, "kd-weight"),
    ({"train": {"kd_temperature": 0}}, "kd-temperature"),
    ({"train": {"kd_top_k": 0}}, "kd-top-k"),
])
def test_bad_distillation_settings_are_refused(raw, message):
    with pytest.raises(LrqatError, match=message):
        RunSpec.from_dict(raw).validate()
