"""AWQ: Activation-aware Weight Quantization (Lin et al., 2023) — the pure pieces: the per-input-channel scale
search and the per-group clip search. Folding the scales into the model (X/s into the previous norm or linear,
diag(s)·W into the weights) is the model's business, not this module's.

Both searches measure the *output* error exactly from second-order statistics instead of re-running the layer on
sampled inputs: with H = mean xᵀx over the calibration tokens [K, K] and Δ = Ŵ − W,

    mean ‖x·Ŵ − x·W‖² = tr(Δᵀ H Δ).

Scale search: for α in {0, 1/grid, …, (grid−1)/grid}, s = act_absmean^α (or, "duo",
act_absmean^α / w_absmean^(1−α)), normalised by sqrt(max(s)·min(s)); quantize diag(s)·W by RTN, dequantize, divide
by s, and keep the α with the least Σ_i tr(Δ_iᵀ H Δ_i) over all kernels that share the input. α = 0 is s = 1, plain RTN, so the search is never worse
than RTN on this objective (the duo variant adds s = 1 as an extra candidate to keep that guarantee).

Clip search: per group and output column, shrink the min-max range by factors 1, 1 − 1/grid, …, 1 − max_shrink and
keep the one with the least Δ_gᵀ H_gg Δ_g, H_gg the diagonal block of H for the group's input channels (the
cross-group terms are ignored, as AWQ's own clip search does when it measures each group's output separately).
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp

from jq.numbers import ranges
from jq.algorithms.registry import register
from jq.algorithms.stats import LayerStats
from jq.numbers.qtensor import Layout, QTensor
from jq.numbers.scheme import Scheme

__all__ = ["search_scales", "clip_search", "awq_clip", "weight_absmean", "output_error", "rtn_fake_quant"]

_S_MIN = 1e-4  # the reference's floor on a candidate scale before normalisation


# -- shared helpers -----------------------------------------------------------------------------------------


def rtn_fake_quant(w: jnp.ndarray, scheme: Scheme, layout: Layout) -> jnp.ndarray:
    """RTN quantize-dequantize of `w` (logical shape) under `scheme` / `layout`; same shape, float32."""
    xg = layout.to_grouped(jnp.asarray(w, jnp.float32))
    lo, hi = ranges.estimate(xg, layout.reduce_axes, scheme)
    scale, zero = scheme.grid.scale_zero(lo, hi)
    return layout.from_grouped(scheme.grid.fake_quant(xg, scale, zero))


def output_error(delta: jnp.ndarray, hessian: jnp.ndarray) -> jnp.ndarray:
    """tr(Δᵀ H Δ) for Δ with the input axis first ([K, ...]): the mean squared output error of the change Δ."""
    d = delta.reshape(delta.shape[0], -1).astype(jnp.float32)
    return jnp.sum(d * (hessian.astype(jnp.float32) @ d))


def _default_layout_fn(scheme: Scheme) -> Callable[[tuple[int, ...]], Layout]:
    return lambda shape: scheme.layout(tuple(shape), (0,))


def _as_list(weights: jnp.ndarray | Sequence[jnp.ndarray]) -> list[jnp.ndarray]:
    if isinstance(weights, (list, tuple)):
        return [jnp.asarray(w, jnp.float32) for w in weights]
    return [jnp.asarray(weights, jnp.float32)]


def _along_input(s: jnp.ndarray, ndim: int) -> jnp.ndarray:
    return s.reshape(s.shape + (1,) * (ndim - 1))


def weight_absmean(weights: jnp.ndarray | Sequence[jnp.ndarray], layouts: Sequence[Layout]) -> jnp.ndarray:
    """Duo AWQ's per-input-channel weight magnitude [K]: |w| divided by its group's (or channel's) max |w|, so every
    group is on a 0..1 scale, then averaged over all output columns of all kernels sharing the input."""
    cols = []
    for w, lay in zip(_as_list(weights), layouts):
        ag = lay.to_grouped(jnp.abs(w))
        ag = ag / (jnp.max(ag, axis=lay.reduce_axes, keepdims=True) + 1e-6)
        a = lay.from_grouped(ag)
        cols.append(a.reshape(a.shape[0], -1))
    return jnp.mean(jnp.concatenate(cols, axis=1), axis=1)


# -- scale search -------------------------------------------------------------------------------------------


def search_scales(
    weights: jnp.ndarray | Sequence[jnp.ndarray],
    hessian: jnp.ndarray,
    act_absmean: jnp.ndarray,
    scheme: Scheme,
    layout_fn: Callable[[tuple[int, ...]], Layout] | None = None,
    *,
    grid: int = 20,
    duo: bool = False,
    w_absmean: jnp.ndarray | None = None,
    tie: Callable[[jnp.ndarray], jnp.ndarray] | None = None,
) -> tuple[jnp.ndarray, dict]:
    """AWQ's grid search of per-input-channel scales for kernels that share one input.

    Args:
      weights: a list of kernels [K, N_i] (or [K, ...]: the shared input axis first), e.g. q/k/v or gate/up.
      hessian: H = mean xᵀx [K, K] of the shared input.
      act_absmean: mean |x| per input channel [K].
      scheme: the weight scheme the kernels will be quantized with (RTN with `scheme.range` measures each α).
      layout_fn: shape → Layout of a kernel (default `scheme.layout(shape, (0,))`).
      grid: number of α values, α = 0, 1/grid, …, (grid − 1)/grid.
      duo: AutoAWQ's "duo scaling", s = act_absmean^α / (w_absmean^(1−α) + 1e-4).
      w_absmean: [K] for duo; computed by `weight_absmean` when None.
      tie: a map s [K] → s [K] every candidate goes through before it is measured (grouped-query attention's v → o
        fold: equal scales on the query heads sharing a kv head, `jq.algorithms.transforms.tie`).

    Returns:
      `(s, info)`: s [K] float32 — the model computes (x / s) · (diag(s)·W) — and info, a dict of arrays:
      "alpha" (the chosen α; NaN when the extra s = 1 candidate of duo won), "alphas" [grid], "errors" [grid]
      (tr(ΔᵀHΔ) summed over the kernels for each α), "error" (the chosen one) and "rtn_error" (s = 1).
      Jit-able (grid, duo and layout_fn static).
    """
    ws = _as_list(weights)
    layout_fn = layout_fn or _default_layout_fn(scheme)
    layouts = [layout_fn(tuple(w.shape)) for w in ws]
    h = jnp.asarray(hessian, jnp.float32)
    x = jnp.asarray(act_absmean, jnp.float32)
    k = x.shape[0]
    for w in ws:
        if w.shape[0] != k:
            raise ValueError(
                f"AWQ: kernel of shape {tuple(w.shape)} does not have the {k} input channels of act_absmean"
            )
    if h.shape != (k, k):
        raise ValueError(f"AWQ: hessian has shape {tuple(h.shape)}, expected ({k}, {k})")
    if duo and w_absmean is None:
        w_absmean = weight_absmean(ws, layouts)

    alphas = jnp.arange(grid, dtype=jnp.float32) / grid

    def scales_for(a):
        if duo:
            s = x**a / (jnp.asarray(w_absmean, jnp.float32) ** (1.0 - a) + 1e-4)
        else:
            s = x**a
        s = jnp.maximum(s, _S_MIN)
        s = s if tie is None else tie(s)
        return s / jnp.sqrt(jnp.max(s) * jnp.min(s))

    def error_for(s):
        total = jnp.float32(0.0)
        for w, lay in zip(ws, layouts):
            sw = _along_input(s, w.ndim)
            wq = rtn_fake_quant(w * sw, scheme, lay) / sw
            total = total + output_error(wq - w, h)
        return total

    cands = jax.vmap(scales_for)(alphas)  # [grid, K]
    errors = jax.lax.map(error_for, cands)
    rtn_error = errors[0] if not duo else error_for(jnp.ones((k,), jnp.float32))
    best = jnp.argmin(errors)
    s = cands[best]
    alpha = alphas[best]
    err = errors[best]
    if duo:  # s = 1 is not on the duo grid; keep "never worse than RTN"
        use_rtn = rtn_error <= err
        s = jnp.where(use_rtn, jnp.ones_like(s), s)
        alpha = jnp.where(use_rtn, jnp.nan, alpha)
        err = jnp.minimum(err, rtn_error)
    info = {"alpha": alpha, "alphas": alphas, "errors": errors, "error": err, "rtn_error": rtn_error}
    return s, info


# -- clip search --------------------------------------------------------------------------------------------


def _matrix_layout(layout: Layout) -> Layout:
    """The 2-D [K, N] layout (contraction axes flattened in front) whose grouped view reshapes to `layout`'s.

    Needs the contraction axes to be the leading axes; with several contraction axes the group axis must not be
    padded nor flat (otherwise the groups of the flattened K would not be the layout's groups).
    """
    nc = len(layout.axes)
    if layout.axes != tuple(range(nc)) or nc == 0:
        raise ValueError(
            f"AWQ clip search needs the contraction axes to lead the kernel; layout has axes {layout.axes} for shape "
            f"{layout.shape} — transpose the kernel to [in..., out...]"
        )
    k = math.prod(layout.shape[:nc])
    n = math.prod(layout.shape[nc:])
    if nc == 1:
        return Layout((k, n), (0,), layout.granularity, layout.group_size, layout.padded, layout.flat)
    g = layout.group_size
    if layout.flat or (layout.padded not in (None, layout.shape[layout.group_axis])) or (
        layout.granularity == "group" and layout.shape[layout.group_axis] % g
    ):
        raise ValueError(
            f"AWQ clip search: layout {layout} with several contraction axes needs unpadded, per-axis groups"
        )
    return Layout((k, n), (0,), layout.granularity, g, None, False)


def _keepdims_shape(layout: Layout) -> tuple[int, ...]:
    g = list(layout.grouped_shape)
    for a in layout.reduce_axes:
        g[a] = 1
    return tuple(g)


def clip_search(
    w: jnp.ndarray,
    hessian: jnp.ndarray,
    scheme: Scheme,
    layout: Layout,
    *,
    grid: int = 20,
    max_shrink: float = 0.5,
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Per group and output column, the shrink of the min-max range in {1, 1 − 1/grid, …, 1 − max_shrink} that
    minimises Δ_gᵀ H_gg Δ_g (per-channel scales: Δᵀ H Δ per column; per-tensor: tr(ΔᵀHΔ)).

    Args:
      w: kernel in its logical shape, contraction axes first ([K, N] for a Dense kernel).
      hessian: H = mean xᵀx over the flattened contraction axes [K, K].
      scheme, layout: how `w` will be quantized.

    Returns:
      keepdims `(lo, hi)` in `layout`'s grouped view (as the functions of `jq.numbers.ranges`), for `scheme.grid.scale_zero`.
    """
    if not 0.0 <= max_shrink < 1.0 or grid < 1:
        raise ValueError(
            f"AWQ clip search: need grid >= 1 and 0 <= max_shrink < 1, got grid={grid}, max_shrink={max_shrink}"
        )
    m = _matrix_layout(layout)
    kk, n = m.shape
    h = jnp.asarray(hessian, jnp.float32)
    if h.shape != (kk, kk):
        raise ValueError(f"AWQ clip search: hessian has shape {tuple(h.shape)}, expected ({kk}, {kk})")
    w2 = jnp.asarray(w, jnp.float32).reshape(kk, n)

    flat = m.flat
    if flat:  # flat groups of a 2-D kernel are per-axis groups when g divides K: search those, reorder at the end
        if kk % m.group_size:
            raise ValueError(
                f"AWQ clip search: flat groups of {m.group_size} straddle output columns of a [{kk}, {n}] kernel; "
                "use per-axis groups (flat_groups: false)"
            )
        m = Layout((kk, n), (0,), "group", m.group_size, None, False)

    xg = m.to_grouped(w2)
    axes = m.reduce_axes
    if m.granularity == "group":
        kp = m.stored_shape[0]
        g = m.group_size
        hp = jnp.pad(h, ((0, kp - kk), (0, kp - kk)))
        hb = jnp.diagonal(hp.reshape(kp // g, g, kp // g, g), axis1=0, axis2=2)  # [g, g, G]
        hb = jnp.moveaxis(hb, -1, 0)  # [G, g, g]

        def objective(d):  # d [G, g, N] → [G, 1, N]
            return jnp.einsum("ain,aij,ajn->an", d, hb, d)[:, None, :]
    else:

        def objective(d):  # d [K, N]
            return jnp.sum(d * (h @ d), axis=axes, keepdims=True)

    lo0, hi0 = ranges.minmax(xg, axes)
    steps = max(1, int(round(max_shrink * grid)) + 1)
    shrinks = 1.0 - jnp.arange(steps, dtype=jnp.float32) / grid

    def err_at(f):
        scale, zero = scheme.grid.scale_zero(lo0 * f, hi0 * f)
        return objective(scheme.grid.fake_quant(xg, scale, zero) - xg)

    def step(carry, f):
        best_err, best_f = carry
        e = err_at(f)
        better = e < best_err
        return (jnp.where(better, e, best_err), jnp.where(better, f, best_f)), None

    (_, best), _ = jax.lax.scan(step, (err_at(shrinks[0]), jnp.ones_like(lo0)), shrinks[1:])
    lo, hi = lo0 * best, hi0 * best  # [G, 1, N] (groups) or [1, N] / [1, 1]
    if flat:  # per-axis [G, 1, N] → flat rows n·G + G_i
        lo, hi = (jnp.transpose(a, (2, 0, 1)).reshape(-1, 1) for a in (lo, hi))
    target = _keepdims_shape(layout)
    return lo.reshape(target), hi.reshape(target)


@register("awq_clip", needs_calibration=True)
def awq_clip(
    w: jnp.ndarray,
    scheme: Scheme,
    layout: Layout,
    stats: LayerStats | dict | None,
    *,
    grid: int = 20,
    max_shrink: float = 0.5,
) -> QTensor:
    """RTN with AWQ's output-aware clip search (`stats.hessian`, mean xᵀx [K, K]). The per-leaf step that follows
    the model-level scale folding of `search_scales`."""
    stats = LayerStats.coerce(stats)
    if stats is None or stats.hessian is None:
        raise ValueError("awq_clip needs calibration statistics with a 'hessian' (mean x^T x); run jq.calibration.capture first")
    xg = layout.to_grouped(jnp.asarray(w, jnp.float32))
    lo, hi = clip_search(w, stats.hessian, scheme, layout, grid=grid, max_shrink=max_shrink)
    scale, zero = scheme.grid.scale_zero(lo, hi)
    codes = scheme.grid.encode(xg, scale, zero)
    return scheme.make_qtensor(codes, scale, zero, layout, w.dtype)
