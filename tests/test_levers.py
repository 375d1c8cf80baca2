"""The lever benchmark's input: a lever names settings of the run it changes, and a bad
one is refused before hours of training start."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent.parent / "benchmarks"))

from levers import (
    CONDITIONS,
    folder_name,
    measured_under,
    parse_lever,
    reference_spec,
    render,
    with_earlier_seeds,
    with_lever,
)
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


def conditions(machine: str, float_ood: float) -> dict:
    """A table heading's conditions: where a command ran and its references."""
    return {"dtype": "bf16", "machine": machine, "code": "abc1234", "eval_tokens": 4092, "eval_data_tokens": 65472,
            "ppl_float": 29.7, "ppl_rtn": 84.1, "ppl_gptq": 48.3, "ppl_ood_float": float_ood, "ppl_ood_rtn": 67.6,
            "ppl_ood_gptq": 40.8}


def row(ppl_ood: float) -> dict:
    figures = {"ppl": 31.0, "ppl_ood": ppl_ood, "g_gptq": 0.9, "ood_g_rtn": 0.9, "ood_g_gptq": 0.7,
               "train_seconds": 100.0, "peak_memory_mb": 2000.0}
    return {"seeds": [0], "per_seed": [figures], **figures}


def test_a_row_an_earlier_command_measured_elsewhere_names_its_own_machine_and_references():
    """A later command overwrites the heading's machine and references; a row it did not
    rerun keeps the conditions its gaps were computed under, and the table says so."""
    table = {**conditions("AMX machine", 26.470), "rows": {}, "commands": ["first", "second"]}
    table["rows"]["none (control)"] = {**row(31.277), "measured": measured_under(table, 1)}
    table.update(conditions("no-AMX machine", 26.488))  # the second command's heading
    table["rows"]["train.loss=ce+kd"] = {**row(30.513), "measured": measured_under(table, 2)}
    assert set(table["rows"]["none (control)"]["measured"]) == {"command", *CONDITIONS}
    text = render({"tables": {"w3, 640 steps, base lrqat": table}})
    heading, footnotes = text.split("| lever |")[0], text.split("Rows measured under other conditions")[1]
    assert "no-AMX machine" in heading and "AMX machine" not in heading.replace("no-AMX", "")
    assert "the control: command 1, bf16 on AMX machine" in footnotes and "float 26.470" in footnotes
    assert "ce+kd" not in footnotes  # measured under the heading's own conditions


def test_rows_measured_under_the_headings_conditions_add_no_footnote():
    table = {**conditions("one machine", 26.488), "rows": {}, "commands": ["first"]}
    table["rows"]["none (control)"] = {**row(31.0), "measured": measured_under(table, 1)}
    table["code"] = "def5678"  # a later commit alone is not another condition
    assert "other conditions" not in render({"tables": {"t": table}})
