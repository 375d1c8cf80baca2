"""The static memory bill: what each method's frozen and trainable tensors cost."""

import pytest

from lrqat.memory import memory_bill
from lrqat.methods import DEFAULT_TARGETS, apply_lora, apply_method
from lrqat.spec import LRQATSpec, QuantSpec
from lrqat.surgery import find_targets, init_ranges

SPEC = QuantSpec(bits=4, group_size=None)


def target_weights(model) -> int:
    return sum(linear.weight.numel() for _, linear in find_targets(model, DEFAULT_TARGETS))


@pytest.mark.parametrize(("phi", "bytes_per_weight"), [("fixed8", 1.0), ("int", 0.5), ("bf16", 2.0), ("fp32", 4.0)])
def test_phi_formats_cost_what_they_promise(tiny_model, phi, bytes_per_weight):
    n = target_weights(tiny_model)
    lrqat = LRQATSpec(rank=4, phi=phi)
    apply_method("lrqat", tiny_model, SPEC, lrqat, init_ranges(tiny_model, SPEC, DEFAULT_TARGETS, "minmax"))
    bill = memory_bill(tiny_model)
    assert bill.frozen_quantized_base == int(n * bytes_per_weight)  # symmetric: no zero points
    assert bill.gradients == bill.trainable and bill.adam_state == 2 * bill.trainable


def test_full_qat_pays_sixteen_bytes_per_weight_lrqat_a_fraction(tiny_model):
    import copy

    n = target_weights(tiny_model)
    qat, lrqat, lora = copy.deepcopy(tiny_model), copy.deepcopy(tiny_model), tiny_model
    spec = LRQATSpec(rank=4)
    apply_method("qat", qat, SPEC, spec, init_ranges(qat, SPEC, DEFAULT_TARGETS, "minmax"))
    apply_method("lrqat", lrqat, SPEC, spec, init_ranges(lrqat, SPEC, DEFAULT_TARGETS, "minmax"))
    apply_lora(lora, spec)
    qat_bill, lrqat_bill, lora_bill = memory_bill(qat), memory_bill(lrqat), memory_bill(lora)
    assert qat_bill.trainable + qat_bill.gradients + qat_bill.adam_state >= 16 * n
    assert lrqat_bill.total < 0.5 * qat_bill.total
    assert lora_bill.frozen_quantized_base == 0 and lora_bill.frozen_other > lrqat_bill.frozen_other


def test_a_run_drops_its_merged_model_before_exporting(tmp_path, tiny_model_dir, text_file, monkeypatch):
    """The export reads the saved model back: holding the merged model beside it would
    double the export's memory (at 13B, beyond the machine)."""
    import gc
    import weakref

    from lrqat import pipeline
    from lrqat.cli import main

    saved, alive_at_export = [], []
    save, export = pipeline.save_quantized, pipeline.export_many

    def remember(model, *args, **kwargs):
        saved.append(weakref.ref(model))
        return save(model, *args, **kwargs)

    def observe(*args, **kwargs):
        gc.collect()
        alive_at_export.append(saved[0]() is not None)
        return export(*args, **kwargs)

    monkeypatch.setattr(pipeline, "save_quantized", remember)
    monkeypatch.setattr(pipeline, "export_many", observe)
    assert main(["quantize", "--model", str(tiny_model_dir), "--data", str(text_file), "--output", str(tmp_path / "run"),
                 "--steps", "1", "--batch-size", "1", "--seq-len", "32", "--eval-context", "64", "--eval-tokens", "128",
                 "--init", "minmax", "--export", "compressed-tensors"]) == 0
    assert alive_at_export == [False]
    assert (tmp_path / "run" / "export" / "compressed-tensors" / "config.json").is_file()
