"""GGUF block packing with no lrqat import: torch, numpy and `gguf` only, so that the
converter driver can load this file alone (importing the lrqat package would bring in
transformers' model code and the installed `gguf`, and cost seconds per export).

See `gguf_blocks` for the block types and why the integers are packed here.
"""

from __future__ import annotations

import gguf
import numpy as np
import torch

BLOCK = 32
FILE_TYPES = {
    gguf.GGMLQuantizationType.Q4_0: gguf.LlamaFileType.MOSTLY_Q4_0,
    gguf.GGMLQuantizationType.Q4_1: gguf.LlamaFileType.MOSTLY_Q4_1,
    gguf.GGMLQuantizationType.Q8_0: gguf.LlamaFileType.MOSTLY_Q8_0,
}


def exact_in(tensor: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether `tensor` survives a round trip through `dtype` bit for bit."""
    return bool(torch.equal(tensor.to(dtype).to(tensor.dtype), tensor))


def fp16_bytes(x: torch.Tensor) -> np.ndarray:
    return x.to(torch.float16).contiguous().numpy().view(np.uint8).reshape(*x.shape, 2)


def nibbles(codes: torch.Tensor) -> np.ndarray:
    """`(out, nb, 32)` codes in [0, 16) → `(out, nb, 16)` bytes: element j low, j+16 high."""
    low, high = codes[..., :16], codes[..., 16:]
    return (low | (high << 4)).to(torch.uint8).numpy()


def pack_codes(q: torch.Tensor, d: torch.Tensor, m: torch.Tensor | None, kind: gguf.GGMLQuantizationType
               ) -> np.ndarray:
    """Raw GGUF block bytes `(out, in/32·block_bytes)` of integers `q` with block scales
    `d` (and Q4_1 offsets `m`), as `block_codes` gives them."""
    out_f, in_f = q.shape
    nb = in_f // BLOCK
    qb = q.reshape(out_f, nb, BLOCK).to(torch.int64)
    d = d.to(torch.float16)
    if kind == gguf.GGMLQuantizationType.Q4_0:
        parts = [fp16_bytes(d), nibbles(qb + 8)]
    elif kind == gguf.GGMLQuantizationType.Q4_1:
        parts = [fp16_bytes(d), fp16_bytes(m.to(torch.float16)), nibbles(qb)]
    else:
        parts = [fp16_bytes(d), qb.to(torch.int8).numpy().view(np.uint8)]
    return np.concatenate(parts, axis=-1).reshape(out_f, -1)


def decode_codes(q: torch.Tensor, d: torch.Tensor, m: torch.Tensor | None) -> torch.Tensor:
    """The weight GGUF blocks of `pack_codes` decode to."""
    out_f, in_f = q.shape
    qb = q.reshape(out_f, in_f // BLOCK, BLOCK)
    decoded = d.unsqueeze(-1) * qb + (m.unsqueeze(-1) if m is not None else 0.0)
    return decoded.reshape(out_f, in_f)


def float_tensor(tensor: torch.Tensor, vector: bool) -> tuple[np.ndarray, gguf.GGMLQuantizationType]:
    """Store an unquantized tensor in the smallest GGUF type that holds it exactly.

    Q8_0 is tried first: embeddings that came from a Q8_0 file (the built-in model) are
    exactly Q8_0 and stay a quarter of their fp32 size; then F16, BF16, else F32.
    llama.cpp wants 1-D tensors (norms) in F32.
    """
    x = tensor.detach().float().contiguous()
    if vector:
        return x.numpy(), gguf.GGMLQuantizationType.F32
    arr = x.numpy()
    if arr.shape[-1] % BLOCK == 0:
        packed = gguf.quants.quantize(arr, gguf.GGMLQuantizationType.Q8_0)
        if np.array_equal(gguf.quants.dequantize(packed, gguf.GGMLQuantizationType.Q8_0), arr):
            return packed, gguf.GGMLQuantizationType.Q8_0
    if exact_in(x, torch.float16):
        return arr.astype(np.float16), gguf.GGMLQuantizationType.F16
    if exact_in(x, torch.bfloat16):
        return gguf.quants.quantize(arr, gguf.GGMLQuantizationType.BF16), gguf.GGMLQuantizationType.BF16
    return arr, gguf.GGMLQuantizationType.F32
