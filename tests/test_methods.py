import copy

import pytest
import torch

from conftest import tiny_llama
from lrqat.blockwise import capture_block_calls
from lrqat.gptq import GPTQ_INPUTS, block_hessians, gptq_quantize
from lrqat.layers import LRQATLinear, NaiveLoRALinear, PEQALinear, QATLinear, QuantLinear
from lrqat.methods import DEFAULT_TARGETS, apply_method, calibrated_start
from lrqat.quantizer import dequantize, quantize
from lrqat.ranges import lp_search_params
from lrqat.spec import LRQATSpec, PTQSpec, QuantSpec, TrainSpec
from lrqat.surgery import init_ranges, merge_model
from lrqat.trainer import build_optimizer

SPEC = QuantSpec(bits=4, group_size=16)
LR = LRQATSpec(rank=4)
# which parameter names each method trains (last component of the name)
TRAINS = {"rtn": set(), "gptq": set(), "peqa": {"s"}, "naive-lora": {"A", "B"}, "qat": {"weight", "s"},
          "lrqat": {"A", "B", "s"}}
LAYER = {"rtn": QuantLinear, "gptq": QuantLinear, "peqa": PEQALinear, "naive-lora": NaiveLoRALinear,
         "qat": QATLinear, "lrqat": LRQATLinear}


def prepared(model, method):
    ranges = init_ranges(model, SPEC, DEFAULT_TARGETS, "minmax")
    integers = None
    if method == "gptq":
        integers = gptq_start(model, SPEC, DEFAULT_TARGETS, ranges, torch.randint(0, 128, (4, 32)))
    return apply_method(method, model, SPEC, LR, ranges, integers=integers, init="minmax")


def train_steps(model, steps=4):
    """Large steps on the main tensors by the trainer's optimizer; the scales at a rate
    that keeps them positive (merge refuses non-positive scales)."""
    opt = build_optimizer(model, TrainSpec(lr=0.02, lr_scales=1e-4))
    for _ in range(steps):
        ids = torch.randint(0, 128, (2, 16))
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()


@pytest.mark.parametrize("method", list(TRAINS))
def test_each_method_trains_exactly_its_tensors(tiny_model, method):
    model = prepared(tiny_model, method)
    assert all(isinstance(m, LAYER[method]) for _, m in find_targets_any(model))
    for layer in model.modules():
        if isinstance(layer, (LRQATLinear, NaiveLoRALinear)) and layer.A.requires_grad:
            layer.A.data.normal_(std=0.1)  # so B's gradient is not zero at the start
    ids = torch.randint(0, 128, (2, 16))
    loss = model(input_ids=ids, labels=ids).loss
    if TRAINS[method]:
        loss.backward()
    expected = {f"{target}.{p}" for target, _ in find_targets_any(model) for p in TRAINS[method]}
    for name, p in model.named_parameters():
        if name in expected:
            assert p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert not p.requires_grad and p.grad is None, name
    assert expected <= {n for n, _ in model.named_parameters()}


@pytest.mark.parametrize("method", ["rtn", "gptq", "peqa", "qat", "lrqat"])
def test_merged_model_computes_what_training_computed(tiny_model, method):
    model = prepared(tiny_model, method)
    if TRAINS[method]:
        train_steps(model)
    ids = torch.randint(0, 128, (2, 16))
    with torch.no_grad():
        trained = model(input_ids=ids).logits
        merge_model(model)
        assert all(isinstance(m, QuantLinear) for _, m in find_targets_any(model))
        assert torch.equal(model(input_ids=ids).logits, trained)


def test_naive_lora_merge_loses_what_the_adapter_learned(tiny_model):
    """The float adapter is rounded away at merge: the deployed model differs from training."""
    model = prepared(tiny_model, "naive-lora")
    train_steps(model, steps=8)
    ids = torch.randint(0, 128, (2, 16))
    with torch.no_grad():
        trained = model(input_ids=ids).logits
        merge_model(model)
        assert not torch.equal(model(input_ids=ids).logits, trained)


def test_peqa_keeps_the_rtn_integers(tiny_model):
    rtn = prepared(copy.deepcopy(tiny_model), "rtn")
    peqa = prepared(tiny_model, "peqa")
    train_steps(peqa)
    merge_model(peqa)
    for (_, a), (_, b) in zip(find_targets_any(rtn), find_targets_any(peqa)):
        assert torch.equal(a.qweight, b.qweight)
        assert not torch.equal(a.scales, b.scales)


