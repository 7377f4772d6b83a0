"""Round-to-nearest: fit a grid per tensor / channel / group (the scheme's range, or any grid fitter such as
HQQ's), round every weight to the nearest code. `RTN` is its method record; `QAT` the method QAT recipes name."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from jq.algorithms.grids import GridFitter, RangeFit
from jq.algorithms.registry import register_method
from jq.algorithms.stats import LayerStats
from jq.numbers.qtensor import Layout, QTensor
from jq.numbers.scheme import Scheme

__all__ = ["RTN", "QAT", "rtn"]


def rtn(w: jnp.ndarray, scheme: Scheme, layout: Layout, stats: LayerStats | dict | None = None, *,
        grid: GridFitter = RangeFit()) -> QTensor:
    """Quantize `w` (logical shape `layout.shape`) by round-to-nearest on the grids `grid` fits (default: the
    scheme's range).

    `stats` is accepted for a uniform signature; with range "mse" a per-input-channel `stats.act_sq` (mean x²,
    shape [K] along the group axis) weights the clip search by activation energy.
    """
    xg = layout.to_grouped(jnp.asarray(w, jnp.float32))
    stats = LayerStats.coerce(stats)
    weight = None
    if stats is not None and scheme.range == "mse" and stats.act_sq is not None:
        weight = _channel_weight(jnp.asarray(stats.act_sq, jnp.float32), layout)
    valid = None if isinstance(grid, RangeFit) else layout.valid_mask()
    scale, zero = grid.fit(xg, scheme, layout.reduce_axes, weight=weight, valid=valid)
    codes = scheme.grid.encode(xg, scale, zero)
    return scheme.make_qtensor(codes, scale, zero, layout, w.dtype)


def _channel_weight(act_sq: jnp.ndarray, layout: Layout) -> jnp.ndarray:
    """A [K] per-input-channel weight broadcast onto the grouped view (K = the group axis)."""
    shape = [1] * len(layout.shape)
    shape[layout.group_axis] = -1
    return layout.to_grouped(jnp.broadcast_to(act_sq.reshape(shape), layout.shape))


@dataclasses.dataclass(frozen=True)
class RTN:
    """Round-to-nearest as a method record, on the grids of `grid` (`method: rtn`; `method: hqq` is RTN with
    `jq.algorithms.hqq.HQQFit`)."""

    grid: GridFitter = RangeFit()

    def quantize(self, w: jnp.ndarray, scheme: Scheme, layout: Layout,
                 stats: LayerStats | dict | None = None) -> QTensor:
        """`rtn` of `w` (logical shape `layout.shape`, e.g. a Dense kernel [K, N]) on `self.grid`'s grids."""
        return rtn(w, scheme, layout, stats, grid=self.grid)


@dataclasses.dataclass(frozen=True)
class QAT:
    """The method quantization-aware-training recipes name (trained by `jq.qat`).

    The options steer training only — `lsq` learns the step sizes (LSQ), `lsq_init` ("range" or "paper") picks
    their start, `ste` ("identity", "clipped" or "trust") the straight-through gradient, `trust` the trust factor of
    QuEST's estimator (`ste: trust`, weights and activations: gradient only where the rounding error is at most
    trust × half a step; 1.0 in the paper), `act_ste` ("identity" or "trust") the activations' estimator where it
    should differ from `ste` (default: the same as the weights'). Applied as plain post-training
    quantization, without learned step sizes, the method is round-to-nearest on the scheme's grid, so a QAT
    recipe also quantizes an untrained model; `jq.qat.convert` uses learned step sizes where they exist.
    """

    lsq: bool = False
    lsq_init: str = "range"
    ste: str = "identity"
    trust: float = 1.0
    act_ste: str | None = None

    def quantize(self, w: jnp.ndarray, scheme: Scheme, layout: Layout,
                 stats: LayerStats | dict | None = None) -> QTensor:
        """Plain `rtn` of `w` (logical shape `layout.shape`, e.g. a Dense kernel [K, N]) on the scheme's range."""
        return rtn(w, scheme, layout, stats)


register_method("rtn", RTN)
register_method("qat", QAT)
