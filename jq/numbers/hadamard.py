"""Fast Hadamard transforms and `Rotation`, the one rotation type of jq (weights, residual stream, heads, KV cache).

A Hadamard matrix H of order n (entries ±1, H Hᵀ = n I, built by `jq.numbers.hadamard_matrices` for any n = 2^k · b
that has a construction) divided by √n is orthogonal; rotating by it spreads outlier channels over all channels.

Transforms. `hadamard_transform(x)` = x @ H_n / √n along one axis (x @ H_nᵀ / √n with `transpose=True`, its
inverse). H_n is applied as the Kronecker factors H_{c_1} ⊗ … ⊗ H_{c_r} ⊗ H_b with c_j powers of two (≤ `block`,
default 128, as few and as even as possible: 4096 → 64 · 64, 14336 → 32 · 16 · 28, 11008 → 64 · 172):
viewing the row as [c_1, rest], one step contracts the leading factor with its small matrix and puts the result
last ([rest, c_1]); after all factors the original order is back. Factors of size 2 are add/subtract butterflies
(the classic fast Walsh–Hadamard transform, k memory passes); larger power-of-two blocks and the base b are small
dense matmuls (2n · (Σ c_j + b) flops per row, O(n log n) for a fixed block; on CPU the dense blocks are 2-3x
faster than butterflies, see benchmarks/hadamard.py). Everything is computed in float32
(float64 for float64 inputs) at HIGHEST matmul precision (no TF32 / bf16 passes on accelerators), so the map is
orthogonal to float32 rounding; the result has the input's dtype (float32 for integer inputs). Shapes are static,
so it jits, vmaps and batches over all other axes.

`Rotation(seed)`: Q = diag(s) H_n / √n with signs s = ±1 drawn from `seed` (Q = H_n / √n without a seed), applied
as x @ Q = ((x ⊙ s) @ H_n) / √n; inverse y @ Qᵀ = (y @ H_nᵀ / √n) ⊙ s; `matrix(n)` returns Q densely for folding
into weights (W ↦ Qᵀ W for a Dense kernel whose input is rotated as x @ Q). Its string form ("hadamard",
"hadamard(seed=3)") is what recipes write and checkpoints store.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jq.numbers.hadamard_matrices import (SMALL_ORDERS, Decomposition, base_matrix, decompose, hadamard_matrix,
                                          supported, sylvester)

__all__ = ["Rotation", "hadamard_transform", "rotation_matrix", "decompose", "supported", "hadamard_matrix",
           "Decomposition", "SMALL_ORDERS"]

_DEFAULT_BLOCK = 128  # largest power-of-two factor applied as one dense matmul; see benchmarks/hadamard.py


# -- the fast transform ----------------------------------------------------------------------------------------


def _factors(d: Decomposition, block: int) -> list[int]:
    """Kronecker factor sizes in index order: the power of two split into the fewest factors ≤ block, as even as
    possible (larger first), then the base (if > 1)."""
    if not isinstance(block, int) or block < 2 or block & (block - 1):
        raise ValueError(f"hadamard: block must be a power of two ≥ 2, got {block!r}")
    k, b = d.pow2.bit_length() - 1, block.bit_length() - 1
    r = -(-k // b)
    out = [1 << (k // r + (i < k % r)) for i in range(r)]
    return out + ([d.base] if d.base > 1 else [])


def _transform_rows(x: jax.Array, d: Decomposition, block: int, transpose: bool, scale: float) -> jax.Array:
    """x [L, n] (compute dtype) → x @ (H_n or H_nᵀ) · scale, by cycling through the Kronecker factors."""
    L, n = x.shape
    sizes = _factors(d, block)
    dense = [i for i, f in enumerate(sizes) if f > 2]
    if not dense and scale != 1.0:
        x = x * jnp.asarray(scale, x.dtype)
    for i, f in enumerate(sizes):
        y = x.reshape(L, f, n // f)
        if f == 2:
            y = jnp.stack([y[:, 0] + y[:, 1], y[:, 0] - y[:, 1]], axis=-1)  # [L, n/2, 2]
        else:
            is_base = d.base > 1 and i == len(sizes) - 1
            m = np.asarray(base_matrix(f) if is_base else sylvester(f), np.float64)
            if is_base and transpose:
                m = m.T
            if i == dense[-1]:
                m = m * scale
            y = lax.dot_general(y, jnp.asarray(m, x.dtype), (((1,), (0,)), ((), ())),
                                precision=lax.Precision.HIGHEST)  # [L, n/f, f]
        x = y.reshape(L, n)
    return x


def _compute_dtype(dtype) -> jnp.dtype:
    return jnp.float64 if dtype == jnp.float64 else jnp.float32


@functools.partial(jax.jit, static_argnames=("axis", "normalize", "transpose", "block"))
def _apply(x, signs, *, axis: int, normalize: bool, transpose: bool, block: int):
    x = jnp.asarray(x)
    out_dtype = x.dtype if jnp.issubdtype(x.dtype, jnp.floating) else jnp.float32
    cdt = _compute_dtype(x.dtype)
    axis = axis % x.ndim
    n = x.shape[axis]
    d = decompose(n)
    xt = jnp.moveaxis(x.astype(cdt), axis, -1)
    shape = xt.shape
    rows = xt.reshape(-1, n)
    scale = 1.0 / math.sqrt(n) if normalize else 1.0
    if signs is not None and not transpose:
        rows = rows * signs.astype(cdt)
    rows = _transform_rows(rows, d, block, transpose, scale)
    if signs is not None and transpose:
        rows = rows * signs.astype(cdt)
    return jnp.moveaxis(rows.reshape(shape), -1, axis).astype(out_dtype)


def hadamard_transform(x: jax.Array, axis: int = -1, *, normalize: bool = True, transpose: bool = False,
                       block: int | None = None) -> jax.Array:
    """x @ H_n / √n along `axis` (n = x.shape[axis]) in O(n log n), batched over every other axis.

    Args:
      x: array of any shape; bfloat16 / float16 inputs are computed in float32, the result has x's dtype
        (float32 for integer x).
      axis: the axis of size n to transform.
      normalize: divide by √n (orthogonal map); False gives x @ H_n with the ±1 matrix.
      transpose: apply H_nᵀ instead (the inverse when normalized; H_n is not symmetric for Paley I bases).
      block: largest power-of-two Kronecker factor applied as one dense matmul (default 128; 2 = pure
        add/subtract butterflies); a speed knob only, the result is the same up to float rounding.

    Returns:
      array of x's shape. Equals x @ `rotation_matrix(n)` along `axis`. Raises ValueError if n has no construction.
    """
    x = jnp.asarray(x)
    if x.ndim == 0:
        raise ValueError("hadamard_transform: needs an array with at least one axis")
    if not -x.ndim <= axis < x.ndim:
        raise ValueError(f"hadamard_transform: axis {axis} out of range for shape {x.shape}")
    decompose(x.shape[axis])  # a clear error before tracing
    return _apply(x, None, axis=axis, normalize=normalize, transpose=transpose, block=block or _DEFAULT_BLOCK)


# -- the rotation record ----------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Rotation:
    """The orthogonal map x ↦ x @ Q, Q = diag(s) · H_n / √n with signs s = ±1 drawn from `seed` (Q = H_n / √n when
    `seed` is None), for whatever size n the rotated axis has. One type for every rotation jq applies: weights whose
    codes hold Qᵀ W (`rotate: hadamard`), the residual stream and the heads of QuaRot (a recipe's `rotation`
    section), q and k of a rotated KV cache. `block` is a speed knob of the transform (see `hadamard_transform`).
    """

    seed: int | None = None
    block: int = dataclasses.field(default=_DEFAULT_BLOCK, compare=False)

    def signs(self, n: int) -> jax.Array | None:
        """The ±1 float32 signs [n], or None without a seed."""
        return None if self.seed is None else jax.random.rademacher(jax.random.key(self.seed), (n,), jnp.float32)

    def apply(self, x: jax.Array, axis: int = -1) -> jax.Array:
        """x @ Q along `axis` (same shape and dtype as x)."""
        x = jnp.asarray(x)
        n = x.shape[axis]
        decompose(n)  # a clear error before tracing
        return _apply(x, self.signs(n), axis=axis, normalize=True, transpose=False, block=self.block)

    def inverse(self, x: jax.Array, axis: int = -1) -> jax.Array:
        """x @ Qᵀ along `axis` (same shape and dtype as x): undoes `apply`."""
        x = jnp.asarray(x)
        n = x.shape[axis]
        decompose(n)
        return _apply(x, self.signs(n), axis=axis, normalize=True, transpose=True, block=self.block)

    def matrix(self, n: int) -> jax.Array:
        """Q [n, n] float32 (dense; n² memory)."""
        return rotation_matrix(n, signs=self.signs(n))

    def __str__(self) -> str:
        return "hadamard" if self.seed is None else f"hadamard(seed={self.seed})"

    @classmethod
    def parse(cls, value: Any) -> Rotation | None:
        """A Rotation from what recipes and checkpoints write: None / False → None; "hadamard" / True → the plain
        Hadamard rotation; "hadamard(seed=3)" or {"seed": 3} → seeded; a Rotation → itself."""
        if value is None or value is False:
            return None
        if isinstance(value, Rotation):
            return value
        if value is True or value == "hadamard":
            return cls()
        if isinstance(value, dict) and set(value) <= {"seed"}:
            return cls(seed=value.get("seed"))
        m = re.fullmatch(r"hadamard\(seed=(-?\d+)\)", str(value))
        if m:
            return cls(seed=int(m.group(1)))
        raise ValueError(f"rotation {value!r}: expected 'hadamard', 'hadamard(seed=N)' or {{seed: N}}")


def rotation_matrix(n: int, key: jax.Array | None = None, *, signs: jax.Array | None = None) -> jax.Array:
    """The dense orthogonal Q [n, n] float32 with hadamard_transform(x) == x @ Q (random signs from `key`, or the
    given `signs`, give Q = diag(s) H_n / √n, the matrix of `random_hadamard(n, key)`).

    For folding a rotation into weights: a Dense kernel W [n, out] fed rotated inputs x @ Q needs Qᵀ @ W.
    """
    if key is not None and signs is not None:
        raise ValueError("rotation_matrix: pass key or signs, not both")
    q = hadamard_matrix(n, np.float32)
    q *= np.float32(1 / math.sqrt(n))
    if key is not None:
        signs = jax.random.rademacher(key, (n,), dtype=jnp.float32)
    if signs is not None:
        q *= np.asarray(signs, np.float32)[:, None]
    return jnp.asarray(q)
