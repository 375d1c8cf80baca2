"""bf16 compute: frozen tensors and activations in bfloat16, trainable tensors in fp32."""

import torch
from transformers import AutoModelForCausalLM

from lrqat.layers import LRQATLinear
from lrqat.methods import DEFAULT_TARGETS, apply_method
from lrqat.pipeline import run_quantize
from lrqat.spec import DataSpec, LRQATSpec, PTQSpec, QuantSpec, RunSpec, TrainSpec
from lrqat.surgery import init_ranges, merge_model
from lrqat.trainer import build_optimizer

SPEC = QuantSpec(bits=4, group_size=32)
LR = LRQATSpec(rank=4)


def test_bf16_model_trains_fp32_adapters_and_merges_exactly(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16)
    apply_method("lrqat", model, SPEC, LR, init_ranges(model, SPEC, DEFAULT_TARGETS, "minmax"), seed=0)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    ids = torch.randint(0, 1000, (2, 16))
    opt = build_optimizer(model, TrainSpec(lr=0.05, lr_scales=1e-3))  # scales stay positive
    for _ in range(3):
        loss = model(input_ids=ids, labels=ids).loss
        assert torch.isfinite(loss)
        loss.backward()
        assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in trainable)
        opt.step()
        opt.zero_grad()
    layer = next(m for m in model.modules() if isinstance(m, LRQATLinear))
    assert layer.A.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        before = model(ids).logits
        merge_model(model)
        after = model(ids).logits
    assert before.dtype == torch.bfloat16 and torch.equal(before, after)


def test_bf16_run_end_to_end(tmp_path, tiny_model_dir, text_file):
    spec = RunSpec(model=str(tiny_model_dir), output=str(tmp_path / "run"), dtype="bf16", quant=SPEC, ptq=PTQSpec(init="minmax"), lrqat=LR,
                   train=TrainSpec(steps=2, batch_size=2, seq_len=32, save_every=0),
                   data=DataSpec(source=str(text_file), eval_context=64, eval_tokens=128))
    results = run_quantize(spec, log=lambda _: None)
    assert results.ppl["lrqat_merged"] == results.ppl["lrqat"]
    assert results.spec["dtype"] == "bf16"
