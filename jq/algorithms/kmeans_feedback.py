"""GPTQ-style error feedback onto fixed scalar codebooks (`method: kmeans, options: {feedback: true}`).

The tables are fitted first (weighted k-means, `jq.algorithms.kmeans`); then the input rows k of the kernel W [K, N]
are assigned one at a time, in order, and each row's rounding error is fed back into the rows not yet assigned,
weighted by the inverse Hessian of the layer's output error ‖XW − XQ‖² (Frantar et al. 2022, with the rounding
replaced by the nearest entry of the row's tables — the scalar form of GPTVQ, van Baalen et al. 2024):

    U = upper Cholesky factor of (H + λI)⁻¹,   λ = damp · mean diag H
    for k = 0 .. K−1:   q_k = nearest entry of each column's table;   e_k = (w_k − q_k) / U_kk;   w_j −= U_kj e_k (j > k)

Lazy batch updates: a `lax.fori_loop` over blocks of B rows (B = gcd(K, 128)); inside a block one row at a time,
the rest of the kernel updated once per block by one matmul. If the factorisation fails (NaN) the pass degrades to
plain nearest assignment (U = I).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax

__all__ = ["feedback_assign", "inverse_hessian_factor"]


def inverse_hessian_factor(h: jnp.ndarray, damp: float) -> jnp.ndarray:
    """Upper U [K, K] with UᵀU = (h + λI)⁻¹ (λ = damp · mean diag h); the identity if h is not positive definite."""
    k = h.shape[0]
    h = h + damp * jnp.mean(jnp.diagonal(h)) * jnp.eye(k, dtype=h.dtype)
    hinv = jax.scipy.linalg.cho_solve(jax.scipy.linalg.cho_factor(h, lower=True), jnp.eye(k, dtype=h.dtype))
    u = jnp.linalg.cholesky(hinv, upper=True)
    return jnp.where(jnp.all(jnp.isfinite(u)), u, jnp.eye(k, dtype=h.dtype))


def feedback_assign(w: jnp.ndarray, tables: jnp.ndarray, group: int, u: jnp.ndarray) -> jnp.ndarray:
    """Indices [K, N] (int32) of the table entries the rows of w [K, N] are assigned with error feedback.

    Args:
      w: the kernel, input rows first.
      tables: [G, N or 1, C] stored (float) entries; row k reads tables[k // group].
      group: rows per table group (K for one table per column).
      u: `inverse_hessian_factor` [K, K].
    """
    K, N = w.shape
    B = math.gcd(K, 128)
    ar = jnp.arange(B)

    def nearest(row: jnp.ndarray, k: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
        t = jnp.broadcast_to(lax.dynamic_index_in_dim(tables, k // group, keepdims=False), (N, tables.shape[-1]))
        i = jnp.argmin(jnp.abs(row[:, None] - t), axis=-1).astype(jnp.int32)
        return i, jnp.take_along_axis(t, i[:, None], axis=-1)[:, 0]

    def block(b, carry):
        w, idx = carry
        s = b * B
        wb = lax.dynamic_slice_in_dim(w, s, B)  # [B, N]
        ub = lax.dynamic_slice(u, (s, s), (B, B))

        def row(i, c):
            wb, err, ib = c
            r, q = nearest(wb[i], s + i)
            e = (wb[i] - q) / ub[i, i]
            wb = wb - jnp.where(ar[:, None] > i, ub[i][:, None], 0.0) * e[None]
            return wb, err.at[i].set(e), ib.at[i].set(r)

        _, err, ib = lax.fori_loop(0, B, row, (wb, jnp.zeros_like(wb), jnp.zeros((B, N), jnp.int32)))
        later = jnp.arange(K) >= s + B
        ur = jnp.where(later[None, :], lax.dynamic_slice_in_dim(u, s, B), 0.0)  # [B, K]
        w = w - jnp.matmul(ur.T, err, precision=lax.Precision.HIGHEST)
        return w, lax.dynamic_update_slice_in_dim(idx, ib, s, 0)

    _, idx = lax.fori_loop(0, K // B, block, (w, jnp.zeros((K, N), jnp.int32)))
    return idx
