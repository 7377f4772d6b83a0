"""GPTQ-style error feedback onto codebooks: scalar (`method: kmeans, options: {feedback: true}`) and vector
(`method: gptvq`).

The input rows k of the kernel W [K, N] are assigned in order, `vec` rows at a time (one index per column picks a
vector of `vec` weights), and each step's rounding error is fed back into the rows not yet assigned through the
inverse Hessian of the layer's output error ‖XW − XQ‖² (Frantar et al. 2022; with vectors, van Baalen et al. 2024,
"GPTVQ"):

    U = upper Cholesky factor of (H + λI)⁻¹,   λ = damp · mean diag H
    step over rows v = k..k+vec−1:  q = argmin_c ‖U_vv⁻ᵀ (w_v − c)‖²    (the error metric of the rows not yet fixed;
                                                                          for vec = 1 simply the nearest entry)
                                    then for each row i of v in order: e_i = (w_i − q_i) / U_ii, w_j −= U_ij e_i (j > i)

Lazy batch updates: a `lax.scan` over blocks of `block` rows; inside a block one step at a time, the rest of the
kernel updated once per block by one matmul. Before a block is assigned, `tables_of(b, wb)` gives its tables from the
block's current (error-updated) rows — fixed tables for k-means, a fresh fit for GPTVQ, column scales for the fixed
E8P lattice (`quip`, which also brings its own nearest-vector rounding: Euclidean, as QuIP#'s BlockLDLQ). If the
factorisation fails (NaN) the pass degrades to plain nearest assignment (U = I).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

__all__ = ["feedback_assign", "inverse_hessian_factor", "damped", "hessian_or_identity"]

TablesOf = Callable[[jnp.ndarray, jnp.ndarray], tuple[Any, Any]]
RoundStep = Callable[[jnp.ndarray, Any, jnp.ndarray], tuple[jnp.ndarray, jnp.ndarray]]


def hessian_or_identity(stats: Any, k: int) -> jnp.ndarray:
    """The layer's input Hessian [k, k] (float32) from `LayerStats`, or the identity when there is none (a layer no
    calibration token reached: plain nearest-entry rounding)."""
    h = None if stats is None else stats.hessian
    return jnp.eye(k, dtype=jnp.float32) if h is None else jnp.asarray(h, jnp.float32)


def damped(h: jnp.ndarray, damp: float) -> jnp.ndarray:
    """h + λI with λ = damp · mean diag h (GPTQ's relative damping)."""
    return h + damp * jnp.mean(jnp.diagonal(h)) * jnp.eye(h.shape[0], dtype=h.dtype)


def inverse_hessian_factor(h: jnp.ndarray, damp: float) -> jnp.ndarray:
    """Upper U [K, K] with UᵀU = (h + λI)⁻¹ (λ = damp · mean diag h); the identity if h is not positive definite."""
    k = h.shape[0]
    h = damped(h, damp)
    hinv = jax.scipy.linalg.cho_solve(jax.scipy.linalg.cho_factor(h, lower=True), jnp.eye(k, dtype=h.dtype))
    u = jnp.linalg.cholesky(hinv, upper=True)
    return jnp.where(jnp.all(jnp.isfinite(u)), u, jnp.eye(k, dtype=h.dtype))


def _nearest(wv: jnp.ndarray, t: jnp.ndarray, uvv: jnp.ndarray) -> jnp.ndarray:
    """Indices [N] of the entries of t [N or 1, C, vec] nearest the columns of wv [vec, N] in the metric
    ‖U_vv⁻ᵀ (w − c)‖² (uvv [vec, vec] upper triangular)."""
    vec = wv.shape[0]
    lt = jax.scipy.linalg.solve_triangular(uvv.T, jnp.eye(vec, dtype=wv.dtype), lower=True)  # U_vv⁻ᵀ
    a = (lt @ wv).T  # [N, vec]
    tt = jnp.einsum("ij,ncj->nci", lt, t)  # [N or 1, C, vec]
    return jnp.argmin(jnp.sum((a[:, None, :] - tt) ** 2, axis=-1), axis=-1).astype(jnp.int32)


def _round_to_tables(wv: jnp.ndarray, t: jnp.ndarray, uvv: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """(indices [N], chosen vectors [vec, N]) of the entries of t [N or 1, C, vec] nearest wv [vec, N]."""
    idx = _nearest(wv, t, uvv)
    return idx, t[jnp.arange(wv.shape[1]) if t.shape[0] > 1 else jnp.zeros(wv.shape[1], jnp.int32), idx].T


def feedback_assign(w: jnp.ndarray, u: jnp.ndarray, vec: int, block: int, tables_of: TablesOf,
                    round_step: RoundStep = _round_to_tables, index_dtype: Any = jnp.int32,
                    keep: jnp.ndarray | None = None, index_shape: tuple[int, ...] = ()
                    ) -> tuple[jnp.ndarray, Any, jnp.ndarray]:
    """Indices [K / vec, N, *index_shape] (`index_dtype`) of the codebook vectors the rows of w [K, N] are assigned
    with feedback, the stacked per-block outputs of `tables_of`, and the assigned weights [K, N] (the chosen entries;
    at `keep` positions the kept weights).

    Args:
      w: the kernel, input rows first (K divisible by `block`, `block` by `vec`).
      u: `inverse_hessian_factor` [K, K].
      vec: rows per vector (1 for scalar codebooks).
      block: rows per lazy-update block; the tables may change only between blocks.
      tables_of: (block number, the block's current rows [block, N]) → (tables [N or 1, C, vec] in weight units:
        the entries column n may take, aux: any pytree, stacked over blocks in the result).
      round_step: (rows [vec, N], the block's tables, U_vv [vec, vec]) → (indices [N], their vectors [vec, N] in
        weight units); by default the entries of the tables nearest in the metric U_vv⁻ᵀ. A fixed codebook passes
        its own (the tables are then whatever it needs per block, e.g. column scales).
      index_dtype: dtype of the indices returned.
      index_shape: the trailing shape of one vector's index (what `round_step` returns per column: () for one
        integer, (3,) for a lattice code's three bytes).
      keep: bool [K, N] or None: weights kept exactly (dense-and-sparse outliers, as SpQR keeps them): each takes
        its current error-updated value, feeds back no error, and still gets an index (the sparse term stores the
        difference).
    """
    K, N = w.shape
    ar = jnp.arange(block)

    def one_block(w, b):
        s = b * block
        wb = lax.dynamic_slice_in_dim(w, s, block)  # [block, N]
        ub = lax.dynamic_slice(u, (s, s), (block, block))
        t, aux = tables_of(b, wb)
        kb = None if keep is None else lax.dynamic_slice_in_dim(keep, s, block)

        def step(j, c):
            wb, err, ib, qb = c
            r = j * vec
            idx, q = round_step(lax.dynamic_slice_in_dim(wb, r, vec), t, lax.dynamic_slice(ub, (r, r), (vec, vec)))
            for i in range(vec):  # fix the vector's rows one at a time, feeding each error forward (OBS)
                qi = q[i] if kb is None else jnp.where(kb[r + i], wb[r + i], q[i])  # a kept weight: no error
                e = (wb[r + i] - qi) / ub[r + i, r + i]
                wb = wb - jnp.where(ar[:, None] > r + i, ub[r + i][:, None], 0.0) * e[None]
                err, qb = err.at[r + i].set(e), qb.at[r + i].set(qi)
            return wb, err, ib.at[j].set(idx), qb

        init = (wb, jnp.zeros_like(wb), jnp.zeros((block // vec, N, *index_shape), index_dtype), jnp.zeros_like(wb))
        _, err, ib, qb = lax.fori_loop(0, block // vec, step, init)
        later = jnp.arange(K) >= s + block
        ur = jnp.where(later[None, :], lax.dynamic_slice_in_dim(u, s, block), 0.0)  # [block, K]
        return w - jnp.matmul(ur.T, err, precision=lax.Precision.HIGHEST), (ib, aux, qb)

    _, (idx, aux, values) = lax.scan(one_block, w, jnp.arange(K // block))
    return idx.reshape(K // vec, N, *index_shape), aux, values.reshape(K, N)
