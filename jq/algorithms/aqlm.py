"""AQLM: additive vector codebooks fitted to the layer objective (Egiazarian et al. 2024, "Extreme Compression of
Large Language Models via Additive Quantization").

The kernel W [K, N] (input rows first) is cut into vectors of 8 consecutive rows of one column. Each vector is the
sum of M codewords, one from each of M tables of 2^B entries (format `aq{B}x{M}`: M·B / 8 bits per weight), times a
float16 scale per output channel (per group of rows and channel with `group_size`). The tables are shared by the
whole kernel (`granularity: channel`), or by each group of rows across all columns (`group_size`). Fitting minimises
the layer objective tr((W − Ŵ)ᵀ H (W − Ŵ)) (H the damped input Hessian, `LayerStats.hessian`):

    scales   s = RMS of each column (of each group) / GAIN, stored float16; the weights are fitted as y = W / s;
    init     residual k-means per table set: table 1 by weighted Lloyd (`jq.algorithms.kmeans.lloyd`: deterministic
             quantile init) on the vectors, each coordinate weighted by H_kk · s², table 2 on the residuals, …;
    codes    (a) beam search under the FULL quadratic form, by exact block coordinate descent: the row blocks
             j = 0 .. K/8 − 1 are visited in order (`lax.fori_loop`), all N columns at once, each vector's codes
             chosen to minimise the objective with every other vector fixed — with A = H_jj (8 × 8) and the current
             error E = W − Ŵ, that is vᵀ A v − 2 vᵀ b, b = A v_old + (H E)_j / s — by AQLM's beam search: for each
             table in turn keep the `beam` best partial sums (the last table: the best one); the new codes replace
             the old only when they lower the objective (never up), and H E is updated by the 8 rows' change. The
             candidate costs (N × beam × 2^B per table) are formed in batches of columns (`lax.map`) to bound memory;
    tables   (b) least squares against the layer objective with codes and scales fixed (Ŵ is linear in the table
             entries): `update_iters` conjugate-gradient steps on the normal equations from the current tables, kept
             only if the float16-rounded result lowers the objective;
    refit    (optional) the scales refitted to the layer objective per column (`gptvq.refit_group_scales`).

(a) and (b) (and the refit) alternate `iters` times. Bits per weight = M · 8 / 8 (a byte per index, so B < 8 pays 8)
+ 16 / R (scales, R = group_size or K) + 16 · G · M · 2^B · 8 / (K · N) (the G sets of tables), all counted by
`QTensor.bits_per_weight`: aq8x2 per channel on a 576 × 1536 kernel is 2.0 + 0.028 + 0.074 = 2.10.
Not here: AQLM's end-to-end fine-tuning of the codebooks and scales over whole blocks.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax

from jq.algorithms.codebook_feedback import damped, hessian_or_identity
from jq.algorithms.gptvq import refit_group_scales, solve_tables
from jq.algorithms.kmeans import assign, lloyd
from jq.algorithms.registry import register_method
from jq.algorithms.stats import LayerStats
from jq.numbers import additive
from jq.numbers import codebook as cbk
from jq.numbers.qtensor import Layout, QTensor
from jq.numbers.scheme import Scheme

__all__ = ["AQLM", "aqlm", "beam_pass", "beam_search", "decode_kernel", "init_tables", "update_tables"]

VEC = additive.VEC
GAIN = 1.0  # scale = RMS / GAIN: the learned tables absorb any constant; 1 keeps the fitted values O(1) for float16
_HP = lax.Precision.HIGHEST
_BEAM_ELEMENTS = 1 << 22  # candidate costs (columns × beam × 2^B) per batch of the beam search


def _vectors(x: jnp.ndarray, rows: int) -> jnp.ndarray:
    """[K, N] → [G, (rows / 8) · N, 8]: each group's vectors, ordered (row block, column)."""
    K, N = x.shape
    return jnp.transpose(x.reshape(K // rows, rows // VEC, VEC, N), (0, 1, 3, 2)).reshape(K // rows, -1, VEC)


def decode_kernel(codes: jnp.ndarray, tables: jnp.ndarray) -> jnp.ndarray:
    """Unscaled kernel [K, N] of codes [K / 8, N, M] into tables [G, M, E, 8] (row block j reads group j // (K/8G))."""
    kb, N, M = codes.shape
    G = tables.shape[0]
    v = jax.vmap(additive.sum_codewords)(codes.reshape(G, kb // G, N, M), tables)  # [G, kb/G, N, 8]
    return jnp.transpose(v, (0, 1, 3, 2)).reshape(kb * VEC, N)


def init_tables(y: jnp.ndarray, weight: jnp.ndarray, rows: int, books: int, entries: int,
                iters: int) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Residual k-means: y [K, N] (weights / scales), weight [K, N] ≥ 0 (per-weight sensitivity) → tables
    [G, M, E, 8] (float16-rounded, float32) and codes int32 [K / 8, N, M]; per group of `rows` rows, table m is
    fitted by weighted Lloyd (`iters` iterations) to the residuals of tables 1 .. m − 1."""
    K, N = y.shape
    x, wt = _vectors(y, rows), _vectors(weight, rows)
    wt = wt / jnp.maximum(jnp.max(wt), 1e-30)

    def one(x, wt):  # one group: [n, 8] each
        def level(r, _):
            c = cbk.as_stored(lloyd(r, wt, entries, iters))
            a = assign(r, wt, c)
            return r - c[a], (c, a)

        _, (c, a) = lax.scan(level, x, None, length=books)
        return c, a.T  # [M, E, 8], [n, M]

    tables, idx = jax.vmap(one)(x, wt)
    return tables, idx.reshape(K // VEC, N, books)


def beam_search(b: jnp.ndarray, a: jnp.ndarray, t: jnp.ndarray, tat: jnp.ndarray,
                beam: int) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Codes int32 [M] of one vector v = Σ_m t[m, c_m] minimising vᵀ a v − 2 vᵀ b (b [8], a [8, 8] symmetric,
    tables t [M, E, 8], tat [M, E] = each entry's tᵀ a t), by beam search over the tables in order: after table m
    the `beam` best partial sums p are kept (cost(p + c) = cost(p) + cᵀac + 2 cᵀ(a p − b)); the last table keeps
    one. beam = 1 is greedy residual coding. Returns (codes [M], cost)."""
    M, E, _ = t.shape
    k = min(beam, E) if M > 1 else 1
    neg, idx = lax.top_k(-(tat[0] - 2 * jnp.matmul(t[0], b, precision=_HP)), k)
    cost, codes, p = -neg, idx[:, None], t[0][idx]  # [k], [k, 1], [k, 8]
    for m in range(1, M):
        lin = jnp.matmul(jnp.matmul(p, a, precision=_HP) - b, t[m].T, precision=_HP)  # [k, E]
        cand = (cost[:, None] + tat[m][None] + 2 * lin).reshape(-1)
        neg, flat = lax.top_k(-cand, min(beam, cand.shape[0]) if m < M - 1 else 1)
        src, e = flat // E, flat % E
        cost, codes, p = -neg, jnp.concatenate([codes[src], e[:, None]], axis=1), p[src] + t[m][e]
    return codes[0], cost[0]


def _quad(v: jnp.ndarray, a: jnp.ndarray, b: jnp.ndarray) -> jnp.ndarray:
    """vᵀ a v − 2 vᵀ b per row of v, b [N, 8]."""
    return jnp.sum(v * (jnp.matmul(v, a, precision=_HP) - 2 * b), axis=-1)


def beam_pass(w: jnp.ndarray, h: jnp.ndarray, tables: jnp.ndarray, scale: jnp.ndarray, codes: jnp.ndarray,
              beam: int) -> jnp.ndarray:
    """One sweep of exact block coordinate descent on tr((W − Ŵ)ᵀ H (W − Ŵ)) over the row blocks of 8, the codes
    of each block's N vectors chosen by `beam_search` against the full quadratic form (the other vectors fixed) and
    kept only where they lower it. w [K, N], h [K, K], tables [G, M, E, 8], scale [G, N], codes [K / 8, N, M] →
    new codes (same shape and dtype); the objective never goes up."""
    K, N = w.shape
    G, _, E, _ = tables.shape
    rows = K // G
    s_rows = jnp.repeat(scale, rows, axis=0)
    he = jnp.matmul(h, w - s_rows * decode_kernel(codes, tables), precision=_HP)  # H E [K, N]
    batch = max(1, min(N, _BEAM_ELEMENTS // (max(beam, 1) * E)))

    def block(j, carry):
        he, codes = carry
        r0 = j * VEC
        a = lax.dynamic_slice(h, (r0, r0), (VEC, VEC))
        t, s = tables[r0 // rows], scale[r0 // rows]  # [M, E, 8], [N]
        tat = jnp.einsum("mei,ij,mej->me", t, a, t, precision=_HP)
        c_old = codes[j]
        v_old = additive.sum_codewords(c_old, t)  # [N, 8]
        grad = lax.dynamic_slice(he, (r0, 0), (VEC, N)).T / jnp.where(s != 0, s, 1.0)[:, None]
        b = jnp.matmul(v_old, a, precision=_HP) + jnp.where(s != 0, 1.0, 0.0)[:, None] * grad
        c_new, _ = lax.map(lambda bb: beam_search(bb, a, t, tat, beam), b, batch_size=batch)
        v_new = additive.sum_codewords(c_new, t)
        better = _quad(v_new, a, b) < _quad(v_old, a, b)
        c = jnp.where(better[:, None], c_new.astype(codes.dtype), c_old)
        delta = (jnp.where(better[:, None], v_new, v_old) - v_old) * s[:, None]  # [N, 8]
        he = he - jnp.matmul(lax.dynamic_slice(h, (0, r0), (K, VEC)), delta.T, precision=_HP)
        return he, codes.at[j].set(c)

    return lax.fori_loop(0, K // VEC, block, (he, codes))[1]


def update_tables(w: jnp.ndarray, h: jnp.ndarray, codes: jnp.ndarray, tables: jnp.ndarray, scale: jnp.ndarray,
                  iters: int) -> jnp.ndarray:
    """Tables [G, M, E, 8] minimising tr((W − Ŵ)ᵀ H (W − Ŵ)) for fixed codes [K / 8, N, M] and scales [G, N]: `iters`
    conjugate-gradient steps from `tables` on the normal equations PᵀHP c = PᵀHW (Ŵ = P c: each weight the sum of
    M entries times its scale), rounded to float16 and kept only if that lowers the objective; entries no vector
    uses keep their values."""
    K, N = w.shape
    G, M, E, _ = tables.shape
    s = jnp.repeat(scale, K // G, axis=0)  # [K, N]
    k = jnp.arange(K)
    flat = ((((k // (K // G))[:, None, None] * M + jnp.arange(M)) * E + jnp.repeat(codes, VEC, axis=0)) * VEC
            + (k % VEC)[:, None, None]).reshape(-1)  # [K · N · M]: where each weight's m-th entry lives

    def expand(c):  # P c [K, N]
        return jnp.sum(c.reshape(-1)[flat].reshape(K, N, M), axis=-1) * s

    def adjoint(y):  # Pᵀ y
        y = jnp.broadcast_to((y * s)[..., None], (K, N, M)).reshape(-1)
        return jax.ops.segment_sum(y, flat, num_segments=tables.size).reshape(tables.shape)

    return solve_tables(w, h, tables, expand, adjoint, iters, cbk.as_stored)


@cbk.on_leading_matrix
def aqlm(w: jnp.ndarray, scheme: Scheme, layout: Layout, stats: LayerStats | dict | None = None, *,
         beam: int = 8, iters: int = 3, init_iters: int = 10, update_iters: int = 20, damp: float = 0.01,
         refit: bool = True) -> QTensor:
    """Quantize a kernel w [K, N] to additive codebooks (format `aq{B}x{M}`) by AQLM's alternation.

    Args:
      stats: `LayerStats` with `hessian` [K, K]; None (a layer no calibration token reached) fits with H = I.
      beam: hypotheses kept per table in the beam search (1: greedy).
      iters: rounds of (codes by beam search, tables by least squares[, scales refit]); 0 keeps the k-means init.
      init_iters: Lloyd iterations per table of the residual k-means init.
      update_iters: conjugate-gradient steps of each table update (0 skips it).
      damp: relative damping of the Hessian (as GPTQ).
      refit: refit each column's scales to the layer objective after each table update.
    Returns a QTensor: codes uint8 [K / 8, N, M], codebook float16 [G, 1, M, 2^B, 8], scales float16 [G, N].
    """
    f = scheme.fmt
    cbk.check_shared_layout(f, layout, "aqlm", kind="additive")
    stats = LayerStats.coerce(stats)
    K, N = layout.shape
    rows = cbk.rows_per_group(layout)
    G = K // rows
    w32 = jnp.asarray(w, jnp.float32)
    h = damped(hessian_or_identity(stats, K), damp)
    scale = cbk.as_stored(cbk.rms_scales(w32.reshape(G, rows, N), axis=1) / GAIN)  # [G, N]
    s_rows = jnp.repeat(scale, rows, axis=0)
    tables, codes = init_tables(w32 / s_rows, jnp.diagonal(h)[:, None] * s_rows**2, rows, f.books, 2**f.bits,
                                init_iters)

    def round_(_, c):
        tables, codes, scale = c
        codes = beam_pass(w32, h, tables, scale, codes, beam)
        if update_iters:
            tables = update_tables(w32, h, codes, tables, scale, update_iters)
        if refit:
            scale = cbk.as_stored(refit_group_scales(w32, h, decode_kernel(codes, tables), scale))
        return tables, codes, scale

    tables, codes, scale = lax.fori_loop(0, iters, round_, (tables, codes, scale))
    q = QTensor(codes=codes.astype(jnp.uint8), scale=scale.reshape(layout.scale_shape).astype(jnp.float16),
                codebook=tables[:, None].astype(jnp.float16), fmt=scheme.format, layout=layout, symmetric=True,
                dtype=jnp.dtype(w.dtype).name, policy=scheme.policy)
    q.check("aqlm QTensor")
    return q


@dataclasses.dataclass(frozen=True)
class AQLM:
    """AQLM as a method record (`method: aqlm`, options `beam`, `iters`, `init_iters`, `update_iters`, `damp`,
    `refit`)."""

    beam: int = 8
    iters: int = 3
    init_iters: int = 10
    update_iters: int = 20
    damp: float = 0.01
    refit: bool = True

    def __post_init__(self):
        for name, lo in (("beam", 1), ("iters", 0), ("init_iters", 1), ("update_iters", 0)):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < lo:
                raise ValueError(f"method 'aqlm': option {name!r} has value {v!r}; use an int ≥ {lo}")
        if not isinstance(self.refit, bool):
            raise ValueError(f"method 'aqlm': option 'refit' has value {self.refit!r}; use true or false")
        if not isinstance(self.damp, (int, float)) or isinstance(self.damp, bool) or not self.damp > 0:
            raise ValueError(f"method 'aqlm': option 'damp' has value {self.damp!r}; use a positive ratio (0.01)")

    def quantize(self, w: jnp.ndarray, scheme: Scheme, layout: Layout,
                 stats: LayerStats | dict | None = None) -> QTensor:
        """`aqlm` of the kernel w [K, N]."""
        return aqlm(w, scheme, layout, stats, beam=self.beam, iters=self.iters, init_iters=self.init_iters,
                    update_iters=self.update_iters, damp=float(self.damp), refit=self.refit)


register_method("aqlm", AQLM, needs_calibration=True)
