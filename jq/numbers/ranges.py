"""Ranges: per-tensor / per-channel / per-group (lo, hi) estimates in a layout's grouped view.

Every function takes the grouped view `xg` (see `Layout.to_grouped`) and the axes one scale covers, and returns
keepdims `(lo, hi)` arrays, so they vectorise over all channels / groups at once and jit cleanly.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

import dataclasses
from typing import Any

from jq.numbers.grid import Grid, choice

__all__ = ["Range", "RANGE_METHODS", "minmax", "absmax", "absmean", "percentile", "mse_clip", "estimate"]

RANGE_METHODS = ("minmax", "absmax", "percentile", "mse", "absmean")


@dataclasses.dataclass(frozen=True)
class Range:
    """How a grid's range is searched: the scheme's `range` (as `method`), `percentile`, and the MSE clip search's
    `mse_grid`, `mse_max_shrink`, `mse_norm` (see `jq.numbers.scheme.Scheme`)."""

    method: str = "minmax"
    percentile: float = 99.99
    mse_grid: int = 100
    mse_max_shrink: float = 0.8
    mse_norm: float = 2.4

    def __post_init__(self):
        choice("range", self.method, RANGE_METHODS)
        if not 50.0 < self.percentile <= 100.0:
            raise ValueError(f"scheme field 'percentile' has value {self.percentile!r}; use a value in (50, 100]")
        if not 0.0 <= self.mse_max_shrink < 1.0 or self.mse_grid < 1 or self.mse_norm <= 0:
            raise ValueError(
                f"scheme MSE search fields mse_grid={self.mse_grid}, mse_max_shrink={self.mse_max_shrink}, "
                f"mse_norm={self.mse_norm}; need grid >= 1, 0 <= max_shrink < 1, norm > 0"
            )


def minmax(xg: jnp.ndarray, axes: tuple[int, ...]) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Smallest and largest element per scale group: keepdims over `axes` of `xg` (e.g. [G, g, N] → [G, 1, N])."""
    return jnp.min(xg, axis=axes, keepdims=True), jnp.max(xg, axis=axes, keepdims=True)


def absmax(xg: jnp.ndarray, axes: tuple[int, ...]) -> tuple[jnp.ndarray, jnp.ndarray]:
    """(−a, a) with a the largest magnitude per scale group, keepdims over `axes` (e.g. [G, g, N] → [G, 1, N])."""
    a = jnp.max(jnp.abs(xg), axis=axes, keepdims=True)
    return -a, a


def absmean(xg: jnp.ndarray, axes: tuple[int, ...]) -> tuple[jnp.ndarray, jnp.ndarray]:
    """(−m, m) with m the mean magnitude per scale group: BitNet b1.58's weight scale γ = mean |W| (Ma et al. 2024),
    which on the int2 symmetric restricted grid gives W ≈ γ · clip(round(W / γ), −1, 1). Keepdims over `axes`."""
    m = jnp.mean(jnp.abs(xg), axis=axes, keepdims=True)
    return -m, m


def percentile(xg: jnp.ndarray, axes: tuple[int, ...], p: float) -> tuple[jnp.ndarray, jnp.ndarray]:
    """The (100 − p)th and pth percentiles per scale group (linear interpolation), clipping rare outliers;
    keepdims over `axes` (e.g. [G, g, N] → [G, 1, N])."""
    q = jnp.asarray([1.0 - p / 100.0, p / 100.0], jnp.float32)
    lo_hi = jnp.quantile(xg, q, axis=axes, keepdims=True)
    return lo_hi[0], lo_hi[1]


def mse_clip(
    xg: jnp.ndarray,
    axes: tuple[int, ...],
    rng: Range,
    grid: Grid,
    weight: jnp.ndarray | None = None,
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Shrink the min-max range by the factor in {1, 1 − 1/grid, …, 1 − max_shrink} that minimises, per group,
    Σ weight·|fake_quant(x) − x|^norm (the search of the GPTQ reference quantizer, vectorised with `lax.scan`).

    `weight` (broadcastable to `xg`, e.g. per-input-channel activation energy) makes the error data-aware.
    Returns keepdims (lo, hi) over `axes` (e.g. [G, g, N] → [G, 1, N]).
    """
    lo0, hi0 = minmax(xg, axes)
    steps = max(1, int(round(rng.mse_max_shrink * rng.mse_grid)) + 1)
    shrinks = 1.0 - jnp.arange(steps, dtype=jnp.float32) / rng.mse_grid

    def err_at(s):
        lo, hi = lo0 * s, hi0 * s
        scale, zero = grid.scale_zero(lo, hi)
        e = jnp.abs(grid.fake_quant(xg, scale, zero) - xg) ** rng.mse_norm
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


def estimate(xg: jnp.ndarray, axes: tuple[int, ...], scheme: Any,
             weight: jnp.ndarray | None = None) -> tuple[jnp.ndarray, jnp.ndarray]:
    """The range a scheme asks for (`scheme.range_search`, on `scheme.grid`; any object with those two): keepdims
    (lo, hi) float32 over `axes` of the grouped view `xg` (e.g. [G, g, N] → [G, 1, N]); `weight` broadcasts against
    `xg` (the "mse" search's per-element error weight)."""
    rng, grid = scheme.range_search, scheme.grid
    xg = xg.astype(jnp.float32)
    if rng.method == "minmax":
        return minmax(xg, axes)
    if rng.method == "absmax":
        return absmax(xg, axes)
    if rng.method == "absmean":
        return absmean(xg, axes)
    if rng.method == "percentile":
        return percentile(xg, axes, rng.percentile)
    return mse_clip(xg, axes, rng, grid, weight)
