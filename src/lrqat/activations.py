"""Activation and KV-cache quantization: LR-QAT's dynamic per-token quantizer, placed
where the paper places it, without re-implementing any decoder block.

The quantizer is asymmetric min–max per token (per token and head for Q/K/V), computed
on the fly, with a straight-through gradient and no learned parameters. Placements:
- the input of every quantized linear (q/k/v and gate/up read the norm outputs, o_proj
  the attention output, down_proj the MLP product), by a forward pre-hook
  (`InputQuantizer`), which also applies an online rotation (R4) where one is set;
- Q after RoPE (activation bits) and K, V as the cache holds them (K after RoPE; KV
  bits), by an attention function registered through transformers' attention interface
  (`lrqat_<inner>`), which wraps the model's own implementation (sdpa, eager) and also
  applies the online Q/K rotation R3.
Softmax, residuals, norms and embeddings stay float.

The pre-hooks are carried along when a layer is swapped (`surgery.replace_module`), so
they survive method surgery and merging; `install` is idempotent.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

from lrqat.errors import LrqatError
from lrqat.quantizer import round_ste

ACT_BITS = (16, 8, 4)
"""Activation and KV bit widths offered; 16 means not quantized (float)."""


_BYPASSED = False


@contextlib.contextmanager
def bypassed() -> Iterator[None]:
    """Within: every activation/KV quantizer passes values through (online rotations,
    being exact, still apply). For teacher passes of the student's own layers."""
    global _BYPASSED
    before, _BYPASSED = _BYPASSED, True
    try:
        yield
    finally:
        _BYPASSED = before


def fake_quantize_per_token(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Asymmetric min–max fake quantization over the last dimension, one grid per row
    (a token, or a token of one head). The ranges are detached; the gradient passes
    straight through the rounding, and is zero where the clamp binds (nowhere for
    min–max ranges, so the STE is the identity here)."""
    if bits >= 16 or _BYPASSED:
        return x
    levels = 2**bits - 1
    lo = x.detach().amin(dim=-1, keepdim=True).clamp(max=0)
    hi = x.detach().amax(dim=-1, keepdim=True).clamp(min=0)
    scale = ((hi - lo) / levels).clamp(min=torch.finfo(x.dtype).tiny * levels)
    zero = torch.round(-lo / scale)
    q = torch.clamp(round_ste(x / scale) + zero, 0, levels)
    return (q - zero) * scale


@dataclass(frozen=True)
class ActSpec:
    """Activation and KV-cache bit widths (16 = float). What a consumer of the merged
    model must apply at inference, so `quantization.json` records it."""

    bits: int = 16
    kv_bits: int = 16

    def validate(self) -> None:
        for flag, value in (("--act-bits", self.bits), ("--kv-bits", self.kv_bits)):
            if value not in ACT_BITS or isinstance(value, bool):
                raise LrqatError(f"{flag} {value!r} is not offered: choose one of {', '.join(map(str, ACT_BITS))} "
                                 "(16 = not quantized).")

    @property
    def active(self) -> bool:
        return self.bits < 16 or self.kv_bits < 16

    def describe(self) -> str:
        return f"A{self.bits} KV{self.kv_bits}"


class InputQuantizer:
    """A forward pre-hook on a linear: optionally rotate its input online (a fixed
    orthogonal transform whose inverse is merged into the weight), then fake-quantize it
    per token. Holds no reference to its module, so deep copies and swaps carry it."""

    def __init__(self, bits: int, rotate: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        self.bits = bits
        self.rotate = rotate

    def __call__(self, module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        x = args[0]
        if self.rotate is not None:
            x = self.rotate(x)
        return (fake_quantize_per_token(x, self.bits), *args[1:])


@dataclass
class AttentionQuantizer:
    """What the registered attention function does to Q, K and V of one attention module,
    before the model's own attention function (`inner`) runs."""

    inner: Callable
    query_bits: int = 16
    kv_bits: int = 16
    rotate: Callable[[torch.Tensor], torch.Tensor] | None = None  # R3, on the head dimension


ATTRIBUTE = "lrqat_attention"
PREFIX = "lrqat_"


def _quantized_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                         attention_mask: torch.Tensor | None, **kwargs: Any) -> tuple[torch.Tensor, Any]:
    quant: AttentionQuantizer = getattr(module, ATTRIBUTE)
    if quant.rotate is not None:  # R3: cancels in Q·Kᵀ, spreads the outliers of Q and K
        query, key = quant.rotate(query), quant.rotate(key)
    query = fake_quantize_per_token(query, quant.query_bits)
    key = fake_quantize_per_token(key, quant.kv_bits)
    value = fake_quantize_per_token(value, quant.kv_bits)
    return quant.inner(module, query, key, value, attention_mask, **kwargs)


