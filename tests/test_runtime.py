"""Emulated bf16: measured, warned about, and kept out of the teacher and the memory advice."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_llama
from lrqat import runtime
from lrqat.distill import make_teacher
from lrqat.errors import LrqatError
from lrqat.fit import check_fits, estimate
from lrqat.runtime import bf16_slowdown as measured_bf16_slowdown  # imported before the fixture pins it
from lrqat.spec import RunSpec

EMULATED = 90.0  # measured on a 2-core AMD EPYC (AVX2, no AVX512-BF16/AMX)


def test_the_bf16_slowdown_is_measured_once_and_leaves_the_thread_count_alone():
    threads = torch.get_num_threads()
    measured_bf16_slowdown.cache_clear()
    ratio = measured_bf16_slowdown()
    assert 0 < ratio < float("inf")
    assert measured_bf16_slowdown() == ratio  # cached: one measurement per process
    assert torch.get_num_threads() == threads  # timed on one thread, then restored


@pytest.mark.parametrize("slowdown", [1.0, EMULATED])
def test_bf16_compute_is_warned_about_only_where_it_is_emulated(monkeypatch, slowdown):
    monkeypatch.setattr(runtime, "bf16_slowdown", lambda: slowdown)
    warning = runtime.slow_dtype_warning("bf16")
    assert runtime.slow_dtype_warning("fp32") is None
    if slowdown == 1.0:
        assert warning is None
    else:
        assert "90x slower than fp32" in warning and "--dtype fp32" in warning


@pytest.mark.parametrize("slowdown, dtype", [(1.0, torch.bfloat16), (EMULATED, torch.float32)])
def test_the_float_teacher_and_its_bill_use_bf16_only_where_it_is_native(monkeypatch, slowdown, dtype, tmp_path):
    monkeypatch.setattr(runtime, "bf16_slowdown", lambda: slowdown)
    model = tiny_llama()
    teacher = make_teacher("float", model, list, 8, tmp_path)
    assert {p.dtype for p in teacher.model.parameters()} == {dtype}
    spec = RunSpec.from_dict({"train": {"loss": "ce+kd", "teacher": "float"}})
    params = sum(p.numel() for p in model.parameters())
    assert estimate(model.config, spec).teacher == params * dtype.itemsize


def test_memory_advice_offers_bf16_only_where_it_is_native(monkeypatch):
    monkeypatch.setenv("LRQAT_MEMORY_LIMIT", "1MiB")
    config, spec = tiny_llama().config, RunSpec.from_dict({})
    with pytest.raises(LrqatError, match="--dtype bf16"):
        check_fits(config, spec)
    monkeypatch.setattr(runtime, "bf16_slowdown", lambda: EMULATED)
    with pytest.raises(LrqatError) as refused:
        check_fits(config, spec)
    assert "--dtype bf16" not in str(refused.value)
