"""Model-level transforms as records: per-input-channel scales s [K] for the kernels that share one input, which
`jq.calibration.sequential` folds into that input's producer (x / s) and the kernels' rows (diag(s)·W), so the float
model computes the same function. `transforms: [awq]` or `[{smoothquant: {alpha: 0.5}}]` in a recipe."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from jq.algorithms.awq import search_scales
from jq.algorithms.registry import register_transform
from jq.algorithms.smoothquant import smooth_scales
from jq.algorithms.stats import LayerStats
from jq.numbers.qtensor import Layout
from jq.numbers.scheme import Scheme

__all__ = ["AWQScales", "SmoothQuantScales", "tie"]


@functools.lru_cache(maxsize=None)
def _layout_fn(scheme: Scheme) -> Callable[[tuple[int, ...]], Layout]:
    return lambda shape: scheme.layout(shape, (0,))


Tied = tuple[tuple[int, ...], int]  # (producer channel of each input [K], producer channels P): see `tie`


def tie(s: jax.Array, channels: Sequence[int], n_prev: int) -> jax.Array:
    """Scales s [K] made equal on the inputs that read the same producer channel (`channels` [K] ints < n_prev; the
    v → o fold under grouped-query attention, `jq.calibration.sequential.Fold.channels`): each gets its group's
    geometric mean, so folding the scale into the producer is exact."""
    idx = jnp.asarray(channels, jnp.int32)
    logs = jax.ops.segment_sum(jnp.log(jnp.asarray(s, jnp.float32)), idx, n_prev)
    counts = jax.ops.segment_sum(jnp.ones(idx.shape, jnp.float32), idx, n_prev)
    return jnp.exp(logs / jnp.maximum(counts, 1.0))[idx]


@functools.lru_cache(maxsize=None)
def _awq_search(grid: int, duo: bool, tied: Tied | None = None) -> Callable[..., tuple[jax.Array, dict]]:
    tie_fn = None if tied is None else functools.partial(tie, channels=tied[0], n_prev=tied[1])
    return jax.jit(functools.partial(search_scales, grid=grid, duo=duo, tie=tie_fn), static_argnums=(3, 4))


@dataclasses.dataclass(frozen=True)
class AWQScales:
    """AWQ's activation-aware scales: the grid search over s = mean|x|^α (α = 0, 1/grid, …) minimising the
    kernels' output error under the scheme (`jq.algorithms.awq.search_scales`); `duo` is AutoAWQ's duo scaling."""

    name = "awq"
    grid: int = 20
    duo: bool = False

    def scales(self, weights: list[Any], stats: LayerStats, scheme: Scheme, tied: Tied | None = None) -> jax.Array:
        """s [K] float32 for kernels [K, N_i] sharing one input, from `stats.hessian` [K, K] and `act_absmean` [K];
        `tied`: every candidate tied (`tie`) before it is measured."""
        s, _ = _awq_search(self.grid, self.duo, tied)(weights, stats.hessian, stats.act_absmean, scheme,
                                                      _layout_fn(scheme))
        return s


@dataclasses.dataclass(frozen=True)
class SmoothQuantScales:
    """SmoothQuant's migration scales s = max|x|^α / max|W|^(1−α) (`jq.algorithms.smoothquant.smooth_scales`)."""

    name = "smoothquant"
    alpha: float = 0.5
    eps: float = 1e-5

    def scales(self, weights: list[Any], stats: LayerStats, scheme: Scheme) -> jax.Array:
        """s [K] float32 for kernels [K, N_i] sharing one input, from `stats.act_absmax` [K]; `scheme` is unused (no
        search: a fold that needs tied scales ties the result, `jq.calibration.sequential`)."""
        return smooth_scales(stats.act_absmax, weights, alpha=self.alpha, eps=self.eps)


register_transform("awq", AWQScales)
register_transform("smoothquant", SmoothQuantScales)
