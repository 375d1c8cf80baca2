"""Hadamard rotations of a decoder (QuaRot's computational invariance), before any
quantization sees the weights.

An RMSNorm commutes with an orthogonal Q once its weight is folded into the linears
that read it, so the residual stream can be rotated: `h' = h·Q1`. The merged rotations
leave a plain model of the same architecture with the same function:
- R1 (randomised Hadamard, hidden size): embeddings `E·Q1`; every linear reading the
  stream `W·diag(g)·Q1` (norm folded); every linear writing it `Q1ᵀ·W`; the head
  `W·diag(g)·Q1` (a tied head is untied: the folded norm makes it differ from E).
- R2 (randomised Hadamard, head dimension): each head's V rows `Q2ᵀ·W_v` and the
  matching o_proj columns `W_o·Q2`; attention is linear in V, so it cancels.
Online rotations, where no weight can absorb them (applied at every forward):
- R4 (Hadamard, intermediate size): down_proj's input `x·Q4`, with `W_down·Q4` merged;
- R3 (Hadamard, head dimension): Q and K after RoPE, `q·Q3`, `k·Q3`: cancels in Q·Kᵀ.
They are applied only where an online quantizer benefits (R4 with activation bits < 16,
R3 with KV bits < 16), so a weight-only rotated model stays a plain model that any
engine loads.

Supported layouts: decoders whose blocks hold q/k/v/o_proj, gate/up/down_proj and
exactly two RMSNorms (input_layernorm, post_attention_layernorm): Llama, Mistral,
Qwen2/2.5, Qwen3 (its q/k norms act after the projections and are untouched). Others
(Gemma's norms after each sub-block, Phi-3's fused projections) are refused by name.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from lrqat.errors import LrqatError
from lrqat.hadamard import HadamardTransform, factorize

ROTATIONS = ("none", "hadamard")

_ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP = ("gate_proj", "up_proj", "down_proj")
_NORMS = ("input_layernorm", "post_attention_layernorm")


@dataclass(frozen=True)
class RotationRecord:
    """What a consumer of a rotated model must apply online (recorded in quantization.json);
    R1/R2 are in the weights and need nothing."""

    kind: str = "none"
    online_down_proj: bool = False  # R4
    online_qk: bool = False  # R3

    @classmethod
    def from_dict(cls, raw: dict | None) -> RotationRecord:
        raw = raw or {}
        return cls(str(raw.get("kind", "none")), bool(raw.get("online_down_proj")), bool(raw.get("online_qk")))


def _dims(config) -> tuple[int, int, int]:
    text = getattr(config, "text_config", None) or config
    hidden = text.hidden_size
    head_dim = getattr(text, "head_dim", None) or hidden // text.num_attention_heads
    return hidden, head_dim, text.intermediate_size


def _decoder(model: nn.Module) -> tuple[nn.Module, list[nn.Module], nn.Module]:
    """(the base model, its decoder layers, the head), or a refusal naming what is unlike Llama."""
    base = getattr(model, "model", None)
    head = getattr(model, "lm_head", None)
    layers = getattr(base, "layers", None)
    name = type(model).__name__
    if base is None or head is None or layers is None or not hasattr(base, "embed_tokens") or not hasattr(base, "norm"):
        raise LrqatError(f"--rotate hadamard needs a Llama-like decoder (model.embed_tokens, model.layers, model.norm, "
                         f"lm_head); {name} is not: use --rotate none.")
    for layer in layers:
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        missing = [p for p in _ATTN if not isinstance(getattr(attn, p, None), nn.Linear)]
        missing += [p for p in _MLP if not isinstance(getattr(mlp, p, None), nn.Linear)]
        if missing:
            raise LrqatError(f"--rotate hadamard needs separate {', '.join(missing)} linears; {name} fuses or lacks "
                             "them: use --rotate none.")
        norms = [n for n, m in layer.named_children() if "norm" in n.lower()]
        if sorted(norms) != sorted(_NORMS):
            raise LrqatError(f"--rotate hadamard needs blocks with one norm before attention and one before the MLP; "
                             f"{name}'s blocks hold {', '.join(norms)} (norms after a sub-block are not rotation-"
                             "invariant): use --rotate none.")
    for norm in [base.norm, *[getattr(layer, n) for layer in layers for n in _NORMS]]:
        if "rmsnorm" not in type(norm).__name__.lower() or "gemma" in type(norm).__name__.lower() \
                or getattr(norm, "bias", None) is not None:
            raise LrqatError(f"--rotate hadamard needs plain RMSNorms (x/rms(x)·w); {name} uses {type(norm).__name__}: "
                             "use --rotate none.")
    return base, list(layers), head


def check_rotatable(model: nn.Module) -> None:
    """Refuse, before any work, a model the rotation cannot take: its layout or a size
    no Hadamard matrix is built for."""
    _decoder(model)
    hidden, head_dim, intermediate = _dims(model.config)
    for what, n in (("hidden size", hidden), ("head dimension", head_dim), ("intermediate size", intermediate)):
        try:
            factorize(n)
        except LrqatError:
            raise LrqatError(f"--rotate hadamard cannot take this model's {what} {n} (no Hadamard matrix of that size "
                             "is built: sizes m·2^k with m = 1, 2 or a Paley order): use --rotate none.") from None


@torch.no_grad()
def _set(param: nn.Parameter, value: torch.Tensor) -> None:
    param.data = value.to(param.dtype).contiguous()


@torch.no_grad()
def _rows(linear: nn.Linear, transform: Callable[[torch.Tensor], torch.Tensor], scale: torch.Tensor | None = None) -> None:
    """W ← diag(scale)-folded W times Q along the input dimension: `W·diag(g)·Q`."""
    w = linear.weight.double()
    if scale is not None:
        w = w * scale.double()
    _set(linear.weight, transform(w))


@torch.no_grad()
def _outputs(linear: nn.Linear, transform: Callable[[torch.Tensor], torch.Tensor], heads: int = 1) -> None:
    """W ← Qᵀ·W along the output dimension (per head when `heads` > 1), bias ← b·Q."""
    out, inp = linear.weight.shape
    w = linear.weight.double().T.reshape(inp, heads, out // heads)
    _set(linear.weight, transform(w).reshape(inp, out).T)
    if linear.bias is not None:
        _set(linear.bias, transform(linear.bias.double().reshape(heads, out // heads)).reshape(out))


@torch.no_grad()
def _head_columns(linear: nn.Linear, transform: Callable[[torch.Tensor], torch.Tensor], heads: int) -> None:
    """W ← W·Q on each head's block of input columns (o_proj under R2)."""
    out, inp = linear.weight.shape
    _set(linear.weight, transform(linear.weight.double().reshape(out, heads, inp // heads)).reshape(out, inp))


@torch.no_grad()
def _reset_norm(norm: nn.Module) -> torch.Tensor:
    """Return the norm's weight and set it to ones (its scale now lives in the linears)."""
    weight = norm.weight.detach().double().clone()
    norm.weight.data.fill_(1.0)
    return weight


def online_transforms(config, record: RotationRecord) -> tuple[HadamardTransform | None, HadamardTransform | None]:
    """(R4 on down_proj's input, R3 on Q/K) as the record asks: plain Hadamard transforms,
    rebuilt from the config alone when a merged model is loaded."""
    if not (record.online_down_proj or record.online_qk):  # (any architecture: no dimension is read)
        return None, None
    _, head_dim, intermediate = _dims(config)
    return (HadamardTransform(intermediate) if record.online_down_proj else None,
            HadamardTransform(head_dim) if record.online_qk else None)


@torch.no_grad()
def rotate_model(model: nn.Module, seed: int, online_down_proj: bool, online_qk: bool) -> RotationRecord:
    """Fold the norms and merge R1, R2 (and R4's weight half) into `model`, in place.

    Returns the record of the online halves (R4's input transform, R3) that the forward
    pass must apply for the rotated model to compute what the original computed."""
    check_rotatable(model)
    base, layers, head = _decoder(model)
    config = model.config
    text = getattr(config, "text_config", None) or config
    hidden, head_dim, intermediate = _dims(config)
    r1 = HadamardTransform(hidden, seed=seed)
    r2 = HadamardTransform(head_dim, seed=seed + 1)
    r4 = HadamardTransform(intermediate) if online_down_proj else None
    heads, kv_heads = text.num_attention_heads, getattr(text, "num_key_value_heads", None) or text.num_attention_heads

    if head.weight is base.embed_tokens.weight or getattr(config, "tie_word_embeddings", False):
        head.weight = nn.Parameter(head.weight.detach().clone(), requires_grad=head.weight.requires_grad)
        config.tie_word_embeddings = False
        if text is not config:
            text.tie_word_embeddings = False
    _set(base.embed_tokens.weight, r1(base.embed_tokens.weight.double()))
    for layer in layers:
        attn, mlp = layer.self_attn, layer.mlp
        g = _reset_norm(layer.input_layernorm)
        for name in ("q_proj", "k_proj", "v_proj"):
            _rows(getattr(attn, name), r1, g)
        _outputs(attn.o_proj, r1)
        _outputs(attn.v_proj, r2, heads=kv_heads)
        _head_columns(attn.o_proj, r2, heads=heads)
        g = _reset_norm(layer.post_attention_layernorm)
        for name in ("gate_proj", "up_proj"):
            _rows(getattr(mlp, name), r1, g)
        if r4 is not None:
            _rows(mlp.down_proj, r4)
        _outputs(mlp.down_proj, r1)
    _rows(head, r1, _reset_norm(base.norm))
    return RotationRecord("hadamard", online_down_proj, online_qk)


def down_proj_names(model: nn.Module) -> list[str]:
    return [f"{n}.down_proj" for n, m in model.named_modules() if isinstance(getattr(m, "down_proj", None), nn.Module)]
