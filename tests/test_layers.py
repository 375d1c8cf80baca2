import copy
import itertools

import pytest
import torch
from torch import nn

from lrqat.layers import LRQATLinear, QuantLinear
from lrqat.layers import lrqat as lrqat_module
from lrqat.layers.lrqat import _low_rank_grads as low_rank_grads
from lrqat.phi import PHI_FORMATS
from lrqat.quantizer import dequantize, round_ste
from lrqat.spec import LRQATSpec, QuantSpec, TrainSpec
from lrqat.trainer import build_optimizer

PHIS = ["fp32", "bf16", "fp16", "fixed8", "int"]
GRIDS = [QuantSpec(bits=b, symmetric=sym, group_size=g)
         for b, sym, g in itertools.product((3, 4), (True, False), (None, 16))]


def make_layer(spec: QuantSpec, phi: str = "fixed8", rank: int = 4, bias: bool = True) -> tuple[nn.Linear, LRQATLinear]:
    torch.manual_seed(0)
    linear = nn.Linear(64, 24, bias=bias)
    return linear, LRQATLinear(linear, spec, LRQATSpec(rank=rank, alpha=rank, phi=phi), init="minmax")


def train_a_little(layer: nn.Module, steps: int = 5) -> None:
    """A few large steps on A and B, by the trainer's optimizer; the scales at a rate that
    keeps them positive (merge refuses non-positive scales)."""
    opt = build_optimizer(layer, TrainSpec(lr=0.05, lr_scales=1e-3))
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
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("max_density", [0.0, 1.0], ids=["dense-G", "low-rank"])
def test_hand_written_backward_matches_autograd_through_the_definition(spec, phi, bias, max_density, monkeypatch):
    """Both backward forms, the dense `G = gᵀx` and the low-rank one with its correction
    at clamped weights (forced here, with many of them), give autograd's gradients."""
    monkeypatch.setattr(LRQATLinear, "sparse_correction_max_density", max_density)
    low_rank_calls = []
    monkeypatch.setattr(lrqat_module, "_low_rank_grads", lambda *a, **k: low_rank_calls.append(1) or low_rank_grads(*a, **k))
    _, layer = make_layer(spec, phi, bias=bias)
    layer.A.data.normal_(std=10.0)  # an update of a few grid steps: some weights leave the grid
    assert (~layer.grid_integers(layer.A, layer.B, with_mask=True)[1]).any()  # the clamp is active
    x = torch.randn(2, 5, 64, requires_grad=True)
    layer(x).pow(2).sum().backward()
    ours = [t.grad.clone() for t in (x, layer.A, layer.B, layer.s)]
    for t in (x, layer.A, layer.B, layer.s):
        t.grad = None
    torch.nn.functional.linear(x, layer.reference_w_hat(layer.A, layer.B, layer.s), layer.bias).pow(2).sum().backward()
    plain = [t.grad for t in (x, layer.A, layer.B, layer.s)]
    for a, b in zip(ours, plain):  # float32; the two forms sum in different orders
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * float(b.abs().max()))
    assert len(low_rank_calls) == (spec.group_size is None and not bias and max_density == 1.0)


@pytest.mark.parametrize("spec", GRIDS, ids=str)
def test_step_zero_equals_rtn_for_fp32_storage(spec):
    linear, layer = make_layer(spec, "fp32")
    rtn = QuantLinear.from_linear(linear, spec, init="minmax")
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
    spec = QuantSpec(bits=4)
    _, layer = make_layer(spec)
    before = layer.int_weight().clone()
    train_a_little(layer, steps=20)
    assert (layer.int_weight() != before).any()


def test_int_phi_adds_the_rounded_adapter_to_the_integers():
    spec = QuantSpec(bits=4)
    _, layer = make_layer(spec, "int")
    layer.A.data.normal_(std=3.0)
    C = layer.scaling * layer.A @ layer.B
    expected = torch.clamp(PHI_FORMATS["int"].load(layer.phi0, spec) + torch.round(C), spec.qmin, spec.qmax)
    assert torch.equal(layer.int_weight(), expected)
    assert torch.equal(round_ste(C), torch.round(C))


def test_merge_is_idempotent_and_keeps_bias():
    linear, layer = make_layer(QuantSpec(bits=4))
    train_a_little(layer)
    a, b = layer.merge(), layer.merge()
    assert torch.equal(a.qweight, b.qweight) and torch.equal(a.bias, linear.bias)



@pytest.mark.parametrize(("spec", "bias"), [(QuantSpec(bits=4), False),
                                            (QuantSpec(bits=3, symmetric=False, group_size=16), True)],
                         ids=["channel (low-rank backward)", "group asym (dense backward)"])
@pytest.mark.parametrize("phi", ["fixed8", "int"])
def test_fused_kernels_compute_what_the_plain_path_computes(spec, bias, phi):
    """`--fused` (torch.compile) gives the same outputs, bit for bit, and the same gradients."""
    _, plain = make_layer(spec, phi, bias=bias)
    plain.A.data.normal_(std=10.0)  # some weights leave the grid
    fused = copy.deepcopy(plain)
    fused.fused = True
    x = torch.randn(2, 5, 64)
    results = []
    for layer in (plain, fused):
        xi = x.clone().requires_grad_()
        y = layer(xi)
        y.pow(2).sum().backward()
        results.append((y.detach(), xi.grad, layer.A.grad, layer.B.grad, layer.s.grad))
    assert torch.equal(results[0][0], results[1][0])
    for a, b in zip(results[0][1:], results[1][1:]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * float(b.abs().max()))


@pytest.mark.parametrize(("corrupt", "message"), [(float("nan"), "not finite"), (-1.0, "not positive"),
                                                 (0.0, "not positive")])
def test_merge_refuses_broken_scales_naming_the_layer(tiny_model, corrupt, message):
    """A diverged run must not be saved as a model that silently computes garbage."""
    from lrqat.errors import LrqatError
    from lrqat.methods import apply_lrqat
    from lrqat.surgery import merge_model

    apply_lrqat(tiny_model, QuantSpec(bits=4), LRQATSpec(rank=4), init="minmax")
    with torch.no_grad():
        tiny_model.model.layers[1].mlp.down_proj.s[3, 0] = corrupt
    with pytest.raises(LrqatError, match=rf"layer model\.layers\.1\.mlp\.down_proj: .*{message}"):
        merge_model(tiny_model)


def test_quant_layer_refuses_integers_off_the_grid():
    from lrqat.errors import LrqatError

    spec = QuantSpec(bits=4)
    q = torch.zeros(4, 8)
    q[0, 0] = 8  # qmax is 7
    with pytest.raises(LrqatError, match="outside the grid"):
        QuantLinear(spec, q, torch.ones(4, 1), None, None)
