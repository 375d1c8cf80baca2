"""Hadamard matrices of the sizes LLMs have, applied in O(n log n).

A dimension `n = m · 2^k` is transformed as `H_m ⊗ H_{2^k}`: a fast Walsh–Hadamard
butterfly over the `2^k` part and a small dense `H_m` over the rest, as QuaRot does.
QuaRot ships hand-made `H_m` tables; here they are built by Paley's constructions
(I: order q+1 for a prime power q ≡ 3 mod 4; II: order 2(q+1) for q ≡ 1 mod 4), which
cover the sizes of the common models: 576 = 36·16 (SmolLM2), 896 = 28·32 (Qwen2.5-0.5B,
q = 27), 1536 = 12·128, 4864 = 76·64, 11008 = 344·32 (Llama-2 7B, q = 343), 13824 = 108·128.
Every constructed matrix is checked (H Hᵀ = m I) before use.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch

from lrqat.errors import LrqatError

_MAX_DENSE = 1024  # the largest H_m tried (its cost is m per element)


def _prime_power(q: int) -> tuple[int, int] | None:
    """(p, k) with q = p^k, p prime, k ≤ 3 (the fields built here); None otherwise."""
    for p in range(2, q + 1):
        if q % p == 0:
            k, rest = 0, q
            while rest % p == 0:
                rest //= p
                k += 1
            return (p, k) if rest == 1 and k <= 3 else None
    return None


def _poly_mulmod(a: list[int], b: list[int], modulus: list[int], p: int) -> list[int]:
    """a·b mod (the monic `modulus`) over GF(p); polynomials as coefficient lists, low first."""
    k = len(modulus) - 1
    prod = [0] * (2 * k - 1)
    for i, x in enumerate(a):
        for j, y in enumerate(b):
            prod[i + j] = (prod[i + j] + x * y) % p
    for d in range(len(prod) - 1, k - 1, -1):  # reduce: x^d = x^(d-k) · (x^k − modulus)
        c = prod[d]
        if c:
            for i in range(k + 1):
                prod[d - k + i] = (prod[d - k + i] - c * modulus[i]) % p
    return prod[:k]


def _irreducible(p: int, k: int) -> list[int]:
    """A monic irreducible polynomial of degree k ≤ 3 over GF(p): one without roots."""
    if k == 1:
        return [0, 1]
    for code in range(p**k):
        coeffs = [(code // p**i) % p for i in range(k)] + [1]
        if coeffs[0] and all(sum(c * pow(x, i, p) for i, c in enumerate(coeffs)) % p for x in range(p)):
            return coeffs
    raise AssertionError(f"no irreducible polynomial of degree {k} over GF({p})")


def _jacobsthal(q: int) -> np.ndarray:
    """Q[a, b] = χ(a − b) over GF(q), χ the quadratic character (0, 1 on squares, −1)."""
    p, k = _prime_power(q)  # type: ignore[misc]
    digits = np.array([[(e // p**i) % p for i in range(k)] for e in range(q)])
    modulus = _irreducible(p, k)
    squares = {tuple(_poly_mulmod(list(d), list(d), modulus, p)) for d in digits[1:]}
    chi = np.array([0] + [1 if tuple(d) in squares else -1 for d in digits[1:]])
    diff = (digits[:, None, :] - digits[None, :, :]) % p
    return chi[(diff * p ** np.arange(k)).sum(-1)]


def _paley(m: int) -> np.ndarray | None:
    """A Hadamard matrix of order m by Paley I or II, or None when neither applies."""
    q = m - 1
    if _prime_power(q) and q % 4 == 3:
        S = np.zeros((m, m), dtype=np.int64)
        S[0, 1:], S[1:, 0], S[1:, 1:] = 1, -1, _jacobsthal(q)
        return np.eye(m, dtype=np.int64) + S
    q = m // 2 - 1
    if m % 2 == 0 and q > 0 and _prime_power(q) and q % 4 == 1:
        C = np.zeros((q + 1, q + 1), dtype=np.int64)
        C[0, 1:], C[1:, 0], C[1:, 1:] = 1, 1, _jacobsthal(q)
        return np.kron(C, [[1, 1], [1, -1]]) + np.kron(np.eye(q + 1, dtype=np.int64), [[1, -1], [-1, -1]])
    return None


@functools.cache
def dense_factor(m: int) -> np.ndarray | None:
    """A checked Hadamard matrix of order m (±1 entries), or None if none is built here."""
    if m == 1:
        return np.ones((1, 1), dtype=np.int64)
    if m == 2:
        return np.array([[1, 1], [1, -1]])
    H = _paley(m) if m % 4 == 0 else None
    if H is None and m % 2 == 0 and m % 8 == 0 and dense_factor(m // 2) is not None:
        H = np.kron([[1, 1], [1, -1]], dense_factor(m // 2))
    if H is not None and not np.array_equal(H @ H.T, m * np.eye(m, dtype=np.int64)):
        raise AssertionError(f"constructed H_{m} is not a Hadamard matrix")
    return H


def factorize(n: int) -> tuple[int, int]:
    """(m, 2^k) with n = m · 2^k and H_m constructible, the smallest such m."""
    if n > 0:
        power = n & -n  # the largest power of two dividing n
        while power >= 1:
            m = n // power
            if m <= _MAX_DENSE and dense_factor(m) is not None:
                return m, power
            power //= 2
    raise LrqatError(f"no Hadamard matrix of size {n} can be built here (sizes m·2^k with m = 1, 2, or a Paley order "
                     "q+1 / 2(q+1) for a prime power q): use --rotate none for this model.")


def supported(n: int) -> bool:
    try:
        factorize(n)
    except LrqatError:
        return False
    return True


def _butterfly(x: torch.Tensor) -> torch.Tensor:
    """x @ H_p over the last dimension (Sylvester H_p, p a power of two), unnormalised."""
    p = x.shape[-1]
    h = 1
    while h < p:
        x = x.reshape(*x.shape[:-1], p // (2 * h), 2, h)
        a, b = x[..., 0, :], x[..., 1, :]
        x = torch.stack((a + b, a - b), dim=-2).reshape(*x.shape[:-3], p)
        h *= 2
    return x


class HadamardTransform:
    """x ↦ (x ⊙ signs) @ H / √n over the last dimension: orthogonal, applied fast.

    `signs` (±1, from a seed) randomise it (R1, R2: merged into weights); without them it
    is the plain normalised Hadamard transform (R3, R4: applied online)."""

    def __init__(self, n: int, seed: int | None = None) -> None:
        self.n = n
        self.m, self.p = factorize(n)
        self.dense = torch.from_numpy(dense_factor(self.m).astype(np.float64))
        self.signs = None
        if seed is not None:
            gen = torch.Generator().manual_seed(seed)
            self.signs = torch.randint(0, 2, (n,), generator=gen, dtype=torch.float64) * 2 - 1

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.n:
            raise ValueError(f"Hadamard transform of size {self.n} applied to a last dimension of {x.shape[-1]}")
        if self.signs is not None:
            x = x * self.signs.to(x.device, x.dtype)
        shape = x.shape
        y = _butterfly(x.reshape(*shape[:-1], self.m, self.p))
        if self.m > 1:  # Aᵀ X over the m axis
            y = torch.einsum("ij,...ip->...jp", self.dense.to(y.device, y.dtype), y)
        return y.reshape(shape) / math.sqrt(self.n)

    def matrix(self) -> torch.Tensor:
        """The transform as a dense float64 matrix Q (x ↦ x @ Q), for tests."""
        return self(torch.eye(self.n, dtype=torch.float64))
