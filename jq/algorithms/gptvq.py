"""GPTVQ: vector codebooks fitted block by block under GPTQ's error feedback (van Baalen et al. 2024, "GPTVQ: The
Blessing of Dimensionality for LLM Quantization").

The kernel W [K, N] (input rows first) is cut into groups of R rows (`group_size`, or all K rows for
`granularity: channel`). Each group has one table of 2^b vectors of d weights (format `cb{b}x{d}`: b / d bits per
weight) shared by every output channel, and a float16 scale per group and channel (the RMS of that column of the
group). The groups are processed in order:

    1. fit   the group's table by weighted k-means to its *current* rows (already moved by the error feedback of the
             groups before), vectors = d consecutive rows of one column divided by its scale, each coordinate
             weighted by s_n² / U_kk² (the error metric GPTQ uses for row k);
    2. assign d rows at a time to the entry nearest in the metric of the rows not yet fixed, feeding each step's
             error into the later rows (`jq.algorithms.codebook_feedback`);
    3. update when every group is assigned, all tables at once by conjugate gradients on the layer objective
             tr((W − Ŵ)ᵀ H (W − Ŵ)) with the indices and scales fixed (Ŵ is linear in the entries), keeping the
             update only if it lowers the objective; the tables are then rounded to float16.

Bits per weight = b / d + 16 / R (scales) + 16 · 2^b · d / (R · N) (tables; 8 with `int8_tables`), all counted by
`QTensor.bits_per_weight`: `cb6x2` with R = 192 on a 576-wide layer is 3.10.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax

from jq.algorithms.codebook_feedback import damped, feedback_assign, hessian_or_identity, inverse_hessian_factor
from jq.algorithms.kmeans import lloyd
from jq.algorithms.registry import register_method
from jq.algorithms.stats import LayerStats
from jq.numbers import codebook as cbk
from jq.numbers.qtensor import Layout, QTensor
from jq.numbers.scheme import Scheme

__all__ = ["GPTVQ", "gptvq", "update_tables", "solve_tables", "refit_scales", "refit_group_scales", "int8_codebook",
           "layer_objective", "column_objective"]

_HP = lax.Precision.HIGHEST


def column_objective(w: jnp.ndarray, w_hat: jnp.ndarray, h: jnp.ndarray) -> jnp.ndarray:
    """(w_n − ŵ_n)ᵀ H (w_n − ŵ_n) per column n [N] of kernels [K, N], H [K, K]: each output's error ‖X(w_n − ŵ_n)‖²."""
    d = w - w_hat
    return jnp.sum(d * jnp.matmul(h, d, precision=_HP), axis=0)


def layer_objective(w: jnp.ndarray, w_hat: jnp.ndarray, h: jnp.ndarray) -> jnp.ndarray:
    """tr((W − Ŵ)ᵀ H (W − Ŵ)) for kernels [K, N] and H [K, K]: the summed output error ‖X(W − Ŵ)‖² per sample."""
    return jnp.sum(column_objective(w, w_hat, h))


