import pytest
import torch

from lrqat.downcast import bytes_per_weight, downcast, upcast
from lrqat.spec import QuantSpec


def grid_values(spec: QuantSpec) -> torch.Tensor:
    return torch.empty(8, 32).uniform_(spec.qmin, spec.qmax)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
def test_fixed8_keeps_8_minus_b_fractional_bits(bits, symmetric):
    spec = QuantSpec(bits=bits, symmetric=symmetric)
    v = grid_values(spec)
    stored = downcast(v, "fixed8", spec)
    assert stored.dtype == torch.uint8 and stored.shape == v.shape
    unit = 2.0 ** -(8 - bits)
    assert ((upcast(stored, "fixed8", spec) - v).abs() <= unit / 2 + 1e-6).all()
    on_grid = torch.round(v / unit) * unit
    assert torch.equal(upcast(downcast(on_grid, "fixed8", spec), "fixed8", spec), on_grid)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
def test_int_keeps_only_the_rounded_integers(bits, symmetric):
    spec = QuantSpec(bits=bits, symmetric=symmetric)
    v = grid_values(spec)
    stored = downcast(v, "int", spec)
    assert stored.shape[1] == (16 if bits <= 4 else 32)
    assert torch.equal(upcast(stored, "int", spec), torch.round(v))


@pytest.mark.parametrize(("phi", "dtype"), [("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_float_formats_store_the_value_in_that_type(phi, dtype):
    spec = QuantSpec(bits=4)
    v = grid_values(spec)
    assert downcast(v, phi, spec).dtype == dtype
    assert torch.equal(upcast(downcast(v, phi, spec), phi, spec), v.to(dtype).float())


def test_bytes_per_weight_match_the_method_table():
    w4 = QuantSpec(bits=4)
    assert [bytes_per_weight(p, w4) for p in ("fp32", "bf16", "fixed8", "int")] == [4, 2, 1, 0.5]
    assert bytes_per_weight("int", QuantSpec(bits=8)) == 1
    v = grid_values(w4)
    for phi in ("fp32", "bf16", "fixed8", "int"):
        stored = downcast(v, phi, w4)
        assert stored.numel() * stored.element_size() == v.numel() * bytes_per_weight(phi, w4)
