import gc
import weakref

import pytest
import torch

from lrqat.errors import LrqatError
from lrqat.export.native import load_quantized, save_quantized
from lrqat.layers import LRQATLinear, QuantLinear
from lrqat.methods import DEFAULT_TARGETS, apply_lrqat, apply_rtn
from lrqat.spec import LRQATSpec, QuantSpec, TrainSpec
from lrqat.surgery import find_targets, merge_model, trainable_groups
from lrqat.trainer import build_optimizer

SPEC = QuantSpec(bits=4, group_size=16)
LR = LRQATSpec(rank=4)


def test_finds_the_seven_linears_of_each_llama_block(tiny_model):
    names = [n for n, _ in find_targets(tiny_model, DEFAULT_TARGETS)]
    assert len(names) == 7 * 2
    assert not any("lm_head" in n or "embed" in n for n in names)


def test_lrqat_swaps_targets_and_freezes_everything_else(tiny_model):
    apply_lrqat(tiny_model, SPEC, LR, init="minmax")
    layers = [m for m in tiny_model.modules() if isinstance(m, LRQATLinear)]
    assert len(layers) == 14
    trainable = {n.rsplit(".", 1)[-1] for n, p in tiny_model.named_parameters() if p.requires_grad}
    assert trainable == {"A", "B", "s"}
    assert not tiny_model.model.embed_tokens.weight.requires_grad
    assert not tiny_model.model.norm.weight.requires_grad
    groups = trainable_groups(tiny_model)
    assert len(groups["main"]) == 28 and len(groups["scales"]) == 14


def test_model_gradients_reach_only_adapters_and_scales(tiny_model):
    apply_lrqat(tiny_model, SPEC, LR, init="minmax")
    for layer in tiny_model.modules():
        if isinstance(layer, LRQATLinear):
            layer.A.data.normal_(std=0.1)
    ids = torch.randint(0, 128, (2, 16))
    tiny_model(input_ids=ids, labels=ids).loss.backward()
    for name, p in tiny_model.named_parameters():
        if name.rsplit(".", 1)[-1] in {"A", "B", "s"}:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name


def test_group_size_that_does_not_divide_is_refused_by_layer_name(tiny_model):
    with pytest.raises(LrqatError, match=r"group size 48 does not divide the input dimension 64 of layer .*q_proj"):
        apply_lrqat(tiny_model, QuantSpec(bits=4, group_size=48), LR)


def test_unmatched_pattern_is_refused(tiny_model):
    with pytest.raises(LrqatError, match="no linear layer"):
        apply_lrqat(tiny_model, SPEC, LR, targets="nothing_matches_this", init="minmax")


def test_merged_model_equals_training_model_and_survives_save_and_load(tiny_model, tmp_path):
    apply_lrqat(tiny_model, SPEC, LR, init="minmax")
    opt = build_optimizer(tiny_model, TrainSpec(lr=0.02, lr_scales=1e-4))  # scales stay positive
    for _ in range(4):
        ids = torch.randint(0, 128, (2, 16))
        tiny_model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    ids = torch.randint(0, 128, (2, 16))
    with torch.no_grad():
        trained = tiny_model(input_ids=ids).logits
        merge_model(tiny_model)
        assert not any(isinstance(m, LRQATLinear) for m in tiny_model.modules())
        assert torch.equal(tiny_model(input_ids=ids).logits, trained)
        save_quantized(tiny_model, None, tmp_path / "model", SPEC)
        reloaded = load_quantized(tmp_path / "model")
        assert sum(isinstance(m, QuantLinear) for m in reloaded.modules()) == 14
        assert torch.equal(reloaded(input_ids=ids).logits, trained)


def test_merge_frees_each_trained_layer_before_merging_the_next(tiny_model, monkeypatch):
    """Merging a 7B must not hold every Φ0 beside every integer layer: when a layer
    merges, no layer merged before it is alive any more."""
    apply_lrqat(tiny_model, SPEC, LR, init="minmax")
    alive = [weakref.ref(m) for m in tiny_model.modules() if isinstance(m, LRQATLinear)]
    seen = []
    merge = LRQATLinear.merge

    def observed_merge(self):
        seen.append(sum(ref() is not None for ref in alive))
        return merge(self)

    monkeypatch.setattr(LRQATLinear, "merge", observed_merge)
    merge_model(tiny_model)
    gc.collect()
    assert seen == list(range(len(alive), 0, -1))  # the layer merging now, and those after it
    assert all(ref() is None for ref in alive)


def test_rtn_model_uses_integer_layers(tiny_model):
    apply_rtn(tiny_model, SPEC, DEFAULT_TARGETS, init="minmax")
    layer = tiny_model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, QuantLinear) and layer.qweight.dtype == torch.uint8


def test_load_refuses_a_folder_that_is_not_a_merged_model(tmp_path):
    with pytest.raises(LrqatError, match="not a merged lrqat model"):
        load_quantized(tmp_path)
