"""Ranges: per-tensor / per-channel / per-group (lo, hi) estimates in a layout's grouped view.

Every function takes the grouped view `xg` (see `Layout.to_grouped`) and the axes one scale covers, and returns
keepdims `(lo, hi)` arrays, so they vectorise over all channels / groups at once and jit cleanly.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jq.numbers.grid import Grid, choice

__all__ = ["Range", "RANGE_METHODS", "minmax", "absmax", "absmean", "percentile", "mse_clip", "estimate",
           "unit_levels", "gaussian_mse", "gaussian_clip", "gaussian"]

RANGE_METHODS = ("minmax", "absmax", "percentile", "mse", "absmean", "gaussian")


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
    if rng.method == "gaussian":
        return gaussian(xg, axes, grid)
    return mse_clip(xg, axes, rng, grid, weight)


# -- the Gaussian-MSE-optimal clip (QuEST, Panferov et al. 2025) --------------------------------------------------


def unit_levels(grid: Grid) -> tuple[float, ...]:
    """The values an integer grid rounds to when its range is (lo, hi) = (−1, 1), ascending, in units of that range
    (what `Grid.scale_zero` / `encode` / `decode` give; scale-dtype rounding ignored): int4 symmetric (codes −8..7,
    scale = 1/7.5) → −8/7.5 … 7/7.5; restricted → −1 … 1 in 15 steps; asymmetric with float zero (or "min") → the
    centred grid −1, −13/15, …, 1 (QuEST's); asymmetric with integer zero → (c − 8)·2/15. Raises for non-int formats."""
    f = grid.fmt
    if not f.is_int:
        raise ValueError(f"range 'gaussian' needs an integer format (a uniform grid); format {f.name!r} is not one: "
                         "use range: minmax / mse, or an int format")
    lo, hi = f.int_range(grid.symmetric, grid.restricted)
    c = np.arange(lo, hi + 1, dtype=np.float64)
    if grid.symmetric:
        return tuple(c / grid.code_span)
    s = np.float32(2.0) / np.float32(2**f.bits - 1)  # as Grid.scale_zero computes it, in float32
    z = float(np.clip(np.round(np.float32(1.0) / s), 0, 2**f.bits - 1)) if grid.zero_point == "int" else 1.0 / float(s)
    return tuple((c - z) * float(s))


_SQRT2 = math.sqrt(2.0)


def _phi(x: np.ndarray) -> np.ndarray:
    return np.exp(-0.5 * x * x) / math.sqrt(2.0 * math.pi)


def _cdf(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.vectorize(math.erf)(x / _SQRT2))


def gaussian_mse(alpha: float, levels: tuple[float, ...]) -> float:
    """E[(x − q(x))²] for x ~ N(0, 1), q = round to the nearest of alpha · levels (values beyond the end levels go
    to them): the exact integral, Σ_i ∫ (x − l_i)² φ(x) dx over the cell of level l_i, in closed form."""
    lv = alpha * np.sort(np.asarray(levels, np.float64))
    edges = np.concatenate([[-60.0], (lv[1:] + lv[:-1]) / 2, [60.0]])  # φ(±60) = 0: the infinite ends
    p, q = edges[:-1], edges[1:]
    mass = _cdf(q) - _cdf(p)
    first = _phi(p) - _phi(q)  # ∫ x φ
    second = mass - q * _phi(q) + p * _phi(p)  # ∫ x² φ
    return float(np.sum(second - 2 * lv * first + lv * lv * mass))


@functools.cache
def _golden(levels: tuple[float, ...]) -> float:
    a, b = 1e-3, 12.0 / max(abs(levels[0]), abs(levels[-1]))
    g = (math.sqrt(5.0) - 1) / 2
    c, d = b - g * (b - a), a + g * (b - a)
    fc, fd = gaussian_mse(c, levels), gaussian_mse(d, levels)
    while b - a > 1e-10:  # MSE(alpha) is unimodal on the search interval for these grids
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - g * (b - a)
            fc = gaussian_mse(c, levels)
        else:
            a, c, fc = c, d, fd
            d = a + g * (b - a)
            fd = gaussian_mse(d, levels)
    return (a + b) / 2


def gaussian_clip(grid: Grid) -> float:
    """α*: the range (−α*, α*) in units of σ that minimises the expected squared rounding error of a standard normal
    on `grid` (`unit_levels`), found once per grid by golden-section search of `gaussian_mse` and cached. For the
    centred grids of QuEST (asymmetric, float zero) this is the outermost level: ≈ 2.514 (int4), 2.051 (int3),
    1.494 (int2); for ternary (int2 restricted) ≈ 1.224."""
    return _golden(unit_levels(grid))


def gaussian(xg: jnp.ndarray, axes: tuple[int, ...], grid: Grid) -> tuple[jnp.ndarray, jnp.ndarray]:
    """QuEST's range: (−α*·σ, α*·σ) per scale group, σ the root mean square over `axes` (exact zeros, i.e. padding,
    left out of the count) and α* = `gaussian_clip(grid)` — MSE-optimal when the group is Gaussian, as Hadamard-
    rotated weights and activations nearly are. Keepdims over `axes` (e.g. [G, g, N] → [G, 1, N])."""
    n = jnp.maximum(jnp.sum(xg != 0, axis=axes, keepdims=True), 1).astype(jnp.float32)
    rms = jnp.sqrt(jnp.sum(xg * xg, axis=axes, keepdims=True) / n)
    a = gaussian_clip(grid) * rms
    return -a, a
