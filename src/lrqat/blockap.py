"""Block-AP (EfficientQAT, Chen et al. 2024): block-wise reconstruction of every quantized
weight and its scales, the start LR-QAT (or PEQA) trains on, or a method of its own.

Decoder block by decoder block, a copy of the block with its target linears made
fake-quantized (weights and scales trainable, straight-through rounding: `QATLinear`)
is trained to reproduce the float block's outputs on calibration tokens. As in
EfficientQAT, the quantized block's inputs are the outputs of the blocks already
quantized, its targets the float block's outputs on float inputs, so the error each
block leaves is what the next one sees. Only the block being trained carries gradients
and optimizer state. The result is integers and scales per target, used like GPTQ's:
`--init block-ap` (Φ0 = these integers, s₀ = these scales) or `--method block-ap`.

The block-by-block driver is GPTQ's (`blockwise.calibrate_blockwise`): the keyword
arguments each block is called with (position embeddings, masks) are captured from the
model's own forward pass, per block, so architectures whose blocks differ (sliding-window
layers) are reconstructed with their own; with `--load stream` each block is read from
disk when its turn comes.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from lrqat.blockwise import BlockCalibrator, BlockData, BlockResult, call_block
from lrqat.gptq import Ranges
from lrqat.layers import QATLinear
from lrqat.surgery import replace_module


def blockap_calibrator(quant, ranges: Ranges, epochs: int = 2, lr: float = 1e-5, lr_scales: float = 1e-4,
                       log: Callable[[str], None] = print) -> BlockCalibrator:
    """Block-AP as a block calibrator (`blockwise.calibrate_blockwise`, with the float
    path): a copy of the block, its targets fake-quantized on the grids `ranges` gives
    and trained (weights and scales) to reproduce the float block's outputs from the
    quantized blocks' outputs."""

    def calibrate(index: int, local: str, layer: nn.Module, linears: dict[str, nn.Linear], data: BlockData
                  ) -> BlockResult:
        block = copy.deepcopy(layer)
        for name, linear in linears.items():
            replace_module(block, name[len(local):], QATLinear(block.get_submodule(name[len(local):]), quant,
                                                               *ranges(name, linear)))
        for p in block.parameters():
            p.requires_grad_(False)
        qat = {name: block.get_submodule(name[len(local):]) for name in linears}
        weights = [m.weight for m in qat.values()]
        scales = [m.s for m in qat.values()]
        for p in (*weights, *scales):
            p.requires_grad_(True)
        floors = [0.01 * scale.detach().clone() for scale in scales]  # a scale stays positive and finite
        optimizer = torch.optim.AdamW([{"params": weights, "lr": lr}, {"params": scales, "lr": lr_scales}],
                                      weight_decay=0.0)
        block.train()
        generator = torch.Generator().manual_seed(index)
        before = reconstruction_error(block, data)
        with torch.enable_grad():
            for _ in range(epochs):
                for j in torch.randperm(len(data.quantized), generator=generator).tolist():
                    loss = sequence_error(block, data, j)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    with torch.no_grad():
                        for scale, floor in zip(scales, floors, strict=True):
                            torch.maximum(scale, floor, out=scale)
        log(f"block-ap block {index}: reconstruction MSE {before:.3g} -> {reconstruction_error(block, data):.3g}")
        return {name: (m.s.detach().clone(), None if m.zeros is None else m.zeros.clone(), m.int_weight().float())
                for name, m in qat.items()}

    return calibrate


@torch.no_grad()
def reconstruction_error(block: nn.Module, data: BlockData) -> float:
    """Mean squared error of the block's outputs against the float block's over every
    calibration sequence: before and after training the same sequences, so the two
    figures compare (single minibatch losses do not: sequences differ by a factor of
    ten where a few tokens carry outlier activations)."""
    errors = [sequence_error(block, data, j).item() for j in range(len(data.quantized))]
    return sum(errors) / len(errors)


def sequence_error(block: nn.Module, data: BlockData, j: int) -> torch.Tensor:
    """Block-AP's objective on calibration sequence `j`: the mean squared error of the
    block's output (on the quantized blocks' output) against the float block's."""
    return F.mse_loss(call_block(block, data.quantized[j], data.calls[j]), data.float_outputs[j])
