"""The method table: every quantization method lrqat runs, one `Method` record each,
all on the same primitives, range setting and evaluation.

| method | trains | merged model |
|---|---|---|
| `rtn` | nothing | round-to-nearest on the range-init grid |
| `gptq` | nothing (uses calibration data) | GPTQ integers on the range-init grid |
| `block-ap` | weights and scales, block by block, to reproduce each float block (calibration data) | its integers and scales |
| `peqa` | scales only | RTN integers, learned scales |
| `naive-lora` | float LoRA beside a fake-quantized base | base + A·B re-quantized (lossy merge) |
| `qat` | every weight and scale (LSQ-style) | round(W/s) with learned scales |
| `lrqat` | A, B inside the rounding, and scales | clamp(round(Φ0 + A·B)) with learned scales |
| `float-lora` | A, B beside the *float* weights | none: the float model fine-tuned on the same data, the ceiling at equal data |

Adding a method is one `Method` entry here (`register`) and its layer class in
`layers/`: the CLI's choices, the learning-rate defaults, the report's names and
`lrqat compare` all read this table.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from lrqat.blockap import blockap_calibrator
from lrqat.blockwise import BlockCalibrator, BlockResult, calibrate_blockwise
from lrqat.gptq import Ranges, gptq_calibrator
from lrqat.layers import LoRALinear, LRQATLinear, NaiveLoRALinear, PEQALinear, QATLinear, QuantLinear
from lrqat.surgery import RangeParams, check_targets, find_targets, freeze, init_ranges, replace_module

if TYPE_CHECKING:
    from lrqat.spec import LRQATSpec, PTQSpec, QuantSpec

DEFAULT_TARGETS = r"\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)$"


@dataclass(frozen=True)
class LayerStart:
    """What a method's layer is built from: the float layer, the grid, the adapter
    settings, its range-init scales/zero points, and optionally integers chosen by GPTQ."""

    linear: nn.Linear
    quant: QuantSpec
    adapter: LRQATSpec | None  # None for methods without an adapter
    scales: torch.Tensor
    zeros: torch.Tensor | None
    integers: torch.Tensor | None
    generator: torch.Generator
    init: str  # the range setting, for layers that set ranges again when merging


@dataclass(frozen=True)
class Method:
    """One quantization method.

    `lr`/`lr_scales` are its default AdamW learning rates for `main` tensors (A/B, or
    the weights) and for the scales, sized for short budgets: LR-QAT's were tuned on the
    built-in model (README); the baselines share its scale rate, and their main rates
    move a float weight by a fraction of a grid step in tens of steps, as LR-QAT's
    adapter does. `--lr` / `--lr-scales` override them.
    """

    name: str
    label: str  # how reports name it
    trains: str  # what it trains, in words
    build: Callable[[LayerStart], nn.Module]
    trained: bool = True
    lr: float = 0.0
    lr_scales: float = 0.0
    # the calibrated start its layers are built from (`STARTS`: GPTQ's integers, Block-AP's
    # integers and scales); None: the range-init grid
    start: str | None = None
    adapter: bool = False  # builds a low-rank adapter of `LRQATSpec.rank`
    # produces an integer model; False for a reference that only fine-tunes the float model
    quantized: bool = True


METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Add `method` to the table (its name must be new)."""
    if method.name in METHODS:
        raise ValueError(f"method {method.name!r} is already registered")
    METHODS[method.name] = method
    return method


def _integer_layer(start: LayerStart) -> nn.Module:
    return QuantLinear.from_linear(start.linear, start.quant, start.scales, start.zeros, q=start.integers)


register(Method("rtn", "RTN", "nothing", _integer_layer, trained=False))
register(Method("gptq", "GPTQ", "nothing (calibration data)", _integer_layer, trained=False, start="gptq"))
register(Method("block-ap", "Block-AP", "weights and scales block by block (calibration data), then nothing",
                _integer_layer, trained=False, start="block-ap"))
register(Method("peqa", "PEQA", "scales", lambda t: PEQALinear(t.linear, t.quant, t.scales, t.zeros, t.integers),
                lr_scales=1e-4))
register(Method("naive-lora", "naive LoRA-QAT", "float A, B beside a fake-quantized base",
                lambda t: NaiveLoRALinear(t.linear, t.quant, t.adapter, t.scales, t.zeros, t.generator, t.init),
                lr=3e-4, adapter=True))
register(Method("qat", "full QAT", "every weight and scale", lambda t: QATLinear(t.linear, t.quant, t.scales, t.zeros),
                lr=1e-4, lr_scales=1e-4))
register(Method("lrqat", "LR-QAT", "A, B inside the rounding, and scales",
                lambda t: LRQATLinear(t.linear, t.quant, t.adapter, t.scales, t.zeros, grid_weight=t.integers,
                                      generator=t.generator),
                lr=3e-3, lr_scales=1e-4, adapter=True))
