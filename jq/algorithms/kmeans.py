"""Codebook quantization by weighted k-means (SqueezeLLM, Kim et al. 2023: "Dense-and-Sparse Quantization").

Each table of a learned-codebook layout (`jq.numbers.codebook`: one per output channel, per group of rows and
output channel, or per tensor) is fitted by Lloyd's algorithm to its n vectors x_i ∈ R^vec with per-weight
sensitivities h_ij, minimising Σ_i Σ_j h_ij (x_ij − c_{a(i), j})²:

    assign  a(i) = argmin_k Σ_j h_ij (x_ij − c_kj)²           (scalar: the nearest centroid, by a sorted search)
    update  c_kj = Σ_{i: a(i)=k} h_ij x_ij / Σ_{i: a(i)=k} h_ij

The sensitivity is the diagonal of the calibration Hessian, h_ij = E[x_k²] of the input k the weight multiplies
(SqueezeLLM weights by the Fisher diagonal; for the layer-wise objective ‖XW − XQ‖² the Hessian diagonal is its
counterpart). Without statistics (or with `weighted=False`) every weight counts the same; a table whose weights
are all zero (inputs that never fired) is fitted unweighted; zero padding of a padded group axis never counts.

Deterministic: initial centroids at the weighted quantiles (k + ½) / C of the vectors ordered by their coordinate
sum (for scalars: the weighted quantiles of the weights); a cluster left without weight after an update is
re-seeded at the vector with the largest weighted error (the m empty ones at the m worst vectors, in order). A
fixed number of iterations (`lax.fori_loop`), vmapped over tables (in batches bounding memory). The final tables
are rounded to float16 (normalised by their scale) *before* the last assignment, so each weight's index is the
nearest stored entry — or, with `feedback=True`, the entry GPTQ-style error feedback picks
(`jq.algorithms.codebook_feedback`: the tables stay those fitted here; rows are assigned in order, each row's error
pushed onto the rows not yet assigned through the inverse Hessian).

Dense-and-sparse (`outliers`: a share of the weights): the weights whose error under the first fit costs most are
kept in float16 as the QTensor's sparse term (`jq.numbers.sparse`) and left out of the refitted tables; with feedback
they keep their error-updated value and feed back no error (as SpQR's outliers).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from jax import lax

from jq.algorithms.codebook_feedback import feedback_assign, inverse_hessian_factor
from jq.algorithms.registry import register_method
from jq.algorithms.stats import LayerStats
from jq.numbers import codebook as cbk
from jq.numbers import sparse
from jq.numbers.qtensor import Layout, QTensor
from jq.numbers.scheme import Scheme

__all__ = ["KMeans", "kmeans", "lloyd", "quantile_init", "assign", "sensitivity"]

_BATCH_ELEMENTS = 1 << 24  # distance-matrix elements per batch of tables (vector codebooks)


def quantile_init(x: jnp.ndarray, w: jnp.ndarray, entries: int) -> jnp.ndarray:
    """Initial centroids [C, vec] of one table: the vectors x [n, vec] at the weighted quantiles (k + ½) / C of
    their coordinate sum, weights w [n, vec] summed per vector (all-zero weights count as equal)."""
    key = jnp.sum(x, axis=-1)
    wt = jnp.sum(w, axis=-1)
    wt = jnp.where(jnp.sum(wt) > 0, wt, jnp.ones_like(wt))
    order = jnp.argsort(key, stable=True)
    cdf = jnp.cumsum(wt[order])
    targets = (jnp.arange(entries, dtype=jnp.float32) + 0.5) / entries * cdf[-1]
    pos = jnp.clip(jnp.searchsorted(cdf, targets, side="left"), 0, x.shape[0] - 1)
    return x[order[pos]]


def assign(x: jnp.ndarray, w: jnp.ndarray, c: jnp.ndarray) -> jnp.ndarray:
    """Index [n] (int32) of the centroid of c [C, vec] nearest each vector of x [n, vec] under the weighted distance
    Σ_j w_ij (x_ij − c_kj)² (scalars: the plain nearest, found by a sorted search; ties to the smaller value)."""
    if x.shape[-1] == 1:
        order = jnp.argsort(c[:, 0], stable=True)
        cs = c[order, 0]
        mids = (cs[1:] + cs[:-1]) / 2
        return order[jnp.searchsorted(mids, x[:, 0], side="left")].astype(jnp.int32)
    hp = lax.Precision.HIGHEST  # Σ_j w_ij (x_ij − c_kj)² less the per-vector constant Σ_j w_ij x_ij², as two matmuls
    d = jnp.matmul(w, (c**2).T, precision=hp) - 2 * jnp.matmul(w * x, c.T, precision=hp)  # [n, C]
    return jnp.argmin(d, axis=-1).astype(jnp.int32)


def _update(x: jnp.ndarray, w: jnp.ndarray, a: jnp.ndarray, c: jnp.ndarray) -> jnp.ndarray:
    """One weighted centroid update with deterministic re-seeding of empty clusters; shapes as `lloyd`."""
    entries = c.shape[0]
    num = jax.ops.segment_sum(w * x, a, num_segments=entries)
    den = jax.ops.segment_sum(w, a, num_segments=entries)
    new = jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), c)
    empty = jnp.sum(den, axis=-1) <= 0  # [C]
    err = jnp.sum(w * (x - new[a]) ** 2, axis=-1)  # [n]
    _, worst = lax.top_k(err, entries)  # the worst vectors, worst first
    rank = jnp.cumsum(empty) - 1
    return jnp.where(empty[:, None], x[worst[jnp.clip(rank, 0, entries - 1)]], new)


def lloyd(x: jnp.ndarray, w: jnp.ndarray, entries: int, iters: int) -> jnp.ndarray:
    """Weighted k-means of one table: vectors x [n, vec] (n ≥ entries), weights w [n, vec] ≥ 0 → centroids
    [entries, vec] after `iters` Lloyd iterations from `quantile_init`."""
    c0 = quantile_init(x, w, entries)
    return lax.fori_loop(0, iters, lambda _, c: _update(x, w, assign(x, w, c), c), c0)


def sensitivity(stats: LayerStats | None, layout: Layout) -> jnp.ndarray | None:
    """Per-weight sensitivity of the logical shape (`layout.shape`): the Hessian diagonal (else the mean x²) of the
    input each weight multiplies, broadcast over the other axes; None without statistics."""
    if stats is None:
        return None
    if stats.hessian is not None:
        diag = jnp.diagonal(jnp.asarray(stats.hessian, jnp.float32))
    elif stats.act_sq is not None:
        diag = jnp.asarray(stats.act_sq, jnp.float32)
    else:
        return None
    shape, axes = layout.shape, layout.axes
    k = math.prod(shape[a] for a in axes)
    if diag.shape != (k,):
        raise ValueError(f"kmeans: statistics of {diag.shape[0]} inputs for a kernel of shape {shape} contracting "
                         f"axes {axes} ({k} inputs): capture this layer's inputs, or drop the statistics")
    return jnp.broadcast_to(diag.reshape([shape[i] if i in axes else 1 for i in range(len(shape))]), shape)


def kmeans(w: jnp.ndarray, scheme: Scheme, layout: Layout, stats: LayerStats | dict | None = None, *,
           iters: int = 25, weighted: bool = True, feedback: bool = False, damp: float = 0.01,
           outliers: float = 0.0) -> QTensor:
    """Quantize `w` (logical shape `layout.shape`, e.g. a Dense kernel [K, N]) to a learned codebook: the scheme's
    format is `cb{b}` (scalar) or `cb{b}x{d}` (vectors of d), one table of 2^b entries per channel / group / tensor.

    Args:
      stats: `LayerStats` with `hessian` [K, K] (or `act_sq` [K]) to weight each weight by its input's energy;
        None, or `weighted=False`, fits plain k-means.
      iters: Lloyd iterations (fixed, for jit).
      feedback: assign indices with GPTQ error feedback (scalar codebooks of a 2-D kernel [K, N] with axes (0,),
        no padding; needs `stats.hessian`) instead of to the nearest entry.
      damp: relative damping of the Hessian for `feedback`.
      outliers: share of the weights kept sparse in float16 (SqueezeLLM's dense-and-sparse; `jq.numbers.sparse`):
        after a first fit, the weights whose rounding error costs most (`_saliency`) are kept exactly, the tables
        refitted without them, and the difference stored as the QTensor's sparse term (48 bits per kept weight).
    """
    f = scheme.fmt
    cbk.check_codebook_layout(f, layout)
    stats = LayerStats.coerce(stats)
    if feedback:
        _check_feedback(f.vec, layout, stats)
    entries, vec = 2**f.bits, f.vec
    xg = layout.to_grouped(jnp.asarray(w, jnp.float32))
    valid = layout.valid_mask()
    ones = jnp.ones(layout.grouped_shape, jnp.float32) if valid is None else valid
    sens = sensitivity(stats, layout) if weighted else None
    hw = ones if sens is None else layout.to_grouped(sens) * ones
    x, hw, ones = (cbk.to_units(a, layout, vec) for a in (xg, hw, ones))  # [U, n, vec]

    n = x.shape[1]
    batch = max(1, min(x.shape[0], _BATCH_ELEMENTS // (n * entries * vec))) if vec > 1 else x.shape[0]
    w32 = jnp.asarray(w, jnp.float32)
    u = inverse_hessian_factor(jnp.asarray(stats.hessian, jnp.float32), damp) if feedback else None

    def fit(hw):  # stored tables [U, C, vec] (float16 entries × float16 scale) fitted with weights hw [U, n, vec]
        dead = jnp.sum(hw, axis=(1, 2), keepdims=True) <= 0  # tables no calibration signal reached: unweighted
        hw = jnp.where(dead, ones, hw)
        tables, scale = cbk.normalise(lax.map(lambda xw: lloyd(xw[0], xw[1], entries, iters), (x, hw),
                                              batch_size=batch))
        return tables, scale, hw, tables.astype(jnp.float32) * scale.astype(jnp.float32)[:, None, None]

    def nearest(stored, hw):  # [U, n] indices of the nearest stored entries
        return lax.map(lambda a: assign(a[0], a[1], a[2]), (x, hw, stored), batch_size=batch)

    tables, scale, hw, stored = fit(hw)
    nnz = sparse.outlier_count(math.prod(layout.shape), outliers)
    keep = pos = None
    if nnz:  # dense-and-sparse: keep the weights with the largest weighted error, refit the tables without them
        dense = cbk.make_codebook_qtensor(nearest(stored, hw), tables, scale, layout, scheme.format, jnp.float32)
        pos = sparse.top_positions(_saliency(w32, dense.dequantize(jnp.float32), sens, u), nnz)
        keep = sparse.position_mask(pos, layout.shape)
        hw = hw * cbk.to_units(layout.to_grouped(1.0 - keep.astype(jnp.float32)), layout, vec)
        tables, scale, hw, stored = fit(hw)
    target = w32
    if feedback:
        rows = cbk.rows_per_group(layout)
        per_group = stored.reshape(layout.scale_shape + (entries, 1))  # [G or 1, N or 1, C, 1]
        block = math.gcd(rows, 128)  # blocks lie inside one group of rows: the tables change only between blocks
        idx2, _, target = feedback_assign(w32, u, 1, block, lambda b, wb: (per_group[(b * block) // rows], None),
                                          keep=keep)
        idx = cbk.to_units(layout.to_grouped(idx2), layout, 1)[..., 0]
    else:
        idx = nearest(stored, hw)  # [U, n]
    q = cbk.make_codebook_qtensor(idx, tables, scale, layout, scheme.format, w.dtype, policy=scheme.policy)
    return q if pos is None else sparse.with_sparse(q, target, pos)


def _saliency(w: jnp.ndarray, q: jnp.ndarray, sens: jnp.ndarray | None, u: jnp.ndarray | None) -> jnp.ndarray:
    """How much each weight's rounding error costs: (w − q)² weighted by its sensitivity (SqueezeLLM's diagonal), or
    with error feedback divided by U_kk² of its row (SpQR's / OBS's (w − q)² / [H⁻¹]_kk, in the order rows are fixed)."""
    err = (w - q) ** 2
    if u is not None:
        return err / (jnp.diagonal(u) ** 2)[:, None]
    return err if sens is None else err * sens


def _check_feedback(vec: int, layout: Layout, stats: LayerStats | None) -> None:
    """ValueError unless error feedback applies: scalar tables, a 2-D [K, N] kernel, no padding, a Hessian."""
    if vec != 1 or len(layout.shape) != 2 or layout.axes != (0,) or layout.flat or layout.valid_mask() is not None:
        raise ValueError(f"kmeans: feedback: true needs scalar codebooks (cb2..cb8) of a 2-D kernel [K, N] contracting "
                         f"axis 0 without padding or flat groups; got vectors of {vec}, shape {layout.shape}, axes "
                         f"{layout.axes}, {layout.granularity_label}{' padded' if layout.padded else ''}: drop feedback")
    if stats is None or stats.hessian is None:
        raise ValueError("kmeans: feedback: true needs stats.hessian ([K, K] mean of xᵀx); calibrate first, or drop "
                         "feedback")


@dataclasses.dataclass(frozen=True)
class KMeans:
    """Weighted k-means codebooks as a method record (`method: kmeans`, options `iters`, `weighted`, `feedback`,
    `damp`, `outliers`)."""

    iters: int = 25
    weighted: bool = True
    feedback: bool = False
    damp: float = 0.01
    outliers: float = 0.0

    def __post_init__(self):
        if not isinstance(self.iters, int) or self.iters < 1:
            raise ValueError(f"method 'kmeans': option 'iters' has value {self.iters!r}; use a positive int (e.g. 25)")
        if not isinstance(self.weighted, bool):
            raise ValueError(f"method 'kmeans': option 'weighted' has value {self.weighted!r}; use true or false")
        if not isinstance(self.feedback, bool):
            raise ValueError(f"method 'kmeans': option 'feedback' has value {self.feedback!r}; use true or false")
        if not isinstance(self.damp, (int, float)) or not self.damp > 0:
            raise ValueError(f"method 'kmeans': option 'damp' has value {self.damp!r}; use a positive ratio (0.01)")
        sparse.check_fraction(self.outliers, "method 'kmeans'")

    def quantize(self, w: jnp.ndarray, scheme: Scheme, layout: Layout,
                 stats: LayerStats | dict | None = None) -> QTensor:
        """`kmeans` of `w` (logical shape `layout.shape`, e.g. a Dense kernel [K, N])."""
        return kmeans(w, scheme, layout, stats, iters=self.iters, weighted=self.weighted, feedback=self.feedback,
                      damp=float(self.damp), outliers=float(self.outliers))


register_method("kmeans", KMeans, needs_calibration=True)
