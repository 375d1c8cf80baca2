"""Export a merged model as a plain float HF folder, for tools that know no quantized format."""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from lrqat.export.tensors import quant_layers, save_tokenizer
from lrqat.surgery import replace_module


def dequantized_model(model: nn.Module) -> nn.Module:
    """A copy of `model` whose `QuantLinear`s are `nn.Linear`s holding `s ⊙ (q − z)` in fp32."""
    model = copy.deepcopy(model)
    for name, layer in quant_layers(model):
        linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
        with torch.no_grad():
            linear.weight.copy_(layer.w_hat())
            if layer.bias is not None:
                linear.bias.copy_(layer.bias)
        replace_module(model, name, linear)
    return model


def save_dequantized(model: nn.Module, tokenizer: PreTrainedTokenizerBase | None, folder: Path) -> Path:
    """fp32, so the float model computes exactly what the integer model computes."""
    dequantized_model(model).save_pretrained(folder)
    if tokenizer is not None:
        save_tokenizer(tokenizer, folder)
    return folder
