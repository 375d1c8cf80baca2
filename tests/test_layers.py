import itertools

import pytest
import torch
from torch import nn

from lrqat.downcast import upcast
from lrqat.layers import LRQATLinear, QuantLinear
from lrqat.quantizer import dequantize, round_ste
from lrqat.spec import LRQATSpec, QuantSpec

PHIS = ["fp32", "bf16", "fp16", "fixed8", "int"]
GRIDS = [QuantSpec(bits=b, symmetric=sym, group_size=g, init="minmax")
         for b, sym, g in itertools.product((3, 4), (True, False), (None, 16))]


def make_layer(spec: QuantSpec, phi: str = "fixed8", rank: int = 4, bias: bool = True) -> tuple[nn.Linear, LRQATLinear]:
    torch.manual_seed(0)
    linear = nn.Linear(64, 24, bias=bias)
    return linear, LRQATLinear(linear, spec, LRQATSpec(rank=rank, alpha=rank, phi=phi))


def train_a_little(layer: nn.Module, steps: int = 5) -> None:
    opt = torch.optim.Adam([p for p in layer.parameters() if p.requires_grad], lr=0.05)
    for _ in range(steps):
        x = torch.randn(3, 7, layer.in_features)
        layer(x).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()


def test_gradients_reach_only_A_B_and_s():
    _, layer = make_layer(QuantSpec(bits=4))
    layer.A.data.normal_()  # so that B receives a non-zero gradient too
    x = torch.randn(2, 5, 64, requires_grad=True)
    layer(x).sum().backward()
    trainable = {n for n, p in layer.named_parameters() if p.requires_grad}
    assert trainable == {"A", "B", "s"}
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in (layer.A, layer.B, layer.s))
    assert x.grad is not None
    assert all(not b.requires_grad for b in layer.buffers())


@pytest.mark.parametrize("spec", GRIDS, ids=str)
@pytest.mark.parametrize("phi", PHIS)
def test_hand_written_backward_matches_autograd_through_the_definition(spec, phi):
    _, layer = make_layer(spec, phi)
    layer.A.data.normal_(std=0.5)
    x = torch.randn(2, 5, 64, requires_grad=True)
    layer(x).pow(2).sum().backward()
    ours = [t.grad.clone() for t in (x, layer.A, layer.B, layer.s)]
    for t in (x, layer.A, layer.B, layer.s):
        t.grad = None
    torch.nn.functional.linear(x, layer.reference_weight(layer.A, layer.B, layer.s), layer.bias).pow(2).sum().backward()
    plain = [t.grad for t in (x, layer.A, layer.B, layer.s)]
    for a, b in zip(ours, plain):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("spec", GRIDS, ids=str)
def test_step_zero_equals_rtn_for_fp32_storage(spec):
    linear, layer = make_layer(spec, "fp32")
    rtn = QuantLinear.from_linear(linear, spec)
    x = torch.randn(4, 64)
    assert torch.equal(layer.int_weight(), rtn.int_weight())
    assert torch.equal(layer(x), rtn(x))


@pytest.mark.parametrize("spec", GRIDS, ids=str)
@pytest.mark.parametrize("phi", ["fixed8", "int", "bf16"])
def test_step_zero_equals_rounding_the_stored_base(spec, phi):
    """A = 0 at init, so the layer is the PTQ model of its stored Φ0 (METHOD.md §6)."""
    _, layer = make_layer(spec, phi)
    expected = dequantize(torch.round(layer.base()).clamp(spec.qmin, spec.qmax), layer.s, layer.zeros)
    x = torch.randn(4, 64)
    assert torch.equal(layer(x), torch.nn.functional.linear(x, expected, layer.bias))


@pytest.mark.parametrize("spec", GRIDS, ids=str)
@pytest.mark.parametrize("phi", PHIS)
def test_merged_layer_computes_exactly_what_training_computed(spec, phi):
    _, layer = make_layer(spec, phi)
    train_a_little(layer)
    x = torch.randn(3, 5, 64)
    with torch.no_grad():
        trained = layer(x)
    merged = layer.merge()
    assert isinstance(merged, QuantLinear)
    assert torch.equal(merged(x), trained)
    with torch.enable_grad():  # the training-path forward (custom autograd) gives the same values
        assert torch.equal(layer(x), trained)
    assert merged.int_weight().min() >= spec.qmin and merged.int_weight().max() <= spec.qmax


def test_training_moves_integers_off_the_start():
    spec = QuantSpec(bits=4, init="minmax")
    _, layer = make_layer(spec)
    before = layer.int_weight().clone()
    train_a_little(layer, steps=20)
    assert (layer.int_weight() != before).any()


def test_int_phi_adds_the_rounded_adapter_to_the_integers():
    spec = QuantSpec(bits=4, init="minmax")
    _, layer = make_layer(spec, "int")
    layer.A.data.normal_(std=3.0)
    C = layer.scaling * layer.A @ layer.B
    expected = torch.clamp(upcast(layer.phi, "int", spec) + torch.round(C), spec.qmin, spec.qmax)
    assert torch.equal(layer.int_weight(), expected)
    assert torch.equal(round_ste(C), torch.round(C))


def test_merge_is_idempotent_and_keeps_bias():
    linear, layer = make_layer(QuantSpec(bits=4))
    train_a_little(layer)
    a, b = layer.merge(), layer.merge()
    assert torch.equal(a.qweight, b.qweight) and torch.equal(a.bias, linear.bias)

