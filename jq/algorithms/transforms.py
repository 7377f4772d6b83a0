"""Model-level transforms as records: per-input-channel scales s [K] for the kernels that share one input, which
`jq.calibration.sequential` folds into that input's producer (x / s) and the kernels' rows (diag(s)·W), so the float
model computes the same function. `transforms: [awq]` or `[{smoothquant: {alpha: 0.5}}]` in a recipe."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax

from jq.algorithms.awq import search_scales
from jq.algorithms.registry import register_transform
from jq.algorithms.smoothquant import smooth_scales
from jq.algorithms.stats import LayerStats
from jq.numbers.qtensor import Layout
from jq.numbers.scheme import Scheme

__all__ = ["AWQScales", "SmoothQuantScales"]


@functools.lru_cache(maxsize=None)
def _layout_fn(scheme: Scheme) -> Callable[[tuple[int, ...]], Layout]:
    return lambda shape: scheme.layout(shape, (0,))


@functools.lru_cache(maxsize=None)
def _awq_search(grid: int, duo: bool) -> Callable[..., tuple[jax.Array, dict]]:
    return jax.jit(functools.partial(search_scales, grid=grid, duo=duo), static_argnums=(3, 4))


@dataclasses.dataclass(frozen=True)
class AWQScales:
    """AWQ's activation-aware scales: the grid search over s = mean|x|^α (α = 0, 1/grid, …) minimising the
    kernels' output error under the scheme (`jq.algorithms.awq.search_scales`); `duo` is AutoAWQ's duo scaling."""

    name = "awq"
    grid: int = 20
    duo: bool = False

    def scales(self, weights: list[Any], stats: LayerStats, scheme: Scheme) -> jax.Array:
        """s [K] float32 for kernels [K, N_i] sharing one input, from `stats.hessian` [K, K] and `act_absmean` [K]."""
        s, _ = _awq_search(self.grid, self.duo)(weights, stats.hessian, stats.act_absmean, scheme, _layout_fn(scheme))
        return s


@dataclasses.dataclass(frozen=True)
class SmoothQuantScales:
    """SmoothQuant's migration scales s = max|x|^α / max|W|^(1−α) (`jq.algorithms.smoothquant.smooth_scales`)."""

    name = "smoothquant"
    alpha: float = 0.5
    eps: float = 1e-5

    def scales(self, weights: list[Any], stats: LayerStats, scheme: Scheme) -> jax.Array:
        """s [K] float32 for kernels [K, N_i] sharing one input, from `stats.act_absmax` [K]; `scheme` is unused."""
        return smooth_scales(stats.act_absmax, weights, alpha=self.alpha, eps=self.eps)


register_transform("awq", AWQScales)
register_transform("smoothquant", SmoothQuantScales)
