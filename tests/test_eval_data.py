"""Quantization recovery apart from domain adaptation: an evaluation corpus training
never reads (`--eval-data`), the float-LoRA ceiling, and G against GPTQ as well as RTN."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from lrqat.compare import render_compare, run_compare, shared_stages, summarize
from lrqat.data import held_out_blocks, load_documents
from lrqat.errors import LrqatError
from lrqat.pipeline import run_quantize
from lrqat.rundir import RunDir, gap_recovered
from lrqat.spec import RunSpec


@pytest.fixture(scope="module")
def other_text(tmp_path_factory):
    """A second corpus unlike the training one: numbered lists of other words."""
    words = ["ledger", "harbour", "copper", "violin", "meadow", "engine", "orchard", "glacier", "lantern", "pepper"]
    paragraphs = [" ".join(f"{words[(i + k) % len(words)]} {k}" for k in range(80)) for i in range(30)]
    path = tmp_path_factory.mktemp("other") / "other.txt"
    path.write_text("\n\n".join(paragraphs))
    return path


def spec_for(tiny_model_dir, text_file, out, **changes):
    raw = {"model": str(tiny_model_dir), "output": str(out), "quant": {"bits": 3, "group_size": 32},
           "ptq": {"init": "minmax", "calib_tokens": 64}, "lrqat": {"rank": 4},
           "train": {"steps": 2, "batch_size": 2, "seq_len": 32, "save_every": 0},
           "data": {"source": str(text_file), "eval_context": 64, "eval_tokens": 128}}
    for key, value in changes.items():
        section, _, name = key.partition(".")
        if name:
            raw.setdefault(section, {})[name] = value
        else:
            raw[section] = value
    return RunSpec.from_dict(raw)


def test_sotu_is_a_built_in_out_of_domain_corpus():
    docs = load_documents("sotu")
    assert len(docs) >= 240 and all(d.id.startswith("sotu/") for d in docs)
    assert sum(len(d.text) for d in docs) > 10_000_000


def test_held_out_blocks_take_every_document_in_a_fixed_mixed_order(tiny_model_dir, other_text):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    a = held_out_blocks(tokenizer, str(other_text), 64, 200)
    b = held_out_blocks(tokenizer, str(other_text), 64, 200)
    assert a.shape == (3, 64) and bool((a == b).all())


def test_runs_report_out_of_domain_perplexity_and_both_gaps(tmp_path, tiny_model_dir, text_file, other_text):
    result = run_quantize(spec_for(tiny_model_dir, text_file, tmp_path / "run", **{
        "data.eval_source": str(other_text), "data.eval_data_tokens": 192, "ptq.gptq_baseline": True}),
        log=lambda _: None)
    # the training-time model is scored out of domain through its merged model only (merging is exact)
    assert set(result.ppl_ood) == {"float", "rtn", "gptq", "lrqat_merged"}
    assert result.merged_vs_training_rel_diff < 1e-4
    assert result.ppl_ood["float"] != result.ppl["float"]  # another text, another perplexity
    gaps = result.gaps
    merged = result.ppl["lrqat_merged"]
    assert gaps["g_rtn"] == gap_recovered(result.ppl["float"], result.ppl["rtn"], merged)
    assert gaps["g_gptq"] == pytest.approx((result.ppl["gptq"] - merged) / (result.ppl["gptq"] - result.ppl["float"]))
    ood = result.ppl_ood
    assert gaps["ood_g_gptq"] == pytest.approx((ood["gptq"] - ood["lrqat_merged"]) / (ood["gptq"] - ood["float"]))
    saved = RunDir(tmp_path / "run").read_result()
    assert saved.gaps == gaps and saved.eval_data == str(other_text)
    # the out-of-domain set has its own size (3 windows of 64), the held-out split keeps --eval-tokens (2)
    assert saved.eval_data_tokens == 3 * 63 and saved.eval_tokens == 2 * 63
    report = (tmp_path / "run" / "report.md").read_text()
    assert "(out of domain)" in report and "Gap recovered over GPTQ" in report


@pytest.mark.parametrize("data, needle", [
    ({"eval_data_tokens": 4096}, "no --eval-data is given"),
    ({"eval_source": "sotu", "eval_context": 64, "eval_data_tokens": 32}, "fewer than one eval context"),
])
def test_a_bad_out_of_domain_size_is_refused_early(data, needle):
    with pytest.raises(LrqatError, match=needle):
        RunSpec.from_dict({"data": data}).validate()


def test_the_out_of_domain_size_defaults_to_the_held_out_one():
    data = RunSpec.from_dict({"data": {"eval_source": "sotu", "eval_tokens": 2048}}).data
    assert data.out_of_domain_tokens == 2048
    assert RunSpec.from_dict({"data": {"eval_source": "sotu", "eval_data_tokens": 65536}}).data.out_of_domain_tokens \
        == 65536


def test_a_gptq_baseline_is_not_the_start_of_lr_qat(tmp_path, tiny_model_dir, text_file):
    """--gptq-baseline only measures GPTQ: LR-QAT still starts from RTN (--init minmax)."""
    plain = run_quantize(spec_for(tiny_model_dir, text_file, tmp_path / "a"), log=lambda _: None)
    with_baseline = run_quantize(spec_for(tiny_model_dir, text_file, tmp_path / "b", **{"ptq.gptq_baseline": True}),
                                 log=lambda _: None)
    assert with_baseline.ppl["lrqat_merged"] == plain.ppl["lrqat_merged"]
    assert "gptq" in with_baseline.ppl and "gptq" not in plain.ppl


def test_float_lora_is_the_ceiling_at_equal_data_and_saves_no_integer_model(tmp_path, tiny_model_dir, text_file,
                                                                              other_text):
    result = run_quantize(spec_for(tiny_model_dir, text_file, tmp_path / "run", method="float-lora",
                                   **{"data.eval_source": str(other_text)}), log=lambda _: None)
    assert result.ppl["float-lora_merged"] == result.ppl["float-lora"]
    assert result.ppl_ood["float-lora_merged"] == result.ppl_ood["float-lora"]
    assert result.train["steps"] == 2 and result.model_dir == ""
    assert not (tmp_path / "run" / "model").exists()
    assert "the fine-tuned float model" in (tmp_path / "run" / "report.md").read_text()


def test_compare_reports_g_against_gptq_and_out_of_domain(tmp_path, tiny_model_dir, text_file, other_text):
    rows = {}
    for method in ("rtn", "gptq", "lrqat"):
        spec = spec_for(tiny_model_dir, text_file, tmp_path / method, method=method,
                        **{"data.eval_source": str(other_text)})
        rows[method] = run_quantize(spec, log=lambda _: None)
    summary = summarize(rows)
    gptq = rows["gptq"].ppl["gptq_merged"]
    assert summary["ppl_gptq"] == gptq
    assert summary["methods"]["gptq"]["g_gptq"] == 0.0
    lrqat = summary["methods"]["lrqat"]
    assert lrqat["g_gptq"] == gap_recovered(summary["ppl_float"], gptq, lrqat["ppl"])
    assert lrqat["ood_g_rtn"] == gap_recovered(summary["ppl_ood_float"], summary["ppl_ood_rtn"], lrqat["ppl_ood"])
    table = render_compare(summary)
    assert "G_GPTQ" in table and f"ppl {other_text}" in table


@pytest.mark.parametrize(("changes", "message"), [
    ({"data.eval_source": "SAME"}, "is the training corpus"),
    ({"data.eval_source": "/no/such/corpus.txt"}, "does not exist"),
    ({"method": "float-lora", "export": ["gguf"]}, "float reference"),
])
def test_bad_evaluation_settings_are_refused_early(tmp_path, tiny_model_dir, text_file, changes, message):
    changes = {k: str(text_file) if v == "SAME" else v for k, v in changes.items()}
    with pytest.raises(LrqatError, match=message):
        run_quantize(spec_for(tiny_model_dir, text_file, tmp_path / "run", **changes), log=lambda _: None)
    assert not (tmp_path / "run").exists()


def test_a_comparison_reuses_the_float_and_rtn_perplexities_another_one_measured(tmp_path, tiny_model_dir, text_file,
                                                                                other_text, capfd):
    """The quality benchmark's extra seeds and recipes are comparisons of their own:
    they take the float and RTN figures of the first instead of measuring them again."""
    first = run_compare(spec_for(tiny_model_dir, text_file, tmp_path / "first", **{"data.eval_source": str(other_text)}),
                        ["rtn"], log=lambda _: None)
    measured = shared_stages(tmp_path / "first")
    assert measured["ppl_float"] == first["ppl_float"] and measured["ood_ppl_rtn"] == first["ppl_ood_rtn"]
    capfd.readouterr()
    second = run_compare(spec_for(tiny_model_dir, text_file, tmp_path / "second", **{"data.eval_source": str(other_text),
                                                                                   "train.seed": 1}),
                         ["lrqat"], log=lambda _: None, shared=measured)
    output = capfd.readouterr()
    assert "perplexity float" not in output.out + output.err and "perplexity RTN" not in output.out + output.err
    assert "perplexity lrqat merged" in output.out + output.err  # the method itself is measured
    assert (second["ppl_float"], second["ppl_rtn"], second["ppl_ood_rtn"]) == \
        (first["ppl_float"], first["ppl_rtn"], first["ppl_ood_rtn"])


def test_resuming_a_finished_run_returns_its_results_unless_it_asks_for_more(tmp_path, tiny_model_dir, text_file):
    """A PTQ method keeps no checkpoint: `--resume` on a finished run of the same settings
    returns its results.json instead of recomputing; one that adds an export still runs."""
    spec = spec_for(tiny_model_dir, text_file, tmp_path / "run", method="gptq")
    first = run_quantize(spec, log=lambda _: None)
    results = RunDir(tmp_path / "run").results
    written = results.stat().st_mtime_ns
    said: list[str] = []
    again = run_quantize(spec, resume=True, log=said.append)
    assert again == RunDir(tmp_path / "run").read_result() and again.ppl == first.ppl
    assert results.stat().st_mtime_ns == written
    assert said and "reusing" in said[0] and len(said) == 1  # nothing was loaded or measured
    with_export = spec_for(tiny_model_dir, text_file, tmp_path / "run", method="gptq", export=["compressed-tensors"])
    exported = run_quantize(with_export, resume=True, log=lambda _: None)
    assert [e["format"] for e in exported.exports] == ["compressed-tensors"]
    assert exported.ppl["gptq_merged"] == first.ppl["gptq_merged"]
    assert run_quantize(with_export, resume=True, log=said.append).exports == exported.exports
    assert "reusing" in said[-1]