def _entry_of(idx: jnp.ndarray, groups: int, d: int) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
    """Where each weight [K, N] reads its table value: (group [K, 1], entry [K, N], coordinate [K, 1]), so that
    `tables[g, e, j]` is the unscaled kernel for tables [G, C, d] and indices idx [K / d, N]."""
    K = idx.shape[0] * d
    return (jnp.arange(K) // (K // groups))[:, None], jnp.repeat(idx, d, axis=0), (jnp.arange(K) % d)[:, None]


def update_tables(w: jnp.ndarray, h: jnp.ndarray, idx: jnp.ndarray, tables: jnp.ndarray, scale: jnp.ndarray,
                  iters: int) -> jnp.ndarray:
    """Tables [G, C, d] minimising `layer_objective` for fixed indices idx [K / d, N] and scales [G, N], by `iters`
    conjugate-gradient steps from `tables` on the normal equations PᵀHP c = PᵀHW (Ŵ = P c); entries no weight uses
    keep their values."""
    G, C, d = tables.shape
    g, full, j = _entry_of(idx, G, d)
    s = jnp.repeat(scale, w.shape[0] // G, axis=0)  # [K, N]
    flat = ((g * C + full) * d + j).reshape(-1)

    def expand(c):  # P c: the kernel the tables give
        return c[g, full, j] * s

    def adjoint(y):  # Pᵀ y
        return jax.ops.segment_sum((y * s).reshape(-1), flat, num_segments=G * C * d).reshape(G, C, d)

    return solve_tables(w, h, tables, expand, adjoint, iters)


def solve_tables(w: jnp.ndarray, h: jnp.ndarray, tables: jnp.ndarray, expand: Callable, adjoint: Callable, iters: int,
                 stored: Callable = lambda c: c) -> jnp.ndarray:
    """`iters` conjugate-gradient steps from `tables` (any shape) on the normal equations PᵀHP c = PᵀHW of the layer
    objective tr((W − Ŵ)ᵀ H (W − Ŵ)) with Ŵ = `expand`(c) = P c (w, Ŵ [K, N]) and `adjoint` = Pᵀ; the result passed
    through `stored` (e.g. rounding to float16) is kept only if it is finite and lowers the objective."""
    normal = lambda c: adjoint(jnp.matmul(h, expand(c), precision=_HP))  # noqa: E731
    r = adjoint(jnp.matmul(h, w, precision=_HP)) - normal(tables)

    def cg(_, c):
        x, r, p, rr = c
        ap = normal(p)
        pap = jnp.sum(p * ap)
        alpha = jnp.where(pap > 0, rr / jnp.where(pap > 0, pap, 1.0), 0.0)
        x, r = x + alpha * p, r - alpha * ap
        rr_new = jnp.sum(r * r)
        return x, r, r + jnp.where(rr > 0, rr_new / jnp.where(rr > 0, rr, 1.0), 0.0) * p, rr_new

    x = stored(lax.fori_loop(0, iters, cg, (tables, r, r, jnp.sum(r * r)))[0])
    better = layer_objective(w, expand(x), h) < layer_objective(w, expand(tables), h)
    return jnp.where(better & jnp.all(jnp.isfinite(x)), x, tables)


def refit_scales(w: jnp.ndarray, h: jnp.ndarray, idx: jnp.ndarray, tables: jnp.ndarray,
                 scale: jnp.ndarray) -> jnp.ndarray:
    """Scales [G, N] minimising `layer_objective` for fixed indices idx [K / d, N] and tables [G, C, d]: for each
    column n the G scales solve (D_nᵀ H D_n) s_n = D_nᵀ H w_n, D_n [K, G] holding the column's table values in its
    group's rows; a column whose system is singular or does not improve keeps its scales."""
    G, _, d = tables.shape
    g, full, j = _entry_of(idx, G, d)
    return refit_group_scales(w, h, tables[g, full, j], scale)


def refit_group_scales(w: jnp.ndarray, h: jnp.ndarray, v: jnp.ndarray, scale: jnp.ndarray) -> jnp.ndarray:
    """Scales [G, N] minimising `layer_objective` for unscaled values v [K, N] (each group of K / G rows of a column
    multiplied by its scale): per column the G × G least-squares system of `refit_scales`; a column whose system is
    singular or does not improve keeps its scales [G, N]."""
    G = scale.shape[0]
    rows = w.shape[0] // G
    g = jnp.arange(w.shape[0]) // rows
    hw = jnp.matmul(h, w, precision=_HP)
    b = jax.ops.segment_sum(v * hw, g, num_segments=G).T  # [N, G]
    cols = []
    for j in range(G):  # M[n, :, j] = Σ_{k ∈ group i} v_kn (H[:, group j] v[group j])_kn
        y = jnp.matmul(h[:, j * rows:(j + 1) * rows], v[j * rows:(j + 1) * rows], precision=_HP)
        cols.append(jax.ops.segment_sum(v * y, g, num_segments=G).T)  # [N, G]
    m = jnp.stack(cols, axis=-1)  # [N, G, G]
    new = jnp.linalg.solve(m + 1e-12 * jnp.eye(G), b[..., None])[..., 0].T  # [G, N]

    col_err = lambda s: column_objective(w, v * jnp.repeat(s, rows, axis=0), h)  # noqa: E731
    keep = ~jnp.all(jnp.isfinite(new), axis=0) | (col_err(jnp.nan_to_num(new)) >= col_err(scale))
    return jnp.where(keep[None], scale, new)


@cbk.on_leading_matrix
def gptvq(w: jnp.ndarray, scheme: Scheme, layout: Layout, stats: LayerStats | dict | None = None, *,
          iters: int = 20, damp: float = 0.01, update_iters: int = 25, act_order: bool = False,
          refit: bool = False, int8_tables: bool = False) -> QTensor:
    """Quantize a kernel w [K, N] to vector codebooks (format `cb{b}x{d}`, or `cb{b}` for scalars) by GPTVQ: one
    table per group of rows shared by all output channels, a scale per group and channel.

    Args:
      stats: `LayerStats` with `hessian` [K, K]; None (a layer no calibration token reached) fits and assigns with
        H = I (plain vector k-means per group).
      iters: k-means iterations per table fit.
      damp: relative damping of the Hessian (as GPTQ).
      update_iters: conjugate-gradient steps of the final table update (0 skips it).
      refit: after the table update, refit each column's scales to the layer objective (`refit_scales`) and
        update the tables once more.
      act_order: process the input rows by decreasing Hessian diagonal (the most sensitive first, while the most
        rows are left to absorb their error); groups, vectors and scales then form in that order, and the QTensor
        stores the permutation (`perm`, int32 [K]: 32 / N more bits per weight).
      int8_tables: store the tables as int8 (`int8_codebook`: half the table bits; the step folded into the
        scales, then, with `refit`, the scales refitted to the rounded tables).
    """
    cbk.check_shared_layout(scheme.fmt, layout, "gptvq")
    f = scheme.fmt
    stats = LayerStats.coerce(stats)
    K, N = layout.shape
    rows, d, entries = cbk.rows_per_group(layout), f.vec, 2**f.bits
    w32 = jnp.asarray(w, jnp.float32)
    h = hessian_or_identity(stats, K)
    perm = None
    if act_order:
        perm = jnp.argsort(-jnp.diagonal(h), stable=True).astype(jnp.int32)
        w32, h = w32[perm], h[perm][:, perm]
    u = inverse_hessian_factor(h, damp)
    row_weight = 1.0 / jnp.diagonal(u) ** 2  # the loss GPTQ charges per unit squared error of row k

    def fit(b, wb):  # the group's table, from its current rows wb [rows, N]
        s = cbk.rms_scales(wb, axis=0)  # [N], as stored
        x = jnp.transpose((wb / s).reshape(rows // d, d, N), (2, 0, 1)).reshape(-1, d)
        hw = lax.dynamic_slice_in_dim(row_weight, b * rows, rows).reshape(1, rows // d, d)
        wt = (hw * (s**2)[:, None, None]).reshape(-1, d)
        c = lloyd(x, wt / jnp.maximum(jnp.max(wt), 1e-30), entries, iters)
        c = cbk.as_stored(c)
        return s[:, None, None] * c[None], (c, s)

    idx, (tables, scale), _ = feedback_assign(w32, u, d, rows, fit)  # [K/d, N], [G, C, d], [G, N]
    hd = damped(h, damp)
    if update_iters:
        tables = update_tables(w32, hd, idx, tables, scale, update_iters)
        if refit:  # alternate: scales for these tables, then the tables for those scales
            scale = cbk.as_stored(refit_scales(w32, hd, idx, tables, scale))
            tables = update_tables(w32, hd, idx, tables, scale, update_iters)
    if int8_tables:
        tables, scale = int8_codebook(tables, scale)
        if refit:  # the scales absorb the tables' rounding
            scale = cbk.as_stored(refit_scales(w32, hd, idx, tables.astype(jnp.float32), scale))
    return cbk.stored_codebook_qtensor(idx, tables[:, None], scale, layout, scheme.format, w.dtype, perm=perm,
                                       policy=scheme.policy)


def int8_codebook(tables: jnp.ndarray, scale: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Tables [G, C, d] rounded to int8 (each table's largest |entry| → 127) and scales [G, N] that carry the
    tables' step (scale · amax / 127, as stored): the same weights, tables at a byte per entry."""
    amax = jnp.max(jnp.abs(tables), axis=(1, 2))
    step = jnp.where(amax > 0, amax / 127.0, 1.0)  # [G]
    q = jnp.clip(jnp.round(tables / step[:, None, None]), -127, 127).astype(jnp.int8)
    return q, cbk.as_stored(scale * step[:, None])


@dataclasses.dataclass(frozen=True)
class GPTVQ:
    """GPTVQ as a method record (`method: gptvq`, options `iters`, `damp`, `update_iters`, `act_order`,
    `refit`, `int8_tables`)."""

    iters: int = 20
    damp: float = 0.01
    update_iters: int = 25
    act_order: bool = False
    refit: bool = False
    int8_tables: bool = False

    def __post_init__(self):
        for name, lo in (("iters", 1), ("update_iters", 0)):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < lo:
                raise ValueError(f"method 'gptvq': option {name!r} has value {v!r}; use an int ≥ {lo}")
        for name in ("act_order", "refit", "int8_tables"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"method 'gptvq': option {name!r} has value {getattr(self, name)!r}; use true or "
                                 "false")
        if not isinstance(self.damp, (int, float)) or not self.damp > 0:
            raise ValueError(f"method 'gptvq': option 'damp' has value {self.damp!r}; use a positive ratio (0.01)")

    def quantize(self, w: jnp.ndarray, scheme: Scheme, layout: Layout,
                 stats: LayerStats | dict | None = None) -> QTensor:
        """`gptvq` of the kernel w [K, N]."""
        return gptvq(w, scheme, layout, stats, iters=self.iters, damp=float(self.damp),
                     update_iters=self.update_iters, act_order=self.act_order, refit=self.refit,
                     int8_tables=self.int8_tables)


register_method("gptvq", GPTVQ, needs_calibration=True)
