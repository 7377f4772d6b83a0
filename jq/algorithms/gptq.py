"""GPTQ (Frantar et al. 2022, "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained Transformers").

Quantizes the input channels of a kernel one at a time and feeds each one's rounding error back into the channels
not yet quantized, weighted by the inverse Hessian of the layer's output error ‖X W − X Q‖², H = XᵀX.
The paper:

    U = upper Cholesky factor of (H + λI)⁻¹            (UᵀU = (H + λI)⁻¹, λ = damp · mean diag H)
    for each input channel j (a row of the Flax kernel, a column of the paper's PyTorch weight), in order:
        q_j = quant(w_j);   e_j = (w_j − q_j) / U_jj;   w_k −= U_jk · e_j  for k > j

with lazy batch updates: the channels of a block of `block_size` are processed one by one against the block, the
rest of the weight is updated once per block with one matmul.

This implementation computes the same thing without forming an inverse. With H + λI = V Vᵀ, V upper triangular
(a Cholesky factor of the reversed matrix), U = V⁻¹, and the updates above, rewritten against the errors
Δ_j = w_j − q_j of the *original* weights, become w_k = w_k⁰ + Σ_{j<k} (V_jk / V_kk) Δ_j (the unit-triangular
form of Chee et al. 2023, "QuIP", which shows it equals GPTQ). That is one Cholesky (K³/3 flops) instead of
Cholesky, inverse and a second Cholesky, and it avoids inverting an ill-conditioned matrix in float32. The
paper's objective e_j = (w_j − q_j)·V_jj is accumulated as it goes.

Loops: a `lax.fori_loop` over blocks (dynamic slices of arrays padded to a multiple of the block), inside it a
loop over sub-blocks of 16 channels, inside that a loop over channels; each level updates the rest of its parent
with one matmul. The blocks run in 4 segments whose trailing updates skip rows already done (≈40% fewer flops
than one masked loop). All counts are static and no Python loop runs over K, so compile time does not depend on K.

Grid parameters. Channel and tensor granularity: one range from the whole (dead-row-zeroed) weight up front, as
the reference does. Groups: the scale / zero of a group are computed when its first channel is reached, from the
group's *current* weights — the original ones plus the paper's error feedback of every channel quantized so far
(recovered from the Δ form by one unit-triangular [g, g] solve) — or, with `static_groups=True`, for all groups up
front from the original weights. The range is the scheme's (minmax, absmax, percentile, or the MSE clip search of
`jq.numbers.ranges.mse_clip`), or with the `hqq` option HQQ's half-quadratic fit of the group's zero (and scale) to those
current rows (`jq.algorithms.hqq.hqq_params`, early stopping per group). Blocks are adjusted so that a group never
starts inside a block it does not fit in: `block_size` is rounded down to a multiple of `group_size` (or to a divisor of it when groups are larger than
blocks), and the result does not depend on `block_size` beyond float rounding. (The reference code takes a group
starting mid-block from weights that lack the feedback of that block's earlier channels; with group_size a
multiple of block_size — 128 / 128, the usual setting — both agree.)

Act-order (`act_order=True`): channels are processed by descending diag H. Without static groups, groups are
formed in that order and the codes are stored permuted with `perm` (stored = W[perm] along K, see `QTensor`);
with static groups (or channel / tensor granularity) the codes are stored in the original order and no `perm` is
needed.

Conditioning. Inputs that never fire (diag H = 0) are decoupled by the damping alone and rounded without error
feedback (the published code zeroes their weight rows, which is wrong wherever they are live). If the
Cholesky factorisation fails (NaN), damping is raised ×10 up to `max_damp_tries` times inside the jitted
computation; if it still fails — or H carries no data at all (all zero, or `stats.count == 0`) — the layer
falls back to round-to-nearest (V = I: no error feedback). `gptq_with_info` reports the final damping, whether
that fallback happened and the GPTQ objective, so the caller can warn per layer.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jq.numbers import ranges
from jq.algorithms.registry import register
from jq.algorithms.stats import LayerStats
from jq.numbers.qtensor import Layout, QTensor
from jq.numbers.scheme import Scheme

__all__ = ["gptq", "gptq_with_info", "refit_groups"]


_SUB = 16  # channels per sub-block
_SEGMENTS = 4  # block loops per run (see the trailing update)


@dataclasses.dataclass(frozen=True)
class _Plan:
    """Static sizes of one GPTQ run (all Python ints / NumPy arrays, known at trace time)."""

    K: int  # real input channels (contraction axes flattened)
    Kp: int  # stored input channels (group axis zero-padded per leading index)
    Kt: int  # processed length: Kp rounded up to a multiple of the block
    N: int  # outputs (non-contraction axes flattened)
    B: int  # effective block size
    S: int  # sub-block size
    g: int | None  # group size (None for channel / tensor)
    level: str  # where grid params come from: "fixed", "static", "column" (in-block) or "block"
    store_perm: bool  # act-order groups: codes stored permuted, QTensor.perm set
    real_idx: np.ndarray | None  # [K] stored-flat position of each real channel; None when it is arange(K)


def _plan(layout: Layout, block_size: int, act_order: bool, static_groups: bool) -> _Plan:
    if layout.flat:
        raise ValueError(
            f"gptq: flat groups are not meaningful for GPTQ (layout {layout}); use per-axis groups with "
            "pad: true (flat_groups: false) for a group size that does not divide the input axis"
        )
    shape, axes = tuple(layout.shape), tuple(layout.axes)
    a = len(axes)
    if a == 0 or axes != tuple(range(a)) or a >= len(shape):
        raise ValueError(
            f"gptq: needs a kernel whose contraction axes lead and outputs follow (a Dense kernel (in, out) with "
            f"axes (0,), or DenseGeneral (in..., out...)); got layout shape={shape} axes={axes}. "
            "Quantize this weight with method: rtn"
        )
    if not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"gptq: block_size must be a positive int, got {block_size!r}")
    ka = shape[a - 1]
    ka_p = layout.padded if layout.padded is not None else ka
    lead = math.prod(shape[: a - 1])
    K, Kp, N = lead * ka, lead * ka_p, math.prod(shape[a:])
    group = layout.granularity == "group"
    store_perm = bool(act_order and group and not static_groups)
    if store_perm and a > 1:
        raise ValueError(
            f"gptq: act_order with groups stores a permutation of the group axis, which cannot express the order "
            f"of {K} flattened inputs of a kernel with contraction axes {axes} (shape {shape}); "
            "set static_groups: true (codes stay in the original order), or act_order: false"
        )
    real_idx = None
    if Kp != K:
        real_idx = (np.arange(lead)[:, None] * ka_p + np.arange(ka)[None, :]).reshape(-1)
    B = min(block_size, Kp)
    g = layout.group_size if group else None
    if not group:
        level = "fixed"
    elif static_groups:
        level = "static"
    elif g <= B:
        B, level = (B // g) * g, "column"
    else:
        d = max(x for x in range(1, B + 1) if g % x == 0)
        B, level = (d, "block") if 2 * d >= B else (g, "column")
    Kt = -(-Kp // B) * B
    # sub-blocks of S channels inside a block (S divides B, and g for in-block groups): channel-by-channel
    # updates touch only S rows, the rest of the block is updated by a matmul per sub-block
    m = g if level == "column" else B
    S = max(x for x in range(1, min(_SUB, m) + 1) if m % x == 0)
    if S < 4:
        S = B if level != "column" else S
    return _Plan(K, Kp, Kt, N, B, S, g, level, store_perm, real_idx)


def _upper_cholesky(h: jnp.ndarray) -> jnp.ndarray:
    """Upper-triangular V with h = V Vᵀ (NaN if h is not positive definite): the Cholesky factor of the
    reversed matrix, reversed (J h J = L Lᵀ ⇒ h = (J L J)(J L J)ᵀ). Reads one triangle of h (no symmetrising
    pass over a K×K array)."""
    return lax.linalg.cholesky(h[::-1, ::-1], symmetrize_input=False)[::-1, ::-1]


def _group_params(x: jnp.ndarray, scheme: Scheme, hqq: dict | None = None, valid: jnp.ndarray | None = None):
    """Grid parameters (scale [N], zero [N] or None) of one group of rows x [g, N], by the scheme's range, or by
    HQQ (`jq.algorithms.hqq.hqq_params` with options `hqq`; `valid` [g] masks padding rows out)."""
    if hqq is not None:
        from jq.algorithms.hqq import hqq_params

        s, z = hqq_params(x[None], scheme, (1,), weight=None if valid is None else valid[None, :, None], **hqq)
    else:
        lo, hi = ranges.estimate(x[None], (1,), scheme)
        s, z = scheme.scale_zero(lo, hi)
    n = x.shape[-1]
    return s.reshape(n), None if z is None else z.reshape(n)


def refit_groups(w0: jnp.ndarray, vals: jnp.ndarray, h: jnp.ndarray, mask: jnp.ndarray, g: int,
                 scale: jnp.ndarray, zero: jnp.ndarray | None, fit_zero: bool, ridge: float = 1e-4):
    """Least-squares refit of group scales (and float zero points) with the codes held fixed.

    With codes fixed, a dequantized group column is a·v + b·1 (v: the codes' grid values minus a fixed zero point,
    or the raw grid values when the zero point is refitted, b = −a·zero), linear in (a, b). The group parameters
    of one output column that minimise the layer objective tr((W − Ŵ)ᵀ H (W − Ŵ)) solve a [2G, 2G] system
    (G groups); all columns are solved at once. Across groups the parameters are coupled through H, which is
    what lets them absorb part of the rounding that GPTQ's feedback could not.

    Args (processing order, K rows = groups of g consecutive rows):
      w0: [K, N] original weights (padding rows zero); vals: [K, N] grid values of the codes (see above);
      h: [K, K] damped Hessian; mask: [K] 1 for real rows, 0 for padding; scale, zero: [G, N] current values;
      fit_zero: also fit b (float zero points); ridge: Levenberg–Marquardt pull toward the current values,
        relative to the system's diagonal (keeps near-singular groups where they were).
    Returns: (scale, zero) [G, N], zero None when `zero` is None; non-positive scales keep their old values.
    """
    K, N = vals.shape
    G = K // g
    f32 = jnp.float32
    v = vals * mask[:, None]
    seg = lambda x: x.reshape(G, g, *x.shape[1:]).sum(1)  # noqa: E731  per-group sums over rows
    hp = lambda a, b: jnp.matmul(a, b, precision=lax.Precision.HIGHEST)  # noqa: E731

    def one(j):  # the columns of the system for group j: H restricted to its rows, against every group
        hj = lax.dynamic_slice_in_dim(h, j * g, g, 1)  # [K, g]
        t = hp(hj, lax.dynamic_slice_in_dim(v, j * g, g, 0))  # [K, N]
        u = hj @ lax.dynamic_slice_in_dim(mask, j * g, g)  # [K]
        return seg(v * t), seg(t * mask[:, None]), seg(v * u[:, None]), seg(u * mask)

    maa, mba, mab, mbb = lax.map(one, jnp.arange(G))  # [G(j), G(i), N] ×3, [G(j), G(i)]
    hw = hp(h, w0)
    ra, rb = seg(v * hw), seg(hw * mask[:, None])  # [G, N]
    a0 = scale.astype(f32)
    if fit_zero:
        b0 = -a0 * zero
        m = jnp.concatenate([jnp.concatenate([maa, mab], 0),
                             jnp.concatenate([mba, jnp.broadcast_to(mbb[..., None], mba.shape)], 0)], 1)  # [2G, 2G, N]
        r, t0 = jnp.concatenate([ra, rb], 0), jnp.concatenate([a0, b0], 0)
    else:
        m, r, t0 = maa, ra, a0
    m = jnp.moveaxis(m, -1, 0).swapaxes(1, 2)  # [N, rows i, cols j]
    d = jnp.diagonal(m, axis1=1, axis2=2)  # [N, P]
    eps = ridge * jnp.maximum(d, 1e-30)
    theta = jnp.linalg.solve(m + eps[:, :, None] * jnp.eye(m.shape[-1], dtype=f32),
                             (r.T + eps * t0.T)[..., None])[..., 0].T  # [P, N]
    a = theta[:G]
    ok = jnp.isfinite(theta).all(0) & (a > 0).all(0)  # per column
    a_new = jnp.where(ok, a, a0)
    if not fit_zero:
        return a_new, zero
    return a_new, jnp.where(ok, -theta[G:] / jnp.where(ok, a, 1.0), zero)


def gptq_with_info(
    w: jnp.ndarray,
    scheme: Scheme,
    layout: Layout,
    stats,
    *,
    block_size: int = 128,
    damp: float = 0.01,
    act_order: bool = False,
    static_groups: bool = False,
    max_damp_tries: int = 6,
    refit: bool = False,
    hqq: bool | dict = False,
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
      refit: after the GPTQ pass, refit the group scales (and float zero points) to the final codes by least
        squares on the damped H (`refit_groups`); groups formed during the pass only (not channel / static).
      hqq: form each group's grid by HQQ (`jq.algorithms.hqq.hqq_params`) from the group's current rows instead
        of the scheme's range — True for HQQ's defaults, or a dict of its options (iters, p, beta, kappa,
        optimize_scale). Asymmetric int groups formed during the pass only.

    Returns:
      (QTensor, info) with info = {"damp": f32 final relative damping, "fallback": bool (RTN was used),
      "no_data": bool (H carried no signal at all: the reason for a fallback), "dead": int32 inputs that never
      fired (diag H = 0; rounded without feedback), "err": f32 GPTQ objective Σ_j ‖w'_j − q_j‖² / U_jj² over the
      real channels (w'_j: channel j when it was quantized). It equals tr((W−Q)ᵀ(H + λI)(W−Q)), so it is in the
      units of the given H: divide by tr(WᵀHW) for a relative figure}.
    """
    p = _plan(layout, block_size, act_order, static_groups)
    if refit and p.level not in ("column", "block"):
        raise ValueError(f"gptq: refit applies to groups formed during the pass (granularity: group, "
                         f"static_groups: false); this layout is {layout.granularity!r} with static_groups="
                         f"{static_groups}. Drop the refit option")
    hqq_opts = None
    if hqq is not False and hqq is not None:
        if p.level not in ("column", "block") or scheme.symmetric or not scheme.fmt.is_int:
            raise ValueError(f"gptq: the hqq option fits the zero point of asymmetric int groups formed during the "
                             f"pass; this is {scheme.describe()!r} with granularity {layout.granularity!r}, "
                             f"static_groups={static_groups}. Drop hqq, or use symmetric: false with group_size")
        hqq_opts = {} if hqq is True else dict(hqq)
    K, Kp, Kt, N, B, S, g = p.K, p.Kp, p.Kt, p.N, p.B, p.S, p.g
    stats = LayerStats.coerce(stats)
    if stats is None or stats.hessian is None:
        raise ValueError(
            "gptq: needs stats.hessian ([K, K] mean of xᵀx); run jq.calibration.capture first or use method: rtn")
    h = jnp.asarray(stats.hessian, jnp.float32)
    if h.shape != (K, K):
        raise ValueError(f"gptq: stats.hessian has shape {h.shape}; a kernel of shape {layout.shape} "
                         f"with contraction axes {layout.axes} needs ({K}, {K})")
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
        xg = ws.reshape(layout.grouped_shape)
        lo, hi = ranges.estimate(xg, layout.reduce_axes, scheme)
        scale_g, zero_g = scheme.scale_zero(lo, hi)

    # -- processing order ----------------------------------------------------------------------------------
    pos_real = np.arange(K) if p.real_idx is None else p.real_idx  # stored-flat positions of the real inputs
    rest = np.setdiff1d(np.arange(Kt), pos_real)  # group / block padding (decoupled in H, weights zero)
    if act_order:
        o = jnp.argsort(-diag, stable=True)
        order = jnp.concatenate([jnp.asarray(pos_real, jnp.int32)[o], jnp.asarray(rest, jnp.int32)])
        h_real, pos_proc = h[o][:, o], None  # real inputs come first in processing order
    else:
        order, h_real, pos_proc = None, h, p.real_idx
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
    mask_s[pos_real] = 1.0  # real (not padding) rows, stored order
    mask = jnp.asarray(mask_s) if order is None else jnp.asarray(mask_s)[order]

    sym = scheme.symmetric  # no zero points
    code_dtype = jax.eval_shape(lambda x: scheme.encode(x, jnp.ones_like(x), None if sym else jnp.zeros_like(x)),
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
            valid = None if hqq_opts is None else lax.dynamic_slice_in_dim(mask, start, g)
            return _group_params(cur_g, scheme, hqq_opts, valid)

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
            code = scheme.encode(row, s, z)
            d = w0s[i] - scheme.decode(code, s, z)
            ws = ws + strict[i][:, None] * d[None, :]
            return ws, lax.dynamic_update_slice_in_dim(cs, code[None], i, 0)

        ws, cs = lax.fori_loop(0, n, body, (ws, jnp.zeros((n, N), code_dtype)))
        q = scheme.decode(cs, s_all, z_all)
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
    if refit:
        fit_zero = not sym and scheme.zero_point == "float"
        zrow = None if sym or fit_zero else jnp.repeat(zc, g, axis=0)
        vals = scheme.decode(codes, jnp.ones((1, N), f32), zrow)
        h_d = hp + jnp.diag(pad_diag + final_damp * mdiag)
        sc2, zc2 = refit_groups(w0, vals, h_d, mask, g, sc, zc, fit_zero)
        sdt = jnp.dtype(scheme.scale_dtype)
        sc2 = sc2.astype(sdt).astype(f32)
        zc2 = zc2 if zc2 is None or not fit_zero else zc2.astype(sdt).astype(f32)
        keep = fallback | no_data
        sc = jnp.where(keep, sc, sc2)
        zc = zc if zc is None else jnp.where(keep, zc, zc2)
        err_m = (w0 - scheme.decode(codes, jnp.repeat(sc, g, axis=0),
                                    None if zc is None else jnp.repeat(zc, g, axis=0))) * mask[:, None]
        loss = jnp.where(keep, loss, jnp.sum(err_m * jnp.matmul(h_d, err_m, precision=lax.Precision.HIGHEST)))

    # -- back to the stored layout -------------------------------------------------------------------------
    perm = None
    if order is not None and not p.store_perm:
        codes = codes[jnp.argsort(order)]  # stored position order[j] holds processed row j
    elif p.store_perm:
        perm = order[:K].astype(jnp.int32)
    codes = codes[:Kp].reshape(layout.grouped_shape)
    if p.level in ("column", "block"):
        gp = Kp // g
        scale_g = jnp.expand_dims(sc[:gp].reshape(layout.scale_shape), layout.inner_axis)
        zero_g = None if zc is None else jnp.expand_dims(zc[:gp].reshape(layout.scale_shape), layout.inner_axis)
    q = scheme.make_qtensor(codes, scale_g, zero_g, layout, w.dtype, perm=perm)
    info = {"damp": final_damp.astype(f32), "fallback": fallback, "err": loss, "no_data": no_data,
            "dead": jnp.sum(dead).astype(jnp.int32)}
    return q, info


@register("gptq", needs_calibration=True)
def gptq(w: jnp.ndarray, scheme: Scheme, layout: Layout, stats, **options) -> QTensor:
    """GPTQ quantization of a kernel against calibration `stats.hessian`; options and behaviour as
    `gptq_with_info`, which also reports the final damping, whether the layer fell back to RTN, and the
    objective. `quantize_leaf` uses that variant (outside jit) to warn about damping increases and fallbacks."""
    return gptq_with_info(w, scheme, layout, stats, **options)[0]


gptq.with_info = gptq_with_info
