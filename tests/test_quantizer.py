import pytest
import torch

from lrqat.quantizer import dequantize, fake_quant, pack_ints, quantize, round_ste, unpack_ints
from lrqat.ranges import lp_search_params, minmax_params
from lrqat.spec import QuantSpec

SPECS = [QuantSpec(bits=b, symmetric=sym, group_size=g) for b in (2, 3, 4, 8) for sym in (True, False) for g in (None, 16)]


@pytest.mark.parametrize("bits", range(2, 9))
def test_grid_ranges(bits):
    assert (QuantSpec(bits=bits).qmin, QuantSpec(bits=bits).qmax) == (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    assert (QuantSpec(bits=bits, symmetric=False).qmin, QuantSpec(bits=bits, symmetric=False).qmax) == (0, 2**bits - 1)


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_quantize_lands_on_grid_within_half_a_step(spec):
    w = torch.randn(8, 64)
    s, z = minmax_params(w, spec)
    q = quantize(w, s, z, spec)
    assert torch.equal(q, q.round()) and q.min() >= spec.qmin and q.max() <= spec.qmax
    g = 64 if spec.group_size is None else spec.group_size
    step = s.repeat_interleave(g, dim=1)
    assert ((dequantize(q, s, z) - w).abs() <= step / 2 + 1e-6).all()


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_dequantize_then_quantize_round_trips(spec):
    w = torch.randn(8, 64)
    s, z = minmax_params(w, spec)
    q = quantize(w, s, z, spec)
    assert torch.equal(quantize(dequantize(q, s, z), s, z, spec), q)


def test_minmax_maps_the_extremes_to_the_grid_ends():
    w = torch.randn(4, 32)
    sym = QuantSpec(bits=4)
    s, _ = minmax_params(w, sym)
    assert torch.allclose(w.abs().amax(dim=1, keepdim=True) / s, torch.full((4, 1), 7.0))
    asym = QuantSpec(bits=4, symmetric=False)
    s, z = minmax_params(w, asym)
    q = quantize(w, s, z, asym)
    assert (q.amin(dim=1) == 0).all() and (q.amax(dim=1) == 15).all()


@pytest.mark.parametrize("symmetric", [True, False])
def test_lp_search_beats_minmax_in_lp_error(symmetric):
    spec = QuantSpec(bits=3, symmetric=symmetric, group_size=32)
    w = torch.randn(16, 128) * torch.rand(16, 1)
    w[0, 0] = 8.0  # an outlier that min-max wastes range on
    def err(params):
        return (fake_quant(w, *params, spec) - w).abs().pow(4).sum()
    assert err(lp_search_params(w, spec)) < err(minmax_params(w, spec))


def test_group_scales_have_one_column_per_group():
    s, z = minmax_params(torch.randn(6, 64), QuantSpec(bits=4, symmetric=False, group_size=16))
    assert s.shape == (6, 4) and z.shape == (6, 4)


def test_round_ste_passes_gradient_unchanged():
    x = torch.tensor([0.2, 1.7, -2.5], requires_grad=True)
    y = round_ste(x)
    assert torch.equal(y, torch.round(x.detach()))
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones(3))


def test_fake_quant_gradient_is_zero_outside_the_clamp_range():
    spec = QuantSpec(bits=4)
    s = torch.ones(1, 1)
    w = torch.tensor([[0.3, 6.6, 20.0, -30.0]], requires_grad=True)
    fake_quant(w, s, None, spec).sum().backward()
    assert torch.equal(w.grad, torch.tensor([[1.0, 1.0, 0.0, 0.0]]))


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_int_packing_round_trips(spec):
    q = torch.randint(spec.qmin, spec.qmax + 1, (5, 32)).float()
    packed = pack_ints(q, spec)
    assert packed.dtype == torch.uint8
    assert packed.shape == ((5, 16) if spec.bits <= 4 else (5, 32))
    assert torch.equal(unpack_ints(packed, spec), q)
