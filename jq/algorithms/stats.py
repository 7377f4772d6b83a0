"""Calibration statistics of one linear layer's input, as typed pytrees: the one place that knows how statistics
are accumulated, merged, scaled and rotated.

For a layer whose input, flattened to [tokens, K] (K = the contracted features), is x:

    LayerStats (means, what methods read)       StatSums (running sums, what streaming capture adds up)
    hessian      [K, K]  Σ xᵀx / n               hessian   [K, K]  Σ xᵀx
    act_absmean  [K]     Σ |x| / n               abs_sum   [K]     Σ |x|
    act_sq       [K]     Σ x² / n                sq_sum    [K]     Σ x²
    act_absmax   [K]     max |x|                 act_absmax [K]    max |x|
    count        []      n (0: no token reached the layer)

GPTQ and AWQ's clip search read the Hessian, AWQ's scale search the mean |x|, data-aware clip search the mean x²,
SmoothQuant and LLM.int8 the max |x|. Fields a source lacks are None (a hand-built `LayerStats(hessian=h)` is fine).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

__all__ = ["LayerStats", "StatSums", "Stats"]

_FIELDS = ("hessian", "act_absmean", "act_sq", "act_absmax", "count")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LayerStats:
    """Mean statistics of one layer's input (see the module docstring); a pytree, so methods take it under jit."""

    hessian: jax.Array | None = None
    act_absmean: jax.Array | None = None
    act_sq: jax.Array | None = None
    act_absmax: jax.Array | None = None
    count: jax.Array | None = None

    @classmethod
    def coerce(cls, stats: Any) -> LayerStats | None:
        """`stats` as LayerStats: itself, None, or a mapping with the field names (what earlier versions passed)."""
        if stats is None or isinstance(stats, LayerStats):
            return stats
        if isinstance(stats, Mapping):
            unknown = sorted(set(stats) - set(_FIELDS))
            if unknown:
                raise ValueError(f"statistics have unknown field(s) {unknown}; LayerStats has {list(_FIELDS)}")
            return cls(**stats)
        raise TypeError(f"statistics must be a LayerStats (jq.algorithms.stats) or a mapping, got {type(stats).__name__}")

    def scaled(self, s: jax.Array) -> LayerStats:
        """The statistics of x / s for a per-channel scale s [K] (the input after a SmoothQuant / AWQ fold)."""
        div = lambda a, d: None if a is None else a / d  # noqa: E731
        return LayerStats(div(self.hessian, jnp.outer(s, s)), div(self.act_absmean, s), div(self.act_sq, s * s),
                          div(self.act_absmax, s), self.count)

    def rotated(self, transform: Callable[[jax.Array, int], jax.Array]) -> LayerStats:
        """The statistics of x Q for an orthogonal Q given as `transform(a, axis)` = a Q along `axis` on the
        contracted axis: Hessian Qᵀ H Q and its diagonal as the mean square; mean and max |x| do not rotate and are
        dropped."""
        if self.hessian is None:
            return LayerStats(count=self.count)
        h = transform(transform(jnp.asarray(self.hessian, jnp.float32), 0), 1)
        return LayerStats(hessian=h, act_sq=jnp.diagonal(h), count=self.count)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class StatSums:
    """Running sums of one layer's input over the batches seen so far (see the module docstring)."""

    hessian: jax.Array
    abs_sum: jax.Array
    sq_sum: jax.Array
    act_absmax: jax.Array
    count: jax.Array

    @classmethod
    def of(cls, x: jax.Array, k: int | None = None) -> StatSums:
        """The sums of one batch of layer inputs x [..., K] (contracted features last)."""
        k = x.shape[-1] if k is None else k
        x = x.reshape(-1, k).astype(jnp.float32)
        return cls(jnp.einsum("tk,tl->kl", x, x, precision=jax.lax.Precision.HIGHEST), jnp.sum(jnp.abs(x), axis=0),
                   jnp.sum(x * x, axis=0), jnp.max(jnp.abs(x), axis=0), jnp.asarray(x.shape[0], jnp.float32))

    def merge(self, other: StatSums) -> StatSums:
        """The sums over both sets of batches."""
        return StatSums(self.hessian + other.hessian, self.abs_sum + other.abs_sum, self.sq_sum + other.sq_sum,
                        jnp.maximum(self.act_absmax, other.act_absmax), self.count + other.count)

    def finalize(self) -> LayerStats:
        """The means (a layer no token reached keeps count 0 and zero statistics)."""
        n = jnp.maximum(self.count, 1.0)
        return LayerStats(self.hessian / n, self.abs_sum / n, self.sq_sum / n, self.act_absmax, self.count)


Stats = dict[str, LayerStats]  # statistics of a model's layers, keyed by kernel path