register(Method("float-lora", "float LoRA (reference)", "A, B beside the float weights (no quantization)",
                lambda t: LoRALinear(t.linear, t.adapter, t.generator), lr=3e-4, adapter=True, quantized=False))


def apply_method(
    method: str,
    model: nn.Module,
    quant: QuantSpec,
    adapter: LRQATSpec | None,
    ranges: RangeParams,
    seed: int = 0,
    integers: dict[str, torch.Tensor] | None = None,
    targets: str = DEFAULT_TARGETS,
    init: str = "lp",
) -> nn.Module:
    """Freeze `model` and swap its targets for the layers of `method`, in place.

    `integers` (from GPTQ) replace rounding as the integer start of `rtn`/`gptq`,
    `peqa` and `lrqat` (Φ0 = the GPTQ integers). The seed fixes the random init of
    every adapter, so a rebuilt model (on resume, or in another process) starts identical.
    """
    build = METHODS[method].build
    found = check_targets(model, quant, targets)
    freeze(model)
    generator = torch.Generator().manual_seed(seed)
    for name, linear in found:
        s0, z0 = ranges[name]
        grid = None if integers is None else integers[name]
        replace_module(model, name, build(LayerStart(linear, quant, adapter, s0, z0, grid, generator, init)))
    return model


Start = tuple[RangeParams, dict[str, torch.Tensor]]
"""A calibrated start: scales/zero points and integers for every target."""


@dataclass(frozen=True)
class CalibratedStart:
    """A start computed block by block on calibration data (`blockwise.calibrate_blockwise`),
    the same way in memory and from a streamed checkpoint: `calibrator(quant, ranges,
    ptq, log)` makes its block calibrator, `float_path(ptq)` says whether it needs the
    float blocks' outputs too."""

    calibrator: Callable[[QuantSpec, Ranges, PTQSpec, Callable[[str], None]], BlockCalibrator]
    float_path: Callable[[PTQSpec], bool]


STARTS: dict[str, CalibratedStart] = {
    "gptq": CalibratedStart(lambda quant, ranges, ptq, _log: gptq_calibrator(quant, ranges, ptq.damp, ptq.act_order,
                                                                             ptq.gptq_inputs),
                            lambda ptq: ptq.gptq_inputs == "float"),
    "block-ap": CalibratedStart(lambda quant, ranges, ptq, log: blockap_calibrator(
        quant, ranges, ptq.blockap_epochs, ptq.blockap_lr, ptq.blockap_lr_scales, log), lambda _ptq: True),
}
"""Calibrated starts by name (`--init NAME`, or a method's own `start`)."""


def calibrated_start(name: str, model: nn.Module, quant: QuantSpec, targets: str, ranges: RangeParams,
                     calib: torch.Tensor, ptq: PTQSpec, log: Callable[[str], None] = print) -> Start:
    """The start `name` for every target of the float `model` in memory (left unchanged),
    from the range-init grids `ranges`."""
    start = STARTS[name]
    found = check_targets(model, quant, targets)
    new_ranges: RangeParams = {}
    integers: dict[str, torch.Tensor] = {}

    def keep(_index: int, results: BlockResult) -> None:
        for target, (s, z, q) in results.items():
            new_ranges[target], integers[target] = (s, z), q

    was_training = model.training
    model.eval()
    try:
        calibrate_blockwise(model, [n for n, _ in found], quant, calib,
                            start.calibrator(quant, lambda target, _linear: ranges[target], ptq, log), keep,
                            float_path=start.float_path(ptq))
    finally:
        model.train(was_training)
    return new_ranges, integers


def apply_lrqat(
    model: nn.Module, quant: QuantSpec, lrqat: LRQATSpec, seed: int = 0, ranges: RangeParams | None = None,
    integers: dict[str, torch.Tensor] | None = None, targets: str = DEFAULT_TARGETS, init: str = "lp",
) -> nn.Module:
    """Freeze the model and swap every target linear for an `LRQATLinear`, in place
    (ranges by `init` unless given)."""
    ranges = ranges if ranges is not None else init_ranges(model, quant, targets, init)
    return apply_method("lrqat", model, quant, lrqat, ranges, seed, integers, targets, init)


def apply_lora(model: nn.Module, lrqat: LRQATSpec, seed: int = 0, targets: str = DEFAULT_TARGETS) -> nn.Module:
    """Plain LoRA on the targets, no quantization: the reference for memory and speed."""
    found = find_targets(model, targets)
    freeze(model)
    generator = torch.Generator().manual_seed(seed)
    for name, linear in found:
        replace_module(model, name, LoRALinear(linear, lrqat, generator))
    return model


def apply_rtn(model: nn.Module, quant: QuantSpec, targets: str = DEFAULT_TARGETS, ranges: RangeParams | None = None,
              init: str = "lp") -> nn.Module:
    """Round-to-nearest PTQ of every target linear, in place (the baseline and start point)."""
    ranges = ranges if ranges is not None else init_ranges(model, quant, targets, init)
    return apply_method("rtn", model, quant, None, ranges, targets=targets, init=init)
