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

The keyword arguments each block is called with (position embeddings, masks) are
captured from the model's own forward pass, per block, so architectures whose blocks
differ (sliding-window layers) are reconstructed with their own.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from lrqat.blockwise import call_block, capture_block_calls, decoder_layers
from lrqat.layers import QATLinear
from lrqat.surgery import RangeParams, replace_module


def block_ap(model: nn.Module, quant, targets: list[tuple[str, nn.Linear]], ranges: RangeParams,
             calib: torch.Tensor, epochs: int = 2, lr: float = 1e-5, lr_scales: float = 1e-4,
             log: Callable[[str], None] = print) -> tuple[RangeParams, dict[str, torch.Tensor]]:
    """Block-AP over every block holding targets of the float `model` (left unchanged).

    Returns the learned scales/zero points and the integers of every target."""
    names = [name for name, _ in targets]
    prefix, layers = decoder_layers(model, names)
    was_training = model.training
    model.eval()
    q_inputs, calls = capture_block_calls(model, layers, calib)
    fp_inputs = [x.clone() for x in q_inputs]
    new_ranges: RangeParams = {}
    integers: dict[str, torch.Tensor] = {}
    for index, layer in enumerate(layers):
        local = [n for n in names if n.startswith(f"{prefix}.{index}.")]
        with torch.no_grad():
            fp_outputs = [call_block(layer, x, kw) for x, kw in zip(fp_inputs, calls[index], strict=True)]
        if not local:
            q_inputs, fp_inputs = fp_outputs, fp_outputs
            continue
        block = copy.deepcopy(layer)
        for name in local:
            rel = name[len(f"{prefix}.{index}."):]
            linear = block.get_submodule(rel)
            replace_module(block, rel, QATLinear(linear, quant, *ranges[name]))
        for p in block.parameters():
            p.requires_grad_(False)
        qat = {name: block.get_submodule(name[len(f"{prefix}.{index}."):]) for name in local}
        weights = [m.weight for m in qat.values()]
        scales = [m.s for m in qat.values()]
        for p in (*weights, *scales):
            p.requires_grad_(True)
        floors = [0.01 * scale.detach().clone() for scale in scales]  # a scale stays positive and finite
        optimizer = torch.optim.AdamW([{"params": weights, "lr": lr}, {"params": scales, "lr": lr_scales}],
                                      weight_decay=0.0)
        block.train()
        generator = torch.Generator().manual_seed(index)
        first = last = None
        for _ in range(epochs):
            for j in torch.randperm(len(q_inputs), generator=generator).tolist():
                loss = F.mse_loss(call_block(block, q_inputs[j], calls[index][j]), fp_outputs[j])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                with torch.no_grad():
                    for scale, floor in zip(scales, floors, strict=True):
                        torch.maximum(scale, floor, out=scale)
                first = loss.item() if first is None else first
                last = loss.item()
        block.eval()
        with torch.no_grad():
            for name, module in qat.items():
                new_ranges[name] = (module.s.detach().clone(), None if module.zeros is None else module.zeros.clone())
                integers[name] = module.int_weight().float()
            q_inputs = [call_block(block, x, kw) for x, kw in zip(q_inputs, calls[index], strict=True)]
        fp_inputs = fp_outputs
        log(f"block-ap block {index}: reconstruction MSE {first:.3g} -> {last:.3g}")
        del block, optimizer
    model.train(was_training)
    return new_ranges, integers
