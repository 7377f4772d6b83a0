"""HQQ: Half-Quadratic Quantization (Badri & Shaji, 2023) — data-free refinement of zero points (and optionally
scales) per group, minimising the lp reconstruction error Σ |W − dequant(quant(W))|^p with p < 1.

The lp "norm" with p < 1 is robust to the few outlying weights of a group: min-max quantization spends its grid on
them, HQQ lets them carry a large error and moves the zero point to serve the bulk. The problem

    argmin_z  φ_p(W − Q⁻¹_z(Q_z(W)))

is split half-quadratically with an auxiliary error variable E:

    argmin_{z, E}  φ_p(E) + β/2 ‖E − (W − Q⁻¹_z(Q_z(W)))‖²

and solved by alternating, with β growing by κ each iteration:

    W_q = clip(round(W/s + z))                        codes under the current zero point
    W_r = (W_q − z)·s                                 reconstruction
    E   = shrink_p(W − W_r, β)                        generalized soft-thresholding (the prox of φ_p / β)
    z   = mean(W_q − (W − E)/s)                       closed-form least-squares zero point
    β  ← κ·β

with shrink_p(x, β) = sign(x)·relu(|x| − |x|^(p−1)/β). With `optimize_scale=True` the scale is also fitted in
closed form: (s, z) is the least-squares line W − E ≈ s·(W_q − z) over the group.

Everything runs vectorised over all groups at once in the layout's grouped view, inside a `lax.while_loop` that
stops early (as the reference does) when the total lp error stops decreasing, and keeps, *per group*, the best
parameters seen — counted after the zero point is made an integer (int zero points: the better of its two integer
neighbours) or cast to `scale_dtype` (float zero points), and including the min-max start. So HQQ's lp error is
never above RTN's, group by group.

Integer zero points: with the scale fixed, an integer zero point only slides the window over the same lattice
{k·scale}, so zero-only HQQ cannot improve on RTN there; `hqq` therefore also fits the scale by default when
`scheme.zero_point == "int"` (float zero points follow the paper: zero point only).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from jq.numbers import ranges
from jq.algorithms.registry import register_method
from jq.algorithms.rtn import RTN, rtn
from jq.algorithms.stats import LayerStats
from jq.numbers.qtensor import Layout, QTensor
from jq.numbers.scheme import Scheme

__all__ = ["HQQFit", "hqq", "hqq_params", "hqq_refine", "shrink_lp", "lp_error"]


def shrink_lp(x: jnp.ndarray, beta: float | jnp.ndarray, p: float,
              weight: jnp.ndarray | None = None) -> jnp.ndarray:
    """Generalized soft-thresholding: the proximal operator of (weight/β)·|x|^p (the lp "norm", p ≤ 1).

    sign(x)·max(|x| − (weight/β)·|x|^(p−1), 0); exact soft-thresholding for p = 1, 0 at x = 0. `x` any shape, `beta`
    and `weight` broadcast against it; returns x's shape.
    """
    ax = jnp.abs(x)
    thr = jnp.where(ax > 0, ax ** (p - 1.0), 0.0) / beta if p != 1.0 else jnp.ones_like(ax) / beta
    if weight is not None:
        thr = thr * weight
    return jnp.sign(x) * jnp.maximum(ax - thr, 0.0)


def lp_error(xg: jnp.ndarray, xr: jnp.ndarray, p: float, reduce_axes: tuple[int, ...],
             weight: jnp.ndarray | None = None) -> jnp.ndarray:
    """Σ weight·|xg − xr|^p over `reduce_axes` (keepdims): xg, xr the grouped view, e.g. [G, g, N] → [G, 1, N]."""
    e = jnp.abs(xg - xr) ** p
    if weight is not None:
        e = e * weight
    return jnp.sum(e, axis=reduce_axes, keepdims=True)


def _check_scheme(scheme: Scheme) -> None:
    if scheme.symmetric or not scheme.fmt.is_int:
        raise ValueError(
            f"HQQ optimises the zero point of an asymmetric integer grid, but the scheme is {scheme.describe()!r} "
            "(no zero point); use an int format with symmetric: false"
        )


def hqq_refine(
    xg: jnp.ndarray,
    scale: jnp.ndarray,
    zero: jnp.ndarray,
    scheme: Scheme,
    reduce_axes: tuple[int, ...],
    *,
    iters: int = 20,
    p: float = 0.7,
    beta: float = 10.0,
    kappa: float = 1.01,
    optimize_scale: bool = False,
    early_stop: bool = True,
    weight: jnp.ndarray | None = None,
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Refine keepdims `(scale, zero)` of the grouped view `xg` by HQQ's half-quadratic iterations.

    Args:
      xg: weights in a grouped view (any layout; `reduce_axes` are the axes one scale covers).
      scale, zero: starting parameters, broadcastable against `xg` (keepdims), zero in code units.
      scheme: an asymmetric int scheme; its `zero_point` ("int": floor or ceil, whichever has the lower lp error,
        clipped to the code range; "float": kept unrounded, cast to `scale_dtype`) and `scale_dtype` decide the
        stored values.
      iters, p, beta, kappa: iterations, lp exponent, initial β and its growth factor.
      optimize_scale: also fit the scale in closed form (least squares) each iteration.
      early_stop: stop when the total lp error of the iterate stops decreasing (the reference's rule).
      weight: optional non-negative per-element weights broadcastable to `xg` (0 masks padding out).

    Returns:
      `(scale, zero)` of the same shapes, already in their stored precision: per group the best pair met
      (the starting pair included) under the lp error with those stored values.
    """
    _check_scheme(scheme)
    qmax = float(2**scheme.bits - 1)
    sdt = jnp.dtype(scheme.scale_dtype)
    xg = xg.astype(jnp.float32)
    scale = jnp.broadcast_to(jnp.asarray(scale, jnp.float32), _keep_shape(xg.shape, reduce_axes))
    zero = jnp.broadcast_to(jnp.asarray(zero, jnp.float32), scale.shape)
    w = None if weight is None else jnp.broadcast_to(jnp.asarray(weight, jnp.float32), xg.shape)
    wsum = None if w is None else jnp.sum(w, axis=reduce_axes, keepdims=True)

    def mean(a):
        if w is None:
            return jnp.mean(a, axis=reduce_axes, keepdims=True)
        return jnp.sum(a * w, axis=reduce_axes, keepdims=True) / jnp.where(wsum > 0, wsum, 1.0)

    def codes(s, z):
        return jnp.clip(jnp.round(xg / s + z), 0.0, qmax)

    def err(s, z):
        return lp_error(xg, (codes(s, z) - z) * s, p, reduce_axes, w)

    def stored(s, z):
        """The values that would be stored, and their lp error. An int zero point takes whichever of its two
        integer neighbours reconstructs better (plain rounding would undo the sub-unit moves HQQ makes)."""
        s = s.astype(sdt).astype(jnp.float32)
        s = jnp.where(s > 0, s, 1.0)
        if scheme.zero_point == "int":
            zf, zc = jnp.clip(jnp.floor(z), 0.0, qmax), jnp.clip(jnp.ceil(z), 0.0, qmax)
            ef, ec = err(s, zf), err(s, zc)
            return s, jnp.where(ec < ef, zc, zf), jnp.minimum(ef, ec)
        z = z.astype(sdt).astype(jnp.float32)
        return s, z, err(s, z)

    s0, z0, e0 = stored(scale, zero)

    def body(c):
        i, b, s, z, bs, bz, be, prev, _ = c
        wq = codes(s, z)
        we = shrink_lp(xg - (wq - z) * s, b, p, w)
        t = xg - we  # the target the grid should reproduce
        if optimize_scale:
            mq, mt = mean(wq), mean(t)
            var = mean((wq - mq) ** 2)
            cov = mean((wq - mq) * (t - mt))
            a = cov / jnp.where(var > 0, var, 1.0)
            ok = (var > 0) & (a > 0) & jnp.isfinite(a)
            s = jnp.where(ok, a, s)
        z = mean(wq - t / s)
        cur = jnp.sum(err(s, z))  # the iterate's own error, in float (drives early stopping)
        ss, zs, e = stored(s, z)  # error with the values that would be stored (drives the per-group choice)
        better = e < be
        bs, bz, be = jnp.where(better, ss, bs), jnp.where(better, zs, bz), jnp.where(better, e, be)
        stop = (cur >= prev) if early_stop else jnp.asarray(False)
        return i + 1, b * kappa, s, z, bs, bz, be, jnp.minimum(cur, prev), stop

    def cond(c):
        return (c[0] < iters) & ~c[-1]

    start_err = jnp.sum(err(scale, zero))
    init = (jnp.int32(0), jnp.float32(beta), scale, zero, s0, z0, e0, start_err, jnp.asarray(False))
    out = jax.lax.while_loop(cond, body, init)
    return out[4], out[5]