@pytest.mark.parametrize("spec", [QuantSpec(bits=4), QuantSpec(bits=3, symmetric=False, group_size=32)], ids=str)
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_reconstructs_a_layer_better_than_rtn(spec, act_order):
    torch.manual_seed(0)
    W = torch.randn(48, 128)
    X = torch.randn(128, 1024) * torch.linspace(0.1, 3.0, 128).unsqueeze(1)
    X = X + 0.7 * X.roll(1, dims=0)  # correlated input features, as in real activations
    s, z = lp_search_params(W, spec)
    q_gptq = gptq_quantize(W, X @ X.T, s, z, spec, act_order=act_order)
    assert torch.equal(q_gptq, q_gptq.round()) and q_gptq.min() >= spec.qmin and q_gptq.max() <= spec.qmax

    def error(q):
        return ((W - dequantize(q, s, z)) @ X).pow(2).sum()

    assert error(q_gptq) < 0.9 * error(quantize(W, s, z, spec))


def test_hessians_are_collected_from_the_layer_inputs(tiny_model):
    layer = tiny_model.model.layers[0]
    linears = {"q": layer.self_attn.q_proj, "down": layer.mlp.down_proj}
    calib = torch.randint(0, 128, (3, 8))
    inputs, calls = capture_block_calls(tiny_model, tiny_model.model.layers, calib)
    seen = {name: [] for name in linears}
    handles = [lin.register_forward_hook(lambda m, i, o, n=name: seen[n].append(i[0].reshape(-1, i[0].shape[-1])))
               for name, lin in linears.items()]
    with torch.no_grad():
        tiny_model(input_ids=calib)  # the whole model: what the block sees inside it
    for handle in handles:
        handle.remove()
    hessians = block_hessians(layer, linears, inputs, calls[0])
    for name in linears:
        X = torch.cat(seen[name])
        torch.testing.assert_close(hessians[name], 2 * X.T @ X / X.shape[0], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("inputs", GPTQ_INPUTS)
def test_gptq_calibrates_each_block_on_the_inputs_it_is_asked_for(inputs):
    """`quantized`: block 1's Hessians come from the GPTQ-quantized block 0's outputs (as in
    the GPTQ model itself); `float`: from the float model's. Block 0 sees the same in both."""
    model = tiny_llama(layers=2)
    ranges = init_ranges(model, SPEC, DEFAULT_TARGETS, "minmax")
    calib = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(5))
    integers = gptq_start(model, SPEC, DEFAULT_TARGETS, ranges, calib, inputs=inputs)
    probe = "model.layers.1.self_attn.q_proj"  # reads the block's input through its norm only
    source = apply_method("gptq", copy.deepcopy(model), SPEC, None, ranges, integers=integers) \
        if inputs == "quantized" else model
    seen = []
    handle = source.get_submodule(probe).register_forward_hook(
        lambda m, i, o: seen.append(i[0].reshape(-1, i[0].shape[-1])))
    with torch.no_grad():
        for row in calib:
            source(input_ids=row[None])
    handle.remove()
    X = torch.cat(seen)
    expected = gptq_quantize(model.get_submodule(probe).weight, 2 * X.T @ X / X.shape[0], *ranges[probe], SPEC, act_order=True)
    assert torch.equal(integers[probe], expected)
    other = gptq_start(model, SPEC, DEFAULT_TARGETS, ranges, calib,
                       inputs=next(i for i in GPTQ_INPUTS if i != inputs))
    first = "model.layers.0.self_attn.q_proj"
    assert torch.equal(integers[first], other[first]) and not torch.equal(integers[probe], other[probe])


def gptq_start(model, quant, targets, ranges, calib, inputs="quantized"):
    """GPTQ's integers for every target (the start `--init gptq` computes)."""
    return calibrated_start("gptq", model, quant, targets, ranges, calib, PTQSpec(init="gptq", gptq_inputs=inputs))[1]


def find_targets_any(model):
    """The target slots whatever layer type now fills them."""
    return [(n, m) for n, m in model.named_modules() if n.endswith(("q_proj", "k_proj", "v_proj", "o_proj",
                                                                    "gate_proj", "up_proj", "down_proj"))]


@pytest.mark.parametrize("phi", ["fixed8", "int"])
def test_lrqat_from_gptq_starts_exactly_at_the_gptq_model(tiny_model, phi):
    """--init gptq: Φ0 = GPTQ's integers, s0 = its scales, so step 0 is the GPTQ model."""
    ranges = init_ranges(tiny_model, SPEC, DEFAULT_TARGETS, "minmax")
    integers = gptq_start(tiny_model, SPEC, DEFAULT_TARGETS, ranges, torch.randint(0, 128, (4, 32)))
    gptq_model = apply_method("gptq", copy.deepcopy(tiny_model), SPEC, LR, ranges, integers=integers)
    lrqat_model = apply_method("lrqat", tiny_model, SPEC, LRQATSpec(rank=4, phi=phi), ranges, integers=integers)
    for (name, a), (_, b) in zip(find_targets_any(gptq_model), find_targets_any(lrqat_model)):
        assert torch.equal(a.int_weight(), b.int_weight()), name
    ids = torch.randint(0, 128, (2, 16))
    with torch.no_grad():
        assert torch.equal(gptq_model(input_ids=ids).logits, lrqat_model(input_ids=ids).logits)
