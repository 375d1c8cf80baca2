"""The real built-in model and corpus, with a short budget."""

import pytest

from lrqat.data import prepare_data
from lrqat.evaluate import perplexity
from lrqat.export.native import load_quantized
from lrqat.models import load_model
from lrqat.pipeline import run_quantize
from lrqat.spec import DataSpec, LRQATSpec, QuantSpec, RunSpec, TrainSpec

pytestmark = pytest.mark.slow


def test_lrqat_beats_rtn_on_the_real_model_and_merge_is_exact(tmp_path):
    spec = RunSpec(
        model="smollm2-135m",
        output=str(tmp_path / "run"),
        quant=QuantSpec(bits=4, symmetric=True, group_size=None, init="minmax"),
        lrqat=LRQATSpec(rank=16, phi="fixed8"),
        train=TrainSpec(steps=4, batch_size=2, seq_len=128, lr=2e-3, lr_scales=1e-4, warmup=0.0, save_every=0),
        data=DataSpec(source="brown", eval_context=256, eval_tokens=1024),
    )
    results = run_quantize(spec, log=lambda _: None)
    ppl = results["ppl"]
    assert ppl["float"] < ppl["ptq"]
    assert ppl["lrqat_merged"] < ppl["ptq"]
    assert abs(ppl["lrqat_merged"] - ppl["lrqat"]) / ppl["lrqat"] <= 1e-3
    assert results["eval_tokens"] == 4 * 255 and results["context"] == 256

    _, tokenizer = load_model("smollm2-135m")
    blocks = prepare_data(tokenizer, "brown", 128, 256, 1024, 0.1).eval
    reloaded = load_quantized(tmp_path / "run" / "model")
    assert perplexity(reloaded, blocks).ppl == pytest.approx(ppl["lrqat_merged"], rel=1e-6)
