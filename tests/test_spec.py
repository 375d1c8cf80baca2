from pathlib import Path

import pytest

from lrqat.cli import build_parser, parse_granularity, spec_from_args
from lrqat.errors import LrqatError
from lrqat.spec import PTQSpec, QuantSpec, RunSpec

RECIPES = Path(__file__).parent.parent / "recipes"


def parse(*argv):
    return spec_from_args(build_parser().parse_args(["quantize", *argv]))


@pytest.mark.parametrize(("recipe", "grid", "start", "steps"), [("w3-g64-asym", (3, False, 64), "lp", 640),
                                                              ("w4-channel-sym", (4, True, None), "gptq", 320)])
def test_recipe_sets_the_spec_and_flags_override_it(recipe, grid, start, steps):
    """The recommended recipes the README names carry what was measured: their grid, start,
    budget and teacher, with flags on top."""
    spec = parse("--recipe", str(RECIPES / f"{recipe}.yaml"), "--steps", "5", "--rank", "8")
    assert (spec.quant.bits, spec.quant.symmetric, spec.quant.group_size) == grid
    assert spec.train.steps == 5 and spec.lrqat.rank == 8
    assert (spec.ptq.init, spec.train.loss, spec.train.teacher) == (start, "ce+kd", "float")  # the recipe's own
    spec.validate()
    assert parse("--recipe", str(RECIPES / f"{recipe}.yaml")).train.steps == steps  # the budget measured


def test_method_default_learning_rates_unless_given():
    lrqat = parse().resolve().spec
    assert (lrqat.train.lr, lrqat.train.lr_scales) == (3e-3, 1e-4)
    qat = parse("--method", "qat", "--lr", "2e-5").resolve().spec
    assert (qat.train.lr, qat.train.lr_scales) == (2e-5, 1e-4)


@pytest.mark.parametrize(("text", "group"), [("channel", None), ("group", 128), ("g64", 64)])
def test_granularity_forms(text, group):
    assert parse_granularity(text, None) == group


def test_bad_granularity_and_keys_are_named():
    with pytest.raises(LrqatError, match="unknown granularity 'rows'"):
        parse_granularity("rows", None)
    with pytest.raises(LrqatError, match="unknown recipe key 'trian'"):
        RunSpec.from_dict({"trian": {}})
    with pytest.raises(LrqatError, match="unknown method 'awq'"):
        RunSpec(method="awq").validate()


@pytest.mark.parametrize(("section", "bad"), [(QuantSpec, {"bits": 1}), (QuantSpec, {"bits": 9}),
                                              (QuantSpec, {"group_size": 0}), (PTQSpec, {"init": "mse"}),
                                              (PTQSpec, {"damp": 1.5})])
def test_quant_spec_rejects_bad_values(section, bad):
    with pytest.raises(LrqatError):
        section(**bad).validate()


def test_validate_only_checks_and_resolve_fills_defaults_once():
    spec = RunSpec(method="qat")
    before = spec.to_dict()
    spec.validate()
    assert spec.to_dict() == before  # validate changes nothing
    run = spec.resolve(processes=2)
    assert spec.to_dict() == before  # nor does resolve: it returns a resolved copy
    assert (run.spec.train.lr, run.spec.train.lr_scales) == (1e-4, 1e-4)
    assert run.method.name == "qat" and run.global_batch == 2 * spec.train.batch_size
    assert "output" not in run.fingerprint and "export" not in run.fingerprint


def test_token_budget_sets_the_step_count_at_resolve():
    from lrqat.spec import TrainSpec

    spec = RunSpec(train=TrainSpec(batch_size=2, seq_len=32, max_tokens=300))
    assert spec.resolve(processes=1).spec.train.steps == 5  # ceil(300 / 64)
    assert spec.resolve(processes=2).spec.train.steps == 3  # ceil(300 / 128)


@pytest.mark.parametrize("field", ["lr", "lr_scales", "clip", "warmup"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_settings_are_refused(field, value):
    from lrqat.spec import TrainSpec

    with pytest.raises(LrqatError, match="finite"):
        RunSpec(train=TrainSpec(**{field: value})).validate()


def test_non_finite_alpha_is_refused():
    from lrqat.spec import LRQATSpec

    with pytest.raises(LrqatError, match="alpha"):
        RunSpec(lrqat=LRQATSpec(alpha=float("nan"))).validate()


@pytest.mark.parametrize(("raw", "where"), [({"quant": {"init": "lp"}}, "ptq"), ({"lrqat": {"targets": "x"}}, "the top level"),
                                            ({"train": {"fused": True}}, "lrqat"), ({"data": {"calib_tokens": 8}}, "ptq")])
def test_recipe_keys_that_moved_say_where_they_went(raw, where):
    with pytest.raises(LrqatError, match=f"now under {where}"):
        RunSpec.from_dict(raw)


def test_bad_target_pattern_and_export_format_are_refused_early():
    with pytest.raises(LrqatError, match="regular expression"):
        RunSpec(targets="(").validate()
    with pytest.raises(LrqatError, match="unknown export format onnx"):
        RunSpec(export=["onnx"]).validate()


def test_a_merged_model_of_the_older_layout_still_reads_its_grid(tmp_path):
    """quantization.json once held the PTQ options beside the grid; a consumer needs the grid."""
    import json

    from lrqat.export.native import read_grid

    (tmp_path / "quantization.json").write_text(json.dumps({"format": "lrqat-int", "version": 1, "layers": [], "quant": {
        "bits": 3, "symmetric": False, "group_size": 32, "init": "lp", "act_order": True, "damp": 0.01}}))
    assert read_grid(tmp_path) == QuantSpec(bits=3, symmetric=False, group_size=32)


def test_a_run_of_an_older_version_resumes_unless_a_new_setting_is_in_use(tmp_path):
    """A fingerprint saved before a setting existed matches while that setting is at its default."""
    import json

    from lrqat.pipeline import check_output

    spec = RunSpec(output=str(tmp_path / "run"))
    fingerprint = json.loads(json.dumps(spec.resolve().fingerprint))
    del fingerprint["act"], fingerprint["rotate"], fingerprint["train"]["loss"]  # what an older lrqat saved
    fingerprint["train"]["lr"] = 0.003  # a setting fingerprints no longer hold
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "run.json").write_text(json.dumps({"fingerprint": fingerprint}))
    (tmp_path / "run" / "stages.json").write_text("{}")
    check_output(spec.resolve(), resume=True)
    with pytest.raises(LrqatError, match="other settings"):
        check_output(RunSpec.from_dict({"output": str(tmp_path / "run"), "act": {"kv_bits": 8}}).resolve(), resume=True)
    with pytest.raises(LrqatError, match="other settings"):
        check_output(RunSpec.from_dict({"output": str(tmp_path / "run"), "quant": {"bits": 3}}).resolve(), resume=True)


def test_a_runs_calibrated_starts_are_its_own_then_the_gptq_baseline_each_once():
    assert RunSpec().start is None and RunSpec().calibrated_starts == []
    both = RunSpec(ptq=PTQSpec(init="block-ap", gptq_baseline=True))
    assert both.start == "block-ap" and both.calibrated_starts == ["block-ap", "gptq"]
    assert RunSpec(method="gptq", ptq=PTQSpec(gptq_baseline=True)).calibrated_starts == ["gptq"]
    assert RunSpec(method="block-ap").start == "block-ap"
