from pathlib import Path

import pytest

from lrqat.cli import build_parser, parse_granularity, spec_from_args
from lrqat.errors import LrqatError
from lrqat.spec import QuantSpec, RunSpec

RECIPES = Path(__file__).parent.parent / "recipes"


def parse(*argv):
    return spec_from_args(build_parser().parse_args(["quantize", *argv]))


def test_recipe_sets_the_spec_and_flags_override_it():
    spec = parse("--recipe", str(RECIPES / "w3-g64-asym.yaml"), "--steps", "5", "--rank", "8")
    assert (spec.quant.bits, spec.quant.symmetric, spec.quant.group_size) == (3, False, 64)
    assert spec.train.steps == 5 and spec.lrqat.rank == 8


def test_method_default_learning_rates_unless_given():
    lrqat = parse()
    lrqat.validate()
    assert (lrqat.train.lr, lrqat.train.lr_scales) == (3e-3, 1e-4)
    qat = parse("--method", "qat", "--lr", "2e-5")
    qat.validate()
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


@pytest.mark.parametrize("bad", [{"bits": 1}, {"bits": 9}, {"group_size": 0}, {"init": "mse"}, {"damp": 1.5}])
def test_quant_spec_rejects_bad_values(bad):
    with pytest.raises(LrqatError):
        QuantSpec(**bad).validate()
