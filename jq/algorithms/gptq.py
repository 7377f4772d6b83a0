"""GPTQ (Frantar et al. 2022, "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained Transformers").

Quantizes the input channels of a kernel one at a time and feeds each one's rounding error back into the channels
not yet quantized, weighted by the inverse Hessian of the layer's output error ‖X W − X Q‖², H = XᵀX:

    U = upper Cholesky factor of (H + λI)⁻¹            (UᵀU = (H + λI)⁻¹, λ = damp · mean diag H)
    for each input channel j (a row of the Flax kernel, a column of the paper's PyTorch weight), in order:
        q_j = quant(w_j);   e_j = (w_j − q_j) / U_jj;   w_k −= U_jk · e_j  for k > j

No inverse is formed: with H + λI = V Vᵀ (V upper triangular, U = V⁻¹) the updates, written against the errors
Δ_j = w_j − q_j of the *original* weights, are w_k = w_k⁰ + Σ_{j<k} (V_jk / V_kk) Δ_j (the unit-triangular form of
Chee et al. 2023, "QuIP"): one Cholesky instead of Cholesky, inverse and Cholesky, and no inversion of an
ill-conditioned matrix in float32. The objective e_j = (w_j − q_j)·V_jj is accumulated as it goes.

Loops (lazy batch updates): a `lax.fori_loop` over blocks of `block_size`, inside it sub-blocks of 16 channels,
inside those single channels; each level updates the rest of its parent with one matmul. The blocks run in 4
segments whose trailing updates skip rows already done (≈40% fewer flops). No Python loop runs over K.

Grids. Channel / tensor granularity: one range from the whole weight up front, as the reference does. Groups: a
group's scale / zero come from its *current* weights when its first channel is reached (the originals plus the
error feedback so far, recovered by one unit-triangular [g, g] solve), or for all groups up front with
`static_groups=True`; the range is the scheme's or, with `hqq`, HQQ's fit to those rows. `block_size` is rounded
so a group never starts inside a block it does not fit in, so the result does not depend on it beyond rounding
(the reference takes a mid-block group from weights lacking that block's feedback; at 128 / 128 both agree).

Act-order (`act_order=True`): channels by descending diag H. Groups are formed in that order and codes stored
permuted (`perm`, stored = W[perm] along K) unless groups are static or absent (then no `perm` is needed). With
several contraction axes (o_proj [heads, head_dim, d_model]) the stored permutation is of the group axis, shared by
the leading indices: that axis is ordered by diag H summed over them and processed one leading index at a time.

Conditioning. Inputs that never fire (diag H = 0) are decoupled by the damping and rounded without feedback (the
published code zeroes their rows, wrong wherever they are live). A failed Cholesky (NaN) raises the damping ×10 up
to `max_damp_tries` times inside the jitted computation; if it still fails, or H carries no data, the layer falls
back to round-to-nearest (V = I). `gptq_with_info` reports the damping, the fallback and the objective.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jq.algorithms.gptq_plan import check_options, on_leading_axes, plan, processing_order
from jq.algorithms.grids import GridFitter, RangeFit
from jq.algorithms.hqq import HQQFit
from jq.algorithms.refit import LeastSquaresRefit
from jq.algorithms.registry import register_method
from jq.algorithms.stats import LayerStats
from jq.numbers.qtensor import Layout, QTensor
from jq.numbers.scheme import Scheme

__all__ = ["GPTQ", "gptq", "gptq_with_info"]

_SEGMENTS = 4  # block loops per run (see the trailing update)


def _upper_cholesky(h: jnp.ndarray) -> jnp.ndarray:
    """Upper-triangular V with h = V Vᵀ (NaN if h is not positive definite): the reversed matrix's Cholesky factor,
    reversed (J h J = L Lᵀ ⇒ h = (J L J)(J L J)ᵀ). Reads one triangle of h (no symmetrising pass)."""
    return lax.linalg.cholesky(h[::-1, ::-1], symmetrize_input=False)[::-1, ::-1]


def _group_params(x: jnp.ndarray, scheme: Scheme, grid: GridFitter, valid: jnp.ndarray | None = None):
    """Grid parameters (scale [N], zero [N] or None) of one group of rows x [g, N] by the grid fitter (`valid` [g]
    masks padding rows out)."""
    s, z = grid.fit(x[None], scheme, (1,), valid=None if valid is None else valid[None, :, None])
    n = x.shape[-1]
    return s.reshape(n), None if z is None else z.reshape(n)


def gptq_with_info(
    w: jnp.ndarray,
    scheme: Scheme,
    layout: Layout,
    stats: LayerStats | dict,
    *,
    block_size: int = 128,
    damp: float = 0.01,
    act_order: bool = False,
    static_groups: bool = False,
    max_damp_tries: int = 6,
    grid: GridFitter = RangeFit(),
    refit: LeastSquaresRefit | None = None,
) -> tuple[QTensor, dict[str, jnp.ndarray]]:
    """GPTQ-quantize `w` and report how it went.

    Args:
      w: kernel in its logical shape `layout.shape`, contraction axes leading (Dense (K, N), axes (0,)).
      scheme, layout: the grid and the validated layout (channel, tensor or per-axis groups, optionally padded).
      stats: `LayerStats` (or a mapping of its fields) with `hessian` [K, K] (mean xᵀx over calibration tokens, K =
        contraction axes flattened; any positive multiple works) and optionally `count` (tokens seen; 0 means no
        data → RTN fallback).
      block_size: channels per lazy batch update (a speed knob; rounded to fit the groups, see the module doc).
      damp: relative damping λ / mean(diag H).
      act_order: process channels by descending diag H.
      static_groups: compute all group grids up front from the original weights.
      max_damp_tries: how many times damping is raised ×10 when the Cholesky factorisation fails.
      grid: how a group's grid is fitted from its current rows when the group is formed: the scheme's range
        (`RangeFit`, default) or HQQ (`jq.algorithms.hqq.HQQFit`; asymmetric int groups formed during the pass
        only). Channel / tensor / static grids use the scheme's range.
      refit: a `LeastSquaresRefit` to refit the group scales (and float zero points) to the final codes by least
        squares on the damped H after the pass; groups formed during the pass only (not channel / static).

    Returns:
      (QTensor, info) with info = {"damp": f32 final relative damping, "fallback": bool (RTN was used),
      "no_data": bool (H carried no signal at all: the reason for a fallback), "dead": int32 inputs that never
      fired (diag H = 0; rounded without feedback), "err": f32 GPTQ objective Σ_j ‖w'_j − q_j‖² / U_jj² over the
      real channels (w'_j: channel j when it was quantized). It equals tr((W−Q)ᵀ(H + λI)(W−Q)), so it is in the
      units of the given H: divide by tr(WᵀHW) for a relative figure}.
    """
    p = plan(layout, block_size, act_order, static_groups)
    fitted = check_options(p, layout, scheme, grid, refit, static_groups)
    K, Kp, Kt, N, B, S, g = p.K, p.Kp, p.Kt, p.N, p.B, p.S, p.g
    stats = LayerStats.coerce(stats)
    if stats is None or stats.hessian is None:
        raise ValueError(
            "gptq: needs stats.hessian ([K, K] mean of xᵀx); run jq.calibration.capture first or use method: rtn")
    h = jnp.asarray(stats.hessian, jnp.float32)
    if h.shape != (K, K):
        raise ValueError(f"gptq: stats.hessian has shape {h.shape}; a kernel of shape {layout.shape} with contraction "
                         f"axes {layout.axes} needs ({K}, {K}): capture this layer's inputs, or use method: rtn")
    f32 = jnp.float32

    # -- Hessian conditioning: dead inputs, no data ------------------------------------------------------
    # A dead input (x_j = 0 on every calibration token) has a zero row and column in H; the damping alone makes
    # its diagonal positive, so it is decoupled from the others and its weights are rounded without feedback.
    # (The published code zeroes them instead, which breaks the layer wherever that input is live.)
    diag = jnp.diagonal(h)
    no_data = jnp.all(diag == 0)
    if stats.count is not None:
        no_data = no_data | (jnp.asarray(stats.count) <= 0)
    dead = (diag == 0) & ~no_data
    mdiag = jnp.mean(diag)

    # the weight in the stored, flattened view [Kp, N] (group axis zero-padded)
    ws = layout.to_grouped(jnp.asarray(w, f32)).reshape(Kp, N)

    # -- grid parameters fixed up front (channel / tensor / static groups) -----------------------------------
    scale_g = zero_g = None
    if p.level in ("fixed", "static"):
        scale_g, zero_g = RangeFit().fit(ws.reshape(layout.grouped_shape), scheme, layout.reduce_axes)

    # -- processing order ----------------------------------------------------------------------------------
    order, o, pos_proc, shared = processing_order(p, layout, diag, act_order)
    h_real = h if o is None else h[o][:, o]
    # H in processing order [Kt, Kt]; padding rows / columns are zero here and get diagonal mean(diag H)
    # below (decoupled from the real inputs, any positive value would do)
    if pos_proc is None:
        hp = jnp.pad(h_real, ((0, Kt - K), (0, Kt - K)))
        pad_diag = jnp.where(jnp.arange(Kt) >= K, mdiag, 0.0)
    else:
        hp = jnp.zeros((Kt, Kt), f32).at[pos_proc[:, None], pos_proc[None, :]].set(h_real)
        pad_np = np.ones(Kt, np.float32)
        pad_np[pos_proc] = 0.0
        pad_diag = jnp.asarray(pad_np) * mdiag

    # -- damped Cholesky factor H + λI = V Vᵀ (V upper, = U⁻¹), damping raised ×10 while it fails -------------
    # The first attempt runs unconditionally and the retries only under a `cond`, so the common case carries no
    # K×K arrays through a loop. All attempts failing gives V = I: RTN, no error feedback.
    eye = jnp.eye(Kt, dtype=f32)

    def attempt(tries):
        lam = damp * jnp.power(f32(10.0), tries.astype(f32)) * mdiag
        v = _upper_cholesky(hp + jnp.diag(pad_diag + lam))
        return v, jnp.all(jnp.isfinite(jnp.diagonal(v)))  # a failed factorisation is all NaN

    def retries():
        def body(state):
            tries, _, _ = state
            v, ok = attempt(tries)
            return tries + 1, v, ok

        def again(state):
            tries, _, ok = state
            return ~ok & (tries <= max_damp_tries) & ~no_data

        tries, v, ok = lax.while_loop(again, body, (jnp.int32(1), v0, ok0))
        ok = ok & ~no_data
        return tries, jnp.where(ok, v, eye), ok

    v0, ok0 = attempt(jnp.int32(0))
    tries, v, ok = lax.cond(ok0 & ~no_data, lambda: (jnp.int32(1), v0, ok0), retries)
    final_damp = damp * jnp.power(f32(10.0), (tries - 1).astype(f32))
    fallback = ~ok
    vd = jnp.diagonal(v)  # 1 / U_jj: the error e_j = (w'_j − q_j) / U_jj of the paper's objective
    rvd = 1.0 / vd  # the feedback coefficients are a_jk = V_jk / V_kk (unit upper triangular), applied per slice
    if act_order:  # an RTN fallback quantizes in the original order
        order = jnp.where(fallback, jnp.arange(Kt, dtype=jnp.int32), order)

    # -- the GPTQ loop ---------------------------------------------------------------------------------------
    wt = jnp.pad(ws, ((0, Kt - Kp), (0, 0)))
    w0 = wt if order is None else wt[order]  # original weights, processing order
    mask_s = np.zeros(Kt, np.float32)
    mask_s[p.real_positions] = 1.0  # real (not padding) rows, stored order
    mask = jnp.asarray(mask_s) if order is None else jnp.asarray(mask_s)[order]

    sym = scheme.symmetric  # no zero points
    code_dtype = jax.eval_shape(lambda x: scheme.grid.encode(x, jnp.ones_like(x), None if sym else jnp.zeros_like(x)),
                                jax.ShapeDtypeStruct((N,), f32)).dtype

    if p.level == "fixed":  # channel: [N] values; tensor: one
        s_fix = jnp.broadcast_to(scale_g.reshape(-1), (N,))
        z_fix = None if zero_g is None else jnp.broadcast_to(zero_g.reshape(-1), (N,))
    if p.level == "static":
        s_tab = scale_g.reshape(Kp // g, N)
        z_tab = None if zero_g is None else zero_g.reshape(Kp // g, N)
        src = jnp.arange(Kt) if order is None else order
        gid = jnp.minimum(src // g, Kp // g - 1).astype(jnp.int32)
    n_groups = Kt // g if p.level in ("column", "block") else 1

    def zeros_n():
        return jnp.zeros((N,), f32)

    def new_group(start, rows, cur, sc, zc):
        """At a group's first channel `start` (processed index), its grid from its current rows.

        `rows()` gives (L, W0, A): the group's rows with the feedback of all earlier channels applied in the
        Δ form, their original values, and a[group, group]. GPTQ's grid is taken from the OBS-updated rows
        W0 + (U-form feedback so far), which are W0 + A⁻ᵀ (L − W0): a unit-triangular [g, g] solve."""

        def params():
            lg, w0g, ag = rows()
            cur_g = w0g + lax.linalg.triangular_solve(ag, lg - w0g, left_side=True, lower=False, transpose_a=True,
                                                      unit_diagonal=True)
            valid = lax.dynamic_slice_in_dim(mask, start, g) if fitted else None
            return _group_params(cur_g, scheme, grid, valid)

        cur = lax.cond(start % g == 0, params, lambda: cur)
        sc = lax.dynamic_update_slice_in_dim(sc, cur[0][None], start // g, 0)
        if zc is not None:
            zc = lax.dynamic_update_slice_in_dim(zc, cur[1][None], start // g, 0)
        return cur, sc, zc

    def grid_rows(r0, n, cur):
        """Scale / zero of the n processed rows from r0, broadcastable against [n, N]."""
        if p.level == "fixed":
            return s_fix, z_fix
        if p.level == "static":
            k = lax.dynamic_slice_in_dim(gid, r0, n)
            return s_tab[k], None if z_tab is None else z_tab[k]
        return cur  # a sub-block lies inside one group

    def channels(r0, ws, w0s, as_, cur, loss):
        """Quantize the S channels ws [S, N] (current weights; w0s the original ones) starting at processed
        index r0, one by one with feedback through as_ = a[r0:r0+S, r0:r0+S]. Returns Δ [S, N], codes, loss.

        The per-channel loop is kept minimal (it runs K times): it rounds one row and feeds its Δ to the later
        rows of the sub-block through the strictly upper part of as_, so each row keeps the value it was rounded
        from; codes are kept, and Δ and the objective are computed for the sub-block at once afterwards."""
        n = ws.shape[0]
        s_all, z_all = grid_rows(r0, n, cur)
        strict = as_ * (1.0 - jnp.eye(n, dtype=f32))

        def body(i, c):
            ws, cs = c
            s = s_all if s_all.ndim == 1 else s_all[i]
            z = z_all if z_all is None or z_all.ndim == 1 else z_all[i]
            row = ws[i]
            code = scheme.grid.encode(row, s, z)
            d = w0s[i] - scheme.grid.decode(code, s, z)
            ws = ws + strict[i][:, None] * d[None, :]
            return ws, lax.dynamic_update_slice_in_dim(cs, code[None], i, 0)

        ws, cs = lax.fori_loop(0, n, body, (ws, jnp.zeros((n, N), code_dtype)))
        q = scheme.grid.decode(cs, s_all, z_all)
        e = (ws - q) * (lax.dynamic_slice_in_dim(vd, r0, n) * lax.dynamic_slice_in_dim(mask, r0, n))[:, None]
        return w0s - q, cs, loss + jnp.sum(e * e)

    def t_matmul(x, y):  # xᵀ y
        return lax.dot_general(x, y, (((0,), (0,)), ((), ())), precision=lax.Precision.HIGHEST)

    def block(b, carry, start):
        wp, codes, cur, sc, zc, loss = carry
        i1 = b * B
        w1 = lax.dynamic_slice_in_dim(wp, i1, B, 0)
        w01 = lax.dynamic_slice_in_dim(w0, i1, B, 0)
        a1 = lax.dynamic_slice(v, (i1, i1), (B, B)) * lax.dynamic_slice_in_dim(rvd, i1, B)[None, :]
        if p.level == "block":  # groups span whole blocks: a group's rows are all current at its first block
            # (sliced outside the `cond`: closing over the K×K factor inside it costs a copy per block)
            rows = (lax.dynamic_slice_in_dim(wp, i1, g, 0), lax.dynamic_slice_in_dim(w0, i1, g, 0),
                    lax.dynamic_slice(v, (i1, i1), (g, g)) * lax.dynamic_slice_in_dim(rvd, i1, g)[None, :])
            cur, sc, zc = new_group(i1, lambda: rows, cur, sc, zc)

        def sub(j, c):  # a sub-block of S channels; the rest of the block is updated by one matmul after it
            w1, d1, c1, cur, sc, zc, loss = c
            j1 = j * S
            if p.level == "column":  # S divides g: a group starts at a sub-block start, its rows are current
                cur, sc, zc = new_group(i1 + j1, lambda: (lax.dynamic_slice_in_dim(w1, j1, g, 0),
                                                          lax.dynamic_slice_in_dim(w01, j1, g, 0),
                                                          lax.dynamic_slice(a1, (j1, j1), (g, g))), cur, sc, zc)
            ds, cs, loss = channels(i1 + j1, lax.dynamic_slice_in_dim(w1, j1, S, 0),
                                    lax.dynamic_slice_in_dim(w01, j1, S, 0), lax.dynamic_slice(a1, (j1, j1), (S, S)),
                                    cur, loss)
            w1 = w1 + t_matmul(lax.dynamic_slice_in_dim(a1, j1, S, 0), ds)
            d1 = lax.dynamic_update_slice_in_dim(d1, ds, j1, 0)
            c1 = lax.dynamic_update_slice_in_dim(c1, cs, j1, 0)
            return w1, d1, c1, cur, sc, zc, loss

        init = (w1, jnp.zeros((B, N), f32), jnp.zeros((B, N), code_dtype), cur, sc, zc, loss)
        _, d1, c1, cur, sc, zc, loss = lax.fori_loop(0, B // S, sub, init)
        codes = lax.dynamic_update_slice_in_dim(codes, c1, i1, 0)
        # lazy batch update of the later channels: W'[start:] += a[block, start:]ᵀ Δ (a = V / diag V), with
        # `start` (static) the first row of this segment; rows up to the block end are done, their update harmless
        vrows = lax.dynamic_slice(v, (i1, start), (B, Kt - start))
        wp = lax.dynamic_update_slice_in_dim(wp, wp[start:] + t_matmul(vrows, d1) * rvd[start:, None], start, 0)
        return wp, codes, cur, sc, zc, loss

    cur0 = (zeros_n(), None if sym else zeros_n())
    sc0 = jnp.ones((n_groups, N), f32)
    zc0 = None if sym else jnp.zeros((n_groups, N), f32)
    init = (w0, jnp.zeros((Kt, N), code_dtype), cur0, sc0, zc0, f32(0.0))
    # blocks run in a few segments (a static count, so compile time does not grow with K); a segment's trailing
    # updates skip the rows of earlier segments, saving ~40% of the O(K²N) flops over one masked loop
    nb = Kt // B
    n_seg = _SEGMENTS if Kt >= 512 else 1  # small layers: the flops do not matter, one loop compiles faster
    bounds = sorted({round(nb * k / n_seg) for k in range(n_seg + 1)})
    carry = init
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        carry = lax.fori_loop(lo, hi, functools.partial(block, start=lo * B), carry)
    _, codes, _, sc, zc, loss = carry
    if refit is not None:
        fit_zero = not sym and scheme.zero_point == "float"
        zrow = None if sym or fit_zero else jnp.repeat(zc, g, axis=0)
        vals = scheme.grid.decode(codes, jnp.ones((1, N), f32), zrow)
        h_d = hp + jnp.diag(pad_diag + final_damp * mdiag)
        sc2, zc2 = refit.refine(w0, vals, h_d, mask, g, sc, zc, fit_zero)
        sdt = jnp.dtype(scheme.scale_dtype)
        sc2 = sc2.astype(sdt).astype(f32)
        zc2 = zc2 if zc2 is None or not fit_zero else zc2.astype(sdt).astype(f32)
        keep = fallback | no_data
        sc = jnp.where(keep, sc, sc2)
        zc = zc if zc is None else jnp.where(keep, zc, zc2)
        err_m = (w0 - scheme.grid.decode(codes, jnp.repeat(sc, g, axis=0),
                                    None if zc is None else jnp.repeat(zc, g, axis=0))) * mask[:, None]
        loss = jnp.where(keep, loss, jnp.sum(err_m * jnp.matmul(h_d, err_m, precision=lax.Precision.HIGHEST)))

    # -- back to the stored layout -------------------------------------------------------------------------
    perm = None
    if order is not None and not p.store_perm:
        codes = codes[jnp.argsort(order)]  # stored position order[j] holds processed row j
    elif p.store_perm:
        perm = order[:K].astype(jnp.int32) if shared is None else jnp.where(
            fallback, jnp.arange(shared.shape[0], dtype=jnp.int32), shared)
    codes = codes[:Kp].reshape(layout.grouped_shape)
    if p.level in ("column", "block"):
        gp = Kp // g
        scale_g = jnp.expand_dims(sc[:gp].reshape(layout.scale_shape), layout.inner_axis)
        zero_g = None if zc is None else jnp.expand_dims(zc[:gp].reshape(layout.scale_shape), layout.inner_axis)
    q = scheme.make_qtensor(codes, scale_g, zero_g, layout, w.dtype, perm=perm)
    info = {"damp": final_damp.astype(f32), "fallback": fallback, "err": loss, "no_data": no_data,
            "dead": jnp.sum(dead).astype(jnp.int32)}
    return q, info


@dataclasses.dataclass(frozen=True)
class GPTQ:
    """GPTQ as a method record: the options of `gptq_with_info`, with its grid fitter and refit as records.
    `method: gptq` in a recipe builds it from options (`from_options`: `hqq: true | {p: 1}` → an `HQQFit` grid,
    `refit: true` → `LeastSquaresRefit`)."""

    grid: GridFitter = RangeFit()
    refit: LeastSquaresRefit | None = None
    block_size: int = 128
    damp: float = 0.01
    act_order: bool = False
    static_groups: bool = False
    max_damp_tries: int = 6

    @classmethod
    def from_options(cls, *, hqq: bool | dict | tuple = False, refit: bool = False, **options) -> GPTQ:
        """The record a recipe rule's options describe (the other options are fields)."""
        grid = RangeFit() if hqq in (False, None) else HQQFit(**({} if hqq is True else dict(hqq)))
        return cls(grid=grid, refit=LeastSquaresRefit() if refit else None, **options)

    def quantize_with_info(self, w: jnp.ndarray, scheme: Scheme, layout: Layout,
                           stats: LayerStats | dict) -> tuple[QTensor, dict[str, jnp.ndarray]]:
        """`gptq_with_info` with this record's options: (QTensor of w [K, N], info)."""
        return on_leading_axes(lambda w, lay: gptq_with_info(w, scheme, lay, stats, **{  # any axis arrangement
            f.name: getattr(self, f.name) for f in dataclasses.fields(self)}), w, layout)

    def quantize(self, w: jnp.ndarray, scheme: Scheme, layout: Layout, stats: LayerStats | dict) -> QTensor:
        """The QTensor of w [K, N] alone."""
        return self.quantize_with_info(w, scheme, layout, stats)[0]


def gptq(w: jnp.ndarray, scheme: Scheme, layout: Layout, stats: LayerStats | dict, **options) -> QTensor:
    """GPTQ quantization of a kernel w [K, N] against calibration `stats.hessian` [K, K], with a recipe's options
    (`GPTQ.from_options`); `gptq_with_info` also reports the final damping, whether the layer fell back to RTN, its
    dead inputs and the objective. `quantize_leaf` uses that variant (outside jit) to warn per layer."""
    return GPTQ.from_options(**options).quantize(w, scheme, layout, stats)


register_method("gptq", GPTQ.from_options, needs_calibration=True, reports_info=True)