def inner_attention(model: nn.Module, module: nn.Module, implementation: str) -> Callable:
    """The function the model's attention would call under `implementation`: sdpa (and
    the other registered kernels) from transformers' table, eager from the model's own
    modelling file."""
    if implementation in AttentionInterface._global_mapping:
        return AttentionInterface._global_mapping[implementation]
    if implementation == "eager":
        import sys

        eager = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
        if eager is not None:
            return eager
    raise LrqatError(f"attention implementation {implementation!r} of {type(model).__name__} cannot carry Q/K/V "
                     "quantization: load the model with sdpa (the default) or eager attention.")


def register_attention(implementation: str) -> str:
    """Register `lrqat_<implementation>` (Q/K/V quantization, then the module's own
    function) with the mask builder of `implementation`; return the new name."""
    name = PREFIX + implementation
    if name not in AttentionInterface._global_mapping:
        if implementation not in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping:
            raise LrqatError(f"attention implementation {implementation!r} has no mask builder to reuse: "
                             "load the model with sdpa (the default) or eager attention.")
        AttentionInterface.register(name, _quantized_attention)
        ALL_MASK_ATTENTION_FUNCTIONS.register(name, ALL_MASK_ATTENTION_FUNCTIONS[implementation])
    return name


def attention_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The attention modules of a decoder: those holding a q_proj (or a fused qkv_proj)."""
    return [(n, m) for n, m in model.named_modules()
            if hasattr(m, "o_proj") and (hasattr(m, "q_proj") or hasattr(m, "qkv_proj"))]


def remove(model: nn.Module) -> None:
    """Take every lrqat input quantizer and attention quantizer off `model`."""
    for module in model.modules():
        for key, hook in list(module._forward_pre_hooks.items()):
            if isinstance(hook, InputQuantizer):
                del module._forward_pre_hooks[key]
        if hasattr(module, ATTRIBUTE):
            delattr(module, ATTRIBUTE)
    config = getattr(model, "config", None)
    implementation = getattr(config, "_attn_implementation", None) or ""
    if implementation.startswith(PREFIX):
        config._attn_implementation = implementation[len(PREFIX):]


def install(model: nn.Module, act: ActSpec, linears: list[str],
            input_rotations: dict[str, Callable[[torch.Tensor], torch.Tensor]] | None = None,
            qk_rotation: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
    """Quantize the inputs of `linears` (qualified names) at `act.bits`, Q at `act.bits`
    and K/V at `act.kv_bits`; apply the online rotations given (`input_rotations` by
    layer name: R4; `qk_rotation`: R3). Replaces whatever `install` put there before."""
    act.validate()
    remove(model)
    input_rotations = input_rotations or {}
    for name in dict.fromkeys([*linears, *input_rotations]):
        rotate = input_rotations.get(name)
        if act.bits < 16 or rotate is not None:
            model.get_submodule(name).register_forward_pre_hook(InputQuantizer(act.bits, rotate))
    if act.active or qk_rotation is not None:
        config = model.config
        implementation = config._attn_implementation
        implementation = implementation.removeprefix(PREFIX)
        modules = attention_modules(model)
        if not modules:
            raise LrqatError(f"{type(model).__name__} has no attention module with q_proj/o_proj to quantize "
                             "Q/K/V in: use --kv-bits 16 and --act-bits 16 for this model.")
        inners = [inner_attention(model, module, implementation) for _, module in modules]
        config._attn_implementation = register_attention(implementation)
        for (_, module), inner in zip(modules, inners, strict=True):
            setattr(module, ATTRIBUTE, AttentionQuantizer(inner, act.bits, act.kv_bits, qk_rotation))


def placements(model: nn.Module) -> list[str]:
    """The quantized tensors of `model`, named: `LAYER:input` for a quantized linear
    input, `ATTN:query` / `ATTN:key` / `ATTN:value` for the attention's Q/K/V (with bits)."""
    names = []
    for name, module in model.named_modules():
        for hook in module._forward_pre_hooks.values():
            if isinstance(hook, InputQuantizer) and hook.bits < 16:
                names.append(f"{name}:input@{hook.bits}")
        quant = getattr(module, ATTRIBUTE, None)
        if isinstance(quant, AttentionQuantizer):
            for part, bits in (("query", quant.query_bits), ("key", quant.kv_bits), ("value", quant.kv_bits)):
                if bits < 16:
                    names.append(f"{name}:{part}@{bits}")
    return names
