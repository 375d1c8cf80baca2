"""Streaming load: the model built one tensor at a time from its checkpoint, and the float
and RTN perplexities computed one block at a time, equal the in-memory ones."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, Gemma2Config, Qwen2Config

from conftest import tiny_llama
from lrqat.errors import LrqatError
from lrqat.evaluate import perplexity
from lrqat.methods import DEFAULT_TARGETS, METHODS, STARTS, LayerStart, apply_method, calibrated_start
from lrqat.ranges import init_params
from lrqat.spec import LRQATSpec, PTQSpec, QuantSpec
from lrqat.streaming import Checkpoint, MethodBuilder, stream_model, streamed_perplexities, streamed_start
from lrqat.surgery import find_targets, init_ranges

W4 = QuantSpec(bits=4, symmetric=True, group_size=None)


def family(name: str):
    common = {"vocab_size": 96, "hidden_size": 48, "intermediate_size": 96, "num_hidden_layers": 3,
              "num_attention_heads": 4, "num_key_value_heads": 2}
    torch.manual_seed(0)
    if name == "llama":  # tied head
        return tiny_llama(layers=3)
    if name == "qwen2":  # q/k/v biases, untied head
        return AutoModelForCausalLM.from_config(Qwen2Config(**common, tie_word_embeddings=False)).eval()
    # scaled embeddings, soft-capped logits, alternating sliding-window layers
    config = Gemma2Config(**common, head_dim=12, sliding_window=4, final_logit_softcapping=5.0)
    return AutoModelForCausalLM.from_config(config).eval()


def saved(model, folder, shard: str | None = None):
    model.save_pretrained(folder, max_shard_size=shard or "5GB")
    return Checkpoint(folder)


@pytest.mark.parametrize("name", ["llama", "qwen2", "gemma2"])
def test_block_by_block_float_and_rtn_perplexities_equal_the_whole_models(tmp_path, name):
    model = family(name)
    checkpoint = saved(model, tmp_path, shard="60KB")  # several shards and an index
    assert (tmp_path / "model.safetensors.index.json").is_file()
    targets = [n for n, _ in find_targets(model, DEFAULT_TARGETS)]
    gen = torch.Generator().manual_seed(1)
    windows = {"eval": torch.randint(0, 96, (3, 12), generator=gen), "other": torch.randint(0, 96, (2, 9), generator=gen)}

    def rtn(_name, linear):
        return METHODS["rtn"].build(LayerStart(linear, W4, None, *init_params(linear.weight, W4, "lp"), None,
                                               torch.Generator(), "lp"))

    streamed = streamed_perplexities(checkpoint, model.config, torch.float32, targets, windows,
                                     {"float": None, "rtn": rtn})
    rtn_model = apply_method("rtn", family(name), W4, None, init_ranges(model, W4, DEFAULT_TARGETS))
    for set_name, ids in windows.items():
        assert streamed["float"][set_name].ppl == pytest.approx(perplexity(model, ids).ppl, rel=1e-6)
        assert streamed["rtn"][set_name].ppl == pytest.approx(perplexity(rtn_model, ids).ppl, rel=1e-6)
        assert streamed["rtn"][set_name].ppl != pytest.approx(streamed["float"][set_name].ppl, rel=1e-3)


@pytest.mark.parametrize("method", ["lrqat", "qat", "peqa", "float-lora"])
@pytest.mark.parametrize("name", ["llama", "qwen2"])
def test_streamed_model_equals_the_method_applied_in_memory(tmp_path, name, method):
    model = family(name)
    checkpoint = saved(model, tmp_path)
    spec = LRQATSpec(rank=4)
    targets = [n for n, _ in find_targets(model, DEFAULT_TARGETS)]
    generator = torch.Generator().manual_seed(3)

    def build(_name, linear):
        s0, z0 = init_params(linear.weight.detach(), W4, "lp")
        return METHODS[method].build(LayerStart(linear, W4, spec, s0, z0, None, generator, "lp"))

    streamed = stream_model(checkpoint, model.config, torch.float32, targets, build)
    reference = apply_method(method, family(name), W4, spec, init_ranges(model, W4, DEFAULT_TARGETS), seed=3)
    got, want = streamed.state_dict(), reference.state_dict()
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want), [k for k in want if not torch.equal(got[k], want[k])]
    assert [n for n, p in streamed.named_parameters() if p.requires_grad] == \
        [n for n, p in reference.named_parameters() if p.requires_grad]
    ids = torch.randint(0, 96, (2, 10))
    with torch.no_grad():
        assert torch.equal(streamed(ids).logits, reference(ids).logits)
    if model.config.tie_word_embeddings:
        assert streamed.lm_head.weight is streamed.model.embed_tokens.weight


@pytest.mark.parametrize(("start", "method"), [("gptq", "gptq"), ("gptq", "lrqat"), ("block-ap", "lrqat")])
@pytest.mark.parametrize("name", ["llama", "qwen2", "gemma2"])
def test_streamed_start_equals_the_start_in_memory_and_measures_its_model(tmp_path, name, start, method):
    """A calibrated start block by block from disk gives the in-memory start's integers and
    scales, the method's layers started from them, and the start's perplexity from hidden
    states it carried."""
    model = family(name)
    checkpoint = saved(model, tmp_path, shard="60KB")
    spec, ptq = LRQATSpec(rank=4), PTQSpec(init=start, blockap_epochs=1)
    targets = [n for n, _ in find_targets(model, DEFAULT_TARGETS)]
    calib = torch.randint(0, 96, (3, 16), generator=torch.Generator().manual_seed(2))
    windows = {"eval": torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(4))}

    def streamed(build):
        return streamed_start(checkpoint, model.config, torch.float32, targets, W4, calib,
                              STARTS[start].calibrator(W4, lambda _n, lin: init_params(lin.weight.detach(), W4, "lp"),
                                                       ptq, lambda _: None),
                              STARTS[start].float_path(ptq), build, windows)

    built, ppl = streamed(MethodBuilder(method, W4, spec, "lp", seed=3))
    ranges, integers = calibrated_start(start, model, W4, DEFAULT_TARGETS, init_ranges(model, W4, DEFAULT_TARGETS),
                                        calib, ptq, lambda _: None)
    reference = apply_method(method, family(name), W4, spec, ranges, seed=3, integers=integers)
    start_model = apply_method("gptq", family(name), W4, None, ranges, integers=integers)
    got, want = built.state_dict(), reference.state_dict()
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want), [k for k in want if not torch.equal(got[k], want[k])]
    assert ppl["eval"].ppl == pytest.approx(perplexity(start_model, windows["eval"]).ppl, rel=1e-6)
    baseline_only, again = streamed(None)
    assert baseline_only is None and again["eval"].ppl == ppl["eval"].ppl


def test_a_checkpoint_that_does_not_match_is_refused(tmp_path):
    with pytest.raises(LrqatError, match="no safetensors weights"):
        Checkpoint(tmp_path)
    model = family("llama")
    checkpoint = saved(model, tmp_path)
    bigger = tiny_llama(layers=4)
    targets = [n for n, _ in find_targets(bigger, DEFAULT_TARGETS)]
    with pytest.raises(LrqatError, match="has no tensor 'model.layers.3"):
        stream_model(checkpoint, bigger.config, torch.float32, targets, lambda _n, linear: linear)


def run_spec(model_dir, text_file, out, load, method="lrqat", **extra):
    from lrqat.spec import RunSpec

    raw = {"model": str(model_dir), "output": str(out), "method": method, "load": load,
           "quant": {"bits": 4, "group_size": None}, "lrqat": {"rank": 4},
           "train": {"steps": 2, "batch_size": 2, "seq_len": 32, "save_every": 0},
           "data": {"source": str(text_file), "eval_context": 64, "eval_tokens": 128, "eval_source": "sotu"}, **extra}
    return RunSpec.from_dict(raw)


GPTQ_START = {"ptq": {"init": "gptq", "calib_tokens": 96}}


BLOCKAP_START = {"ptq": {"init": "block-ap", "calib_tokens": 96, "blockap_epochs": 1, "gptq_baseline": True}}


@pytest.mark.parametrize(("method", "extra"), [("lrqat", {}), ("rtn", {}), ("lrqat", GPTQ_START),
                                               ("lrqat", {"ptq": {"gptq_baseline": True, "calib_tokens": 96}}),
                                               ("gptq", GPTQ_START), ("lrqat", BLOCKAP_START),
                                               ("block-ap", BLOCKAP_START)],
                         ids=["lrqat", "rtn", "lrqat-from-gptq", "lrqat-gptq-baseline", "gptq", "lrqat-from-block-ap",
                              "block-ap"])
def test_a_streamed_run_gives_the_in_memory_run_results_and_integers(tmp_path, tiny_model_dir, text_file, method,
                                                                      extra):
    from lrqat.export.native import load_quantized
    from lrqat.layers import QuantLinear
    from lrqat.pipeline import run_quantize

    results = {load: run_quantize(run_spec(tiny_model_dir, text_file, tmp_path / load, load, method, **extra),
                                  log=lambda _: None) for load in ("memory", "stream")}
    memory, stream = results["memory"], results["stream"]
    for key, value in memory.ppl.items():
        assert stream.ppl[key] == pytest.approx(value, rel=1e-6), key
    for key, value in memory.ppl_ood.items():
        assert stream.ppl_ood[key] == pytest.approx(value, rel=1e-6), key
    assert stream.rtn_tie_differences == memory.rtn_tie_differences
    assert stream.ppl.keys() == memory.ppl.keys() and ("gptq" in memory.ppl) == ("ptq" in extra)
    assert {"load", "setup", "save"} <= set(stream.phases)
    assert all(v["peak_rss_mb"] > 0 and v["seconds"] >= 0 for v in stream.phases.values())
    models = {load: load_quantized(tmp_path / load / "model") for load in results}
    layers = {load: {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)} for load, model in models.items()}
    assert layers["memory"].keys() == layers["stream"].keys() and layers["memory"]
    for name, layer in layers["memory"].items():
        assert torch.equal(layer.int_weight(), layers["stream"][name].int_weight()), name


@pytest.mark.parametrize(("extra", "flag"), [({"rotate": "hadamard"}, "--rotate hadamard"),
                                             ({"act": {"bits": 8}}, "--act-bits"),
                                             ({"train": {"loss": "kd", "teacher": "float"}}, "--teacher float")])
def test_what_streaming_cannot_do_yet_is_refused_by_name(tmp_path, extra, flag):
    from lrqat.spec import RunSpec

    with pytest.raises(LrqatError, match=f"--load stream does not combine with {flag}"):
        RunSpec.from_dict({"load": "stream", **extra}).validate()
