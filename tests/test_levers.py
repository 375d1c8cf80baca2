"""The lever benchmark's input: a lever names settings of the run it changes, and a bad
one is refused before hours of training start."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent.parent / "benchmarks"))

from levers import folder_name, parse_lever, reference_spec, with_earlier_seeds, with_lever
from quality import RECIPES, SETTINGS, base_spec

from lrqat.errors import LrqatError


def test_a_lever_is_read_as_typed_settings():
    assert parse_lever("train.loss=kd; train.kd_weight=0.8;lrqat.rank=128") == {
        "train": {"loss": "kd", "kd_weight": 0.8}, "lrqat": {"rank": 128}}


def test_a_lever_changes_the_base_recipe_and_keeps_the_rest():
    recipe = with_lever(RECIPES["lrqat+gptq+kd"], "train.kd_weight=0.8")
    assert recipe.ptq == {"init": "gptq"}
    assert recipe.train == {"loss": "ce+kd", "teacher": "float", "kd_weight": 0.8}
    assert with_lever(RECIPES["lrqat"], "") == RECIPES["lrqat"]
    assert folder_name("lrqat+gptq+kd", "train.seq_len=1024;train.batch_size=1") == \
        "lrqat+gptq+kd[train.seq_len=1024_train.batch_size=1]"
    assert folder_name("lrqat+gptq", "", 320) == "lrqat+gptq-320steps"  # apart from the default budget's runs


@pytest.mark.parametrize("lever", ["kd_weight=0.8", "train.kd_weight", "data.eval_tokens=4", "train.=1"])
def test_a_malformed_lever_is_refused_with_the_form_to_use(lever):
    with pytest.raises(LrqatError, match="SECTION.FIELD=VALUE"):
        parse_lever(lever)


def budget(steps: int, batch_size: int = 4, seq_len: int = 256) -> argparse.Namespace:
    """The budget flags `base_spec` reads, as `add_budget_flags` parses them."""
    return argparse.Namespace(calib_tokens=512, dtype="fp32", steps=steps, batch_size=batch_size, seq_len=seq_len,
                              grad_checkpointing=False, lr_scales=None, eval_tokens=1024, ood_tokens=1024)


def test_a_lever_on_an_unknown_field_fails_before_training():
    args = budget(2, batch_size=1, seq_len=64)
    with pytest.raises(TypeError, match="kd_wieght"):
        with_lever(RECIPES["lrqat"], "train.kd_wieght=0.8").apply(base_spec("x", SETTINGS["w4-channel-sym"], args, 0))


def test_one_reference_folder_serves_every_step_budget():
    """The references train nothing: a 320-step table reuses the 80-step table's folder,
    whose settings must match for the run to be resumed rather than refused."""
    def spec(steps: int):
        return reference_spec("root", SETTINGS["w4-channel-sym"], budget(steps), 80)
    assert spec(320) == spec(80)
    assert spec(320).train.steps == 80 and spec(320).output == "root/reference"


def test_a_later_seed_joins_the_row_and_a_rerun_seed_replaces_its_run():
    row = {"seeds": [0], "per_seed": [{"ppl_ood": 30.0}]}
    assert with_earlier_seeds(row, [1], [{"ppl_ood": 31.0}]) == ([0, 1], [{"ppl_ood": 30.0}, {"ppl_ood": 31.0}])
    assert with_earlier_seeds(row, [0], [{"ppl_ood": 29.0}]) == ([0], [{"ppl_ood": 29.0}])
    assert with_earlier_seeds(None, [2, 1], [{"a": 2}, {"a": 1}]) == ([1, 2], [{"a": 1}, {"a": 2}])
