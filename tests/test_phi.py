import pytest
import torch

from lrqat.phi import PHI_FORMATS
from lrqat.spec import QuantSpec


def downcast(v, phi, spec):
    return PHI_FORMATS[phi].store(v, spec)


def upcast(stored, phi, spec):
    return PHI_FORMATS[phi].load(stored, spec)


def bytes_per_weight(phi, spec):
    return PHI_FORMATS[phi].bytes_per_weight(spec)


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


@pytest.mark.parametrize("phi", list(PHI_FORMATS))
@pytest.mark.parametrize("bits", [3, 4, 8])
def test_add_into_rounds_phi0_plus_the_update_as_the_definition_says(phi, bits):
    """`add_into` (the in-place pass of every step) equals the definition on the read-back
    Φ0: round(Φ0 + C), and for φ = int Φ0 + round(C)."""
    spec = QuantSpec(bits=bits)
    stored = downcast(grid_values(spec), phi, spec)
    C = torch.randn(8, 32) * 3
    expected = upcast(stored, phi, spec) + torch.round(C) if phi == "int" else torch.round(upcast(stored, phi, spec) + C)
    assert torch.equal(PHI_FORMATS[phi].add_into(C.clone(), stored, spec), expected)
