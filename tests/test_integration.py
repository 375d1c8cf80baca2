"""The real built-in model and corpus, with a short budget."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from lrqat.blocks import prepare_data
from lrqat.evaluate import llama_cpp_perplexity, perplexity
from lrqat.export.formats import export
from lrqat.export.native import load_quantized
from lrqat.export.tensors import quant_layers
from lrqat.models import load_model
from lrqat.pipeline import run_quantize
from lrqat.spec import DataSpec, LRQATSpec, QuantSpec, RunSpec, TrainSpec

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def real_run(tmp_path_factory):
    """Four LR-QAT steps on the built-in model at W4 per-channel, merged and saved."""
    out = tmp_path_factory.mktemp("real") / "run"
    spec = RunSpec(
        model="smollm2-135m",
        output=str(out),
        quant=QuantSpec(bits=4, symmetric=True, group_size=None),
        lrqat=LRQATSpec(rank=16, phi="fixed8"),
        train=TrainSpec(steps=4, batch_size=2, seq_len=128, lr=2e-3, lr_scales=1e-4, warmup=0.0, save_every=0),
        data=DataSpec(source="brown", eval_context=256, eval_tokens=1024),
    )
    results = run_quantize(spec, log=lambda _: None)
    _, tokenizer = load_model("smollm2-135m")
    blocks = prepare_data(tokenizer, "brown", 128, 256, 1024, 0.1).eval
    return out, results, blocks


def test_lrqat_beats_rtn_on_the_real_model_and_merge_is_exact(real_run):
    out, results, blocks = real_run
    ppl = results.ppl
    assert ppl["float"] < ppl["ptq"]
    assert ppl["lrqat_merged"] < ppl["ptq"]
    assert abs(ppl["lrqat_merged"] - ppl["lrqat"]) / ppl["lrqat"] <= 1e-3
    assert results.eval_tokens == 4 * 255 and results.context == 256
    reloaded = load_quantized(out / "model")
    assert perplexity(reloaded, blocks).ppl == pytest.approx(ppl["lrqat_merged"], rel=1e-6)


def test_transformers_runs_the_compressed_tensors_export_of_the_real_model(real_run):
    out, results, blocks = real_run
    report = export(out, "compressed-tensors")
    theirs = AutoModelForCausalLM.from_pretrained(report["path"], dtype=torch.float32)
    ours = load_quantized(out / "model")
    with torch.no_grad():
        a, b = ours(blocks[:1]).logits, theirs(blocks[:1]).logits
    assert ((a - b).abs().max() / a.abs().max()).item() <= 1e-3
    assert perplexity(theirs, blocks).ppl == pytest.approx(results.ppl["lrqat_merged"], rel=1e-3)
    assert report["bits_per_quantized_weight"] < 4.1


def test_gguf_export_of_the_real_model_is_read_back_exactly_and_runs_in_llama_cpp(real_run):
    out, results, blocks = real_run
    report = export(out, "gguf")
    assert report["block_type"] == "Q4_0" and report["float_tensor_types"] == {"Q8_0": 1, "F32": 61}
    assert report["ratio_to_fp32"] < 0.2
    theirs = AutoModelForCausalLM.from_pretrained(out / "export" / "gguf", gguf_file="model.gguf", dtype=torch.float32)
    state = theirs.state_dict()
    ours = load_quantized(out / "model")
    for name, layer in quant_layers(ours):
        expected = layer.int_weight() * layer.scales.half().float()  # per-channel: scales (out, 1)
        assert torch.equal(state[f"{name}.weight"], expected)
    ppl_ours = results.ppl["lrqat_merged"]
    assert perplexity(theirs, blocks).ppl == pytest.approx(ppl_ours, rel=5e-3)
    assert llama_cpp_perplexity(report["path"], blocks).ppl == pytest.approx(ppl_ours, rel=0.02)
