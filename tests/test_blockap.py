"""Block-AP: block-wise reconstruction as a start for LR-QAT and as a method of its own."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_llama
from lrqat.blockwise import capture_block_calls
from lrqat.methods import DEFAULT_TARGETS, apply_method, calibrated_start
from lrqat.pipeline import run_quantize
from lrqat.spec import LRQATSpec, PTQSpec, QuantSpec, RunSpec
from lrqat.surgery import find_targets, init_ranges

W3 = QuantSpec(bits=3, symmetric=False, group_size=32)


def block_error(model, quantized, calib):
    """Mean squared error of the last block's output, quantized vs float model."""
    _, float_calls = capture_block_calls(model, model.model.layers, calib)
    outs = []
    for m in (model, quantized):
        handle = m.model.layers[-1].register_forward_hook(lambda _m, _a, out: outs.append(out))
        with torch.no_grad():
            m(input_ids=calib, use_cache=False)
        handle.remove()
    assert len(float_calls) == len(model.model.layers)
    return torch.mean((outs[0] - outs[1]) ** 2).item()


def test_block_ap_reconstructs_blocks_better_than_rtn_and_leaves_the_float_model_alone():
    model = tiny_llama(layers=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    targets = find_targets(model, DEFAULT_TARGETS)
    ranges = init_ranges(model, W3, DEFAULT_TARGETS, "minmax")
    calib = torch.randint(0, 128, (8, 32), generator=torch.Generator().manual_seed(0))
    logs = []
    ptq = PTQSpec(init="block-ap", blockap_epochs=4, blockap_lr=1e-4, blockap_lr_scales=1e-4)
    new_ranges, integers = calibrated_start("block-ap", model, W3, DEFAULT_TARGETS, ranges, calib, ptq, logs.append)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert set(integers) == {name for name, _ in targets} and len(logs) == 2
    for line in logs:  # each block's error over all its calibration sequences, before -> after training
        before_mse, after_mse = (float(x) for x in line.rsplit(" ", 3)[1::2])
        assert after_mse < before_mse, line
    for name, q in integers.items():
        assert q.min() >= W3.qmin and q.max() <= W3.qmax and torch.equal(q, q.round())
        assert (new_ranges[name][0] > 0).all() and not torch.equal(new_ranges[name][0], ranges[name][0])
    rtn = apply_method("rtn", tiny_llama(layers=2), W3, None, ranges)
    blockap = apply_method("block-ap", tiny_llama(layers=2), W3, None, new_ranges, integers=integers)
    assert block_error(model, blockap, calib) < block_error(model, rtn, calib)


def test_lr_qat_from_block_ap_starts_exactly_at_the_block_ap_model():
    model = tiny_llama(layers=2)
    ranges = init_ranges(model, W3, DEFAULT_TARGETS, "minmax")
    calib = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(1))
    new_ranges, integers = calibrated_start("block-ap", model, W3, DEFAULT_TARGETS, ranges, calib,
                                            PTQSpec(init="block-ap", blockap_epochs=1), lambda _: None)
    ids = torch.randint(0, 128, (2, 16))
    with torch.no_grad():
        start = apply_method("block-ap", tiny_llama(layers=2), W3, None, new_ranges, integers=integers)(ids).logits
        lrqat = apply_method("lrqat", tiny_llama(layers=2), W3, LRQATSpec(rank=4, phi="fp32"), new_ranges,
                             integers=integers)(ids).logits
    assert torch.equal(start, lrqat)  # A starts at zero: step 0 is the start


@pytest.mark.parametrize("method", ["block-ap", "lrqat"])
def test_block_ap_runs_as_a_method_and_as_an_init(tmp_path, tiny_model_dir, text_file, method):
    raw = {"model": str(tiny_model_dir), "output": str(tmp_path / "run"), "method": method,
           "quant": {"bits": 3, "symmetric": False, "group_size": 32},
           "ptq": {"init": "block-ap", "calib_tokens": 128, "blockap_epochs": 1}, "lrqat": {"rank": 4},
           "train": {"steps": 2, "batch_size": 2, "seq_len": 32, "save_every": 0},
           "data": {"source": str(text_file), "eval_context": 64, "eval_tokens": 128}}
    result = run_quantize(RunSpec.from_dict(raw), log=lambda _: None)
    assert "block-ap" in result.ppl
    if method == "lrqat":
        assert result.ppl["ptq"] == result.ppl["block-ap"]
        assert result.ppl["lrqat_merged"] == pytest.approx(result.ppl["lrqat"], rel=1e-4)
        assert "Block-AP, the PTQ start" in (tmp_path / "run" / "report.md").read_text()
    else:
        assert result.ppl["block-ap_merged"] == result.ppl["block-ap"]
