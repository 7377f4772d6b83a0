"""Ranges: per-tensor / per-channel / per-group (lo, hi) estimates in a layout's grouped view.

Every function takes the grouped view `xg` (see `Layout.to_grouped`) and the axes one scale covers, and returns
keepdims `(lo, hi)` arrays, so they vectorise over all channels / groups at once and jit cleanly.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jq.numbers.scheme import Scheme

__all__ = ["minmax", "absmax", "absmean", "percentile", "mse_clip", "estimate"]


def minmax(xg: jnp.ndarray, axes: tuple[int, ...]) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Smallest and largest element per scale group."""
    return jnp.min(xg, axis=axes, keepdims=True), jnp.max(xg, axis=axes, keepdims=True)


def absmax(xg: jnp.ndarray, axes: tuple[int, ...]) -> tuple[jnp.ndarray, jnp.ndarray]:
    """(−a, a) with a the largest magnitude per scale group."""
    a = jnp.max(jnp.abs(xg), axis=axes, keepdims=True)
    return -a, a


def absmean(xg: jnp.ndarray, axes: tuple[int, ...]) -> tuple[jnp.ndarray, jnp.ndarray]:
    """(−m, m) with m the mean magnitude per scale group: BitNet b1.58's weight scale γ = mean |W| (Ma et al. 2024),
    which on the int2 symmetric restricted grid gives W ≈ γ · clip(round(W / γ), −1, 1)."""
    m = jnp.mean(jnp.abs(xg), axis=axes, keepdims=True)
    return -m, m


def percentile(xg: jnp.ndarray, axes: tuple[int, ...], p: float) -> tuple[jnp.ndarray, jnp.ndarray]:
    """The (100 − p)th and pth percentiles per scale group (linear interpolation), clipping rare outliers."""
    q = jnp.asarray([1.0 - p / 100.0, p / 100.0], jnp.float32)
    lo_hi = jnp.quantile(xg, q, axis=axes, keepdims=True)
    return lo_hi[0], lo_hi[1]


def mse_clip(
    xg: jnp.ndarray,
    axes: tuple[int, ...],
    scheme: Scheme,
    weight: jnp.ndarray | None = None,
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Shrink the min-max range by the factor in {1, 1 − 1/grid, …, 1 − max_shrink} that minimises, per group,
    Σ weight·|fake_quant(x) − x|^norm (the search of the GPTQ reference quantizer, vectorised with `lax.scan`).

    `weight` (broadcastable to `xg`, e.g. per-input-channel activation energy) makes the error data-aware.
    """
    lo0, hi0 = minmax(xg, axes)
    steps = max(1, int(round(scheme.mse_max_shrink * scheme.mse_grid)) + 1)
    shrinks = 1.0 - jnp.arange(steps, dtype=jnp.float32) / scheme.mse_grid

    def err_at(s):
        lo, hi = lo0 * s, hi0 * s
        scale, zero = scheme.scale_zero(lo, hi)
        e = jnp.abs(scheme.fake_quant(xg, scale, zero) - xg) ** scheme.mse_norm
        if weight is not None:
            e = e * weight
        return jnp.sum(e, axis=axes, keepdims=True)

    def step(carry, s):
        best_err, best_s = carry
        e = err_at(s)
        better = e < best_err
        return (jnp.where(better, e, best_err), jnp.where(better, s, best_s)), None

    init = (err_at(shrinks[0]), jnp.ones_like(lo0))
    (_, best), _ = jax.lax.scan(step, init, shrinks[1:])
    return lo0 * best, hi0 * best


def estimate(xg: jnp.ndarray, axes: tuple[int, ...], scheme: Scheme, weight=None) -> tuple[jnp.ndarray, jnp.ndarray]:
    """The range `scheme.range` asks for."""
    xg = xg.astype(jnp.float32)
    if scheme.range == "minmax":
        return minmax(xg, axes)
    if scheme.range == "absmax":
        return absmax(xg, axes)
    if scheme.range == "absmean":
        return absmean(xg, axes)
    if scheme.range == "percentile":
        return percentile(xg, axes, scheme.percentile)
    return mse_clip(xg, axes, scheme, weight)
