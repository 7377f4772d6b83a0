"""Grid fitters: how a group's (or channel's, or tensor's) scale and zero point are chosen from its weights — the
piece RTN and GPTQ share. `RangeFit` takes the scheme's range estimate (min-max, abs-max, percentile, MSE clip,
abs-mean); `jq.algorithms.hqq.HQQFit` refines the zero point (and scale) by half-quadratic optimisation of an lp
error. Recipes reach them as `method: hqq` (RTN on HQQ grids) and GPTQ's `hqq` option (GPTQ forming each group's
grid by HQQ from its error-compensated rows)."""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol

import jax.numpy as jnp

from jq.numbers import ranges
from jq.numbers.scheme import Scheme

__all__ = ["GridFitter", "RangeFit"]


class GridFitter(Protocol):
    def fit(self, xg: jnp.ndarray, scheme: Scheme, reduce_axes: tuple[int, ...], *, weight: Any = None,
            valid: Any = None) -> tuple[jnp.ndarray, jnp.ndarray | None]:
        """Keepdims (scale, zero) of the grouped view `xg`, in stored precision. `weight`: optional per-element
        importance of the error (activation energy, for data-aware clip search); `valid`: 1 for real weights, 0 for
        padding."""


@dataclasses.dataclass(frozen=True)
class RangeFit:
    """The scheme's range (`scheme.range`), then its scale and zero point (`Scheme.scale_zero`)."""

    def fit(self, xg: jnp.ndarray, scheme: Scheme, reduce_axes: tuple[int, ...], *, weight: jnp.ndarray | None = None,
            valid: jnp.ndarray | None = None) -> tuple[jnp.ndarray, jnp.ndarray | None]:
        """Keepdims (scale, zero) of the grouped view `xg` (`Layout.grouped_shape`, e.g. [G, g, N] → [G, 1, N]) from
        the scheme's range; `weight` broadcasts against `xg`; `valid` is unused (padding is zero)."""
        lo, hi = ranges.estimate(xg, reduce_axes, scheme, weight)
        return scheme.grid.scale_zero(lo, hi)
