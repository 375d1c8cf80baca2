"""The memory check before a run: its static bill is the real one, and a run too big for
its budget stops before any weight is read, naming its bill and what to change."""

from __future__ import annotations

import pytest

from conftest import tiny_llama
from lrqat.errors import LrqatError
from lrqat.fit import RUNTIME_BYTES, check_fits, estimate, parse_bytes
from lrqat.memory import memory_bill
from lrqat.methods import DEFAULT_TARGETS, apply_method
from lrqat.spec import RunSpec
from lrqat.surgery import init_ranges


@pytest.mark.parametrize("method", ["lrqat", "qat", "peqa", "float-lora"])
@pytest.mark.parametrize("phi", ["fixed8", "int"])
def test_the_estimated_static_bill_is_the_bill_of_the_built_model(method, phi):
    spec = RunSpec.from_dict({"method": method, "lrqat": {"rank": 4, "phi": phi}, "quant": {"group_size": None}})
    model = tiny_llama(layers=3)
    found = estimate(model.config, spec)
    built = apply_method(method, model, spec.quant, spec.lrqat, init_ranges(model, spec.quant, DEFAULT_TARGETS))
    bill = memory_bill(built)
    assert found.frozen_quantized_base == bill.frozen_quantized_base
    assert found.trainable_and_state == bill.trainable + bill.gradients + bill.adam_state
    assert found.frozen_other == bill.frozen_other


@pytest.mark.parametrize("quant", [{"group_size": None}, {"bits": 3, "group_size": 16, "symmetric": False}])
def test_the_finishing_peak_prices_the_real_merged_model_and_the_export_copy(quant):
    """Merging and exporting a 13B peak above its training: the estimate knows the
    merged integer layers' real bytes, and an export adds a second packed copy."""
    from lrqat.layers import QuantLinear
    from lrqat.surgery import merge_model

    spec = RunSpec.from_dict({"lrqat": {"rank": 4, "phi": "int"}, "quant": quant})
    exported = RunSpec.from_dict({**spec.to_dict(), "export": ["compressed-tensors"]})
    model = tiny_llama(layers=3)
    plain, with_export = estimate(model.config, spec), estimate(model.config, exported)
    merged = merge_model(apply_method("lrqat", model, spec.quant, spec.lrqat,
                                      init_ranges(model, spec.quant, DEFAULT_TARGETS)))
    real = sum(b.numel() * b.element_size() for m in merged.modules() if isinstance(m, QuantLinear) for b in m.buffers())
    assert plain.merged == with_export.merged == real
    assert with_export.finish > plain.finish
    assert with_export.finish - RUNTIME_BYTES >= 2 * real  # the loaded model and its packed copy
    assert with_export.peak >= with_export.finish


def test_a_run_over_its_budget_stops_before_reading_weights_with_its_bill_and_fixes(monkeypatch, tmp_path,
                                                                                   tiny_model_dir, text_file):
    from lrqat.pipeline import run_quantize

    monkeypatch.setenv("LRQAT_MEMORY_LIMIT", "1MiB")
    spec = RunSpec.from_dict({"model": str(tiny_model_dir), "output": str(tmp_path / "run"),
                              "data": {"source": str(text_file), "eval_context": 64}})
    with pytest.raises(LrqatError, match=r"this run needs about .* GiB \(frozen quantized base .*\) but 0.0 GiB is "
                                         r"available: use .*--phi int, --dtype bf16"):
        run_quantize(spec, log=lambda _: None)
    assert not (tmp_path / "run").exists()
    monkeypatch.setenv("LRQAT_MEMORY_LIMIT", "off")
    check_fits(tiny_llama().config, spec)  # unchecked


def test_a_whole_float_load_that_does_not_fit_suggests_streaming(monkeypatch):
    from transformers import LlamaConfig

    config = LlamaConfig(hidden_size=512, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=8,
                         vocab_size=1000)
    spec = RunSpec.from_dict({"train": {"seq_len": 64, "batch_size": 1}})
    memory, stream = estimate(config, spec), estimate(config, RunSpec.from_dict({**spec.to_dict(), "load": "stream"}))
    assert memory.setup > memory.training and stream.peak < memory.peak
    monkeypatch.setenv("LRQAT_MEMORY_LIMIT", str((memory.peak + stream.peak) // 2))
    with pytest.raises(LrqatError, match="--load stream"):
        check_fits(config, spec)
    check_fits(config, RunSpec.from_dict({**spec.to_dict(), "load": "stream"}))


def test_memory_limit_sizes_parse_and_bad_ones_are_refused():
    assert parse_bytes("16GiB") == 16 * 2**30 and parse_bytes("512 MiB") == 512 * 2**20 and parse_bytes("1000") == 1000
    with pytest.raises(LrqatError, match="not a size"):
        parse_bytes("lots")
