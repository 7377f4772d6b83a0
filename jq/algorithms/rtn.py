"""Round-to-nearest: estimate a range per tensor / channel / group, round every weight to the nearest code."""

from __future__ import annotations

import jax.numpy as jnp

from jq.numbers import ranges
from jq.algorithms.registry import register
from jq.algorithms.stats import LayerStats
from jq.numbers.qtensor import Layout, QTensor
from jq.numbers.scheme import Scheme


@register("rtn")
def rtn(w: jnp.ndarray, scheme: Scheme, layout: Layout, stats=None) -> QTensor:
    """Quantize `w` (logical shape `layout.shape`) by round-to-nearest on `scheme`'s grid.

    `stats` is accepted for a uniform signature; with range "mse" a per-input-channel `stats.act_sq`
    (mean x², shape [K] along the group axis) weights the clip search by activation energy.
    """
    xg = layout.to_grouped(jnp.asarray(w, jnp.float32))
    stats = LayerStats.coerce(stats)
    weight = None
    if stats is not None and scheme.range == "mse" and stats.act_sq is not None:
        weight = _channel_weight(jnp.asarray(stats.act_sq, jnp.float32), layout)
    lo, hi = ranges.estimate(xg, layout.reduce_axes, scheme, weight)
    scale, zero = scheme.scale_zero(lo, hi)
    codes = scheme.encode(xg, scale, zero)
    return scheme.make_qtensor(codes, scale, zero, layout, w.dtype)


def _channel_weight(act_sq: jnp.ndarray, layout: Layout) -> jnp.ndarray:
    """A [K] per-input-channel weight broadcast onto the grouped view (K = the group axis)."""
    shape = [1] * len(layout.shape)
    shape[layout.group_axis] = -1
    return layout.to_grouped(jnp.broadcast_to(act_sq.reshape(shape), layout.shape))


@register("qat")
def qat(
    w: jnp.ndarray,
    scheme: Scheme,
    layout: Layout,
    stats=None,
    *,
    lsq: bool = False,
    lsq_init: str = "range",
    ste: str = "identity",
) -> QTensor:
    """The method quantization-aware-training recipes name (trained by `jq.qat`).

    The options steer training only — `lsq` learns the step sizes (LSQ), `lsq_init` ("range" or "paper") picks
    their start, `ste` ("identity" or "clipped") the straight-through gradient. Applied as plain post-training
    quantization, without learned step sizes, the method is round-to-nearest on the scheme's grid, so a QAT
    recipe also quantizes an untrained model; `jq.qat.convert` uses learned step sizes where they exist.
    """
    return rtn(w, scheme, layout, stats)
