"""Zero-shot task accuracy: the offline tasks built from held-out text, scored by lm-eval
on models as lrqat holds them."""

from __future__ import annotations

import json

import pytest
import torch

from lrqat.data import brown_documents, is_eval_document
from lrqat.errors import LrqatError
from lrqat.tasks import LOCAL_TASKS, build_local_tasks, parse_tasks, task_accuracy


def read(folder, name):
    return [json.loads(line) for line in (folder / f"{name}.jsonl").read_text().splitlines()]


def test_local_tasks_come_from_held_out_documents_only_and_are_well_formed():
    folder = build_local_tasks("brown", 0.1)
    assert build_local_tasks("brown", 0.1) == folder  # built once, deterministic location
    lambada, hellaswag = read(folder, "lrqat_lambada"), read(folder, "lrqat_hellaswag")
    assert len(lambada) >= 100 and len(hellaswag) >= 100
    ids = {d.id for d in brown_documents()}
    for doc in lambada + hellaswag:
        assert doc["doc"] in ids and is_eval_document(doc["doc"], 0.1)
    for doc in lambada:
        last = doc["text"].split(" ")[-1]
        assert last.isalpha() and last.islower() and len(last) >= 3
    for doc in hellaswag:
        assert len(doc["endings"]) == 4 and doc["label"] in "0123" and len(set(doc["endings"])) == 4
    labels = [int(d["label"]) for d in hellaswag]
    assert all(labels.count(k) > len(labels) / 8 for k in range(4))  # the true ending's place is spread


def test_task_names_expand_and_bad_ones_are_refused():
    assert parse_tasks("local,hellaswag,local") == [*LOCAL_TASKS, "hellaswag"]
    with pytest.raises(LrqatError, match="names no task"):
        parse_tasks(" , ")


def test_a_model_with_zeroed_weights_scores_at_chance(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    with torch.no_grad():  # every token equally likely: nothing but an ending's length can win
        assert torch.equal(model(torch.tensor([[5, 6, 7]])).logits, torch.zeros(1, 3, model.config.vocab_size))
    scores = task_accuracy(model, tokenizer, list(LOCAL_TASKS), limit=24)
    assert abs(scores["lrqat_hellaswag"]["acc"] - 0.25) < 0.15
    assert scores["lrqat_lambada"]["acc"] == 0.0
    with pytest.raises(LrqatError, match="unknown task no_such_task"):
        task_accuracy(model, tokenizer, ["no_such_task"], limit=4)


@pytest.mark.slow
def test_the_float_built_in_model_scores_well_above_chance_and_the_same_twice():
    from lrqat.models import load_model

    model, tokenizer = load_model("smollm2-135m")
    first = task_accuracy(model, tokenizer, list(LOCAL_TASKS), limit=16)
    assert first["lrqat_hellaswag"]["acc"] >= 0.45  # chance 0.25
    assert first["lrqat_lambada"]["acc"] >= 0.1  # chance ~0 (one word of a 49k vocabulary)
    # deterministic: the same scores again (the cheaper task: one request per example)
    assert task_accuracy(model, tokenizer, ["lrqat_lambada"], limit=16)["lrqat_lambada"] == first["lrqat_lambada"]


def test_a_run_with_tasks_reports_float_rtn_and_merged_accuracy_and_eval_adds_them(tmp_path, tiny_model_dir):
    from lrqat.cli import main
    from lrqat.pipeline import run_quantize
    from lrqat.rundir import RunDir
    from lrqat.spec import RunSpec

    raw = {"model": str(tiny_model_dir), "output": str(tmp_path / "run"), "quant": {"group_size": None},
           "lrqat": {"rank": 4}, "train": {"steps": 1, "batch_size": 1, "seq_len": 32, "save_every": 0},
           "data": {"eval_context": 64, "eval_tokens": 128, "tasks": ["lrqat_hellaswag"], "task_limit": 8}}
    result = run_quantize(RunSpec.from_dict(raw), log=lambda _: None)
    assert set(result.tasks) == {"float", "rtn", "lrqat_merged"}
    assert all(0 <= v["lrqat_hellaswag"]["acc"] <= 1 for v in result.tasks.values())
    report = RunDir(tmp_path / "run").report.read_text()
    assert "Zero-shot task accuracy" in report and "accuracy recovered over RTN" in report
    assert main(["eval", str(tmp_path / "run"), "--tasks", "lrqat_lambada", "--task-limit", "6"]) == 0
    tasks = RunDir(tmp_path / "run").read_result().tasks
    assert set(tasks["lrqat_merged"]) == {"lrqat_lambada"} or "lrqat_lambada" in tasks["lrqat_merged"]
    assert main(["eval", str(tmp_path / "missing")]) == 2


def test_the_compare_table_lists_each_methods_task_accuracy_beside_float_and_rtn():
    from lrqat.compare import compare_task_table

    summary = {"tasks_float": {"t": {"acc": 0.5}}, "tasks_rtn": {"t": {"acc": 0.3}},
               "methods": {"lrqat": {"tasks": {"t": {"acc": 0.45}}}, "gptq": {"tasks": {}}}}
    lines = compare_task_table(summary)
    assert "| float | 0.500 |" in lines and "| RTN | 0.300 |" in lines and "| LR-QAT | 0.450 |" in lines
    assert "| GPTQ | n/a |" in lines
    assert compare_task_table({"methods": {}}) == []