def _keep_shape(shape: tuple[int, ...], reduce_axes: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(1 if a in reduce_axes else n for a, n in enumerate(shape))


def hqq_params(xg: jnp.ndarray, scheme: Scheme, reduce_axes: tuple[int, ...], *, weight: jnp.ndarray | None = None,
               optimize_scale: bool | None = None, **options) -> tuple[jnp.ndarray, jnp.ndarray]:
    """HQQ's grid for a grouped view `xg`: the scheme's range (min-max by default) refined by `hqq_refine`.

    `optimize_scale=None` means True for int zero points and False for float ones (see `hqq`); `options` are
    `hqq_refine`'s (iters, p, beta, kappa, early_stop). Returns keepdims (scale, zero) in stored precision.
    GPTQ's `hqq` option calls this on each group's current rows when the group is formed."""
    _check_scheme(scheme)
    if optimize_scale is None:
        optimize_scale = scheme.zero_point == "int"
    lo, hi = ranges.estimate(xg, reduce_axes, scheme)
    scale, zero = scheme.grid.scale_zero(lo, hi)
    return hqq_refine(xg, scale, zero, scheme, reduce_axes, optimize_scale=optimize_scale, weight=weight, **options)


@dataclasses.dataclass(frozen=True)
class HQQFit:
    """HQQ's grid (`hqq_params`) as a grid fitter: the scheme's range refined by half-quadratic iterations that
    minimise Σ |W − Ŵ|^p over each group (padding masked out by `valid`). `optimize_scale=None` also fits the
    scale for integer zero points (see `hqq`)."""

    iters: int = 20
    p: float = 0.7
    beta: float = 10.0
    kappa: float = 1.01
    optimize_scale: bool | None = None
    early_stop: bool = True

    def fit(self, xg: jnp.ndarray, scheme: Scheme, reduce_axes: tuple[int, ...], *, weight: jnp.ndarray | None = None,
            valid: jnp.ndarray | None = None) -> tuple[jnp.ndarray, jnp.ndarray]:
        """Keepdims (scale, zero) of the grouped view `xg` (e.g. [G, g, N] → [G, 1, N]) by `hqq_params`; `valid`
        (broadcasting against `xg`, 0 on padding) weights the error; `weight` is unused."""
        return hqq_params(xg, scheme, reduce_axes, weight=valid, iters=self.iters, p=self.p, beta=self.beta,
                          kappa=self.kappa, optimize_scale=self.optimize_scale, early_stop=self.early_stop)


def hqq(w: jnp.ndarray, scheme: Scheme, layout: Layout, stats: LayerStats | dict | None = None,
        **options: Any) -> QTensor:
    """HQQ-quantize `w` (logical shape `layout.shape`): round to nearest on grids `HQQFit(**options)` fits — the
    scheme's range (min-max by default) with the zero point (and the scale, `optimize_scale`) refined per group by
    `hqq_refine`. Data-free: `stats` is ignored.

    `optimize_scale=None` (the default) means False for float zero points (the paper's zero-only HQQ) and True for
    int zero points: moving an integer zero point by whole codes only slides the window over the same lattice
    {k·scale}, so with the scale fixed it can do nothing but clip the group's extremes, and zero-only HQQ would
    return RTN's result. An explicit False keeps zero-only for int zero points too.

    Only asymmetric int schemes have a zero point to optimise; others raise ValueError. Padding of a padded
    group axis is left out of the error and the zero-point means.
    """
    _check_scheme(scheme)
    return rtn(w, scheme, layout, None, grid=HQQFit(**options))


register_method("hqq", lambda **options: RTN(grid=HQQFit(**options)))
