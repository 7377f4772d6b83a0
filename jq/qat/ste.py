"""Straight-through estimators on one array: weights by a scheme (range from the data, or learned step sizes)
and activations per token. See `jq.qat` for the maths; every forward value is exactly what post-training
quantization produces, because the rounding is `Scheme.encode` / `Scheme.decode` and only the gradients differ.

Value-exact STE. `stop_gradient(fx) + (x − stop_gradient(x))` has the value `fx` bit for bit (x − x = 0) and the
gradient of x; the more common `x + stop_gradient(fx − x)` rounds twice and can differ from `fx` in the last bit,
which would break "the fake-quantized forward equals the converted model".
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from jq import ops
from jq.numbers import ranges
from jq.numbers.qtensor import Layout, QTensor
from jq.numbers.scheme import Scheme

__all__ = [
    "ste",
    "scale_grad",
    "code_bounds",
    "lsq_grad_scale",
    "fake_quant",
    "lsq_init",
    "lsq_scale_zero",
    "lsq_fake_quant",
    "lsq_qtensor",
    "fake_quant_act",
    "trust_mask",
    "STE_MODES",
    "LSQ_INITS",
]

STE_MODES = ("identity", "clipped", "trust")
LSQ_INITS = ("range", "paper")

sg = jax.lax.stop_gradient


def ste(fx: jax.Array, x: jax.Array) -> jax.Array:
    """Value `fx`, gradient of `x` (identity): stop_gradient(fx) + (x − stop_gradient(x)). Same shape."""
    return sg(fx) + (x - sg(x))


def scale_grad(x: jax.Array, g: float) -> jax.Array:
    """Value `x`, gradient multiplied by `g` (LSQ's gradient scaling): sg(x) + (g·x − sg(g·x)), sg = stop_gradient."""
    return sg(x) + (g * x - sg(g * x))


def _d(x: jax.Array) -> jax.Array:
    """Zero in value, identity in gradient: x − stop_gradient(x)."""
    return x - sg(x)


def _inside(xg: jax.Array, scale: jax.Array, zero: jax.Array | None, scheme: Scheme) -> jax.Array:
    """1.0 where v = x / s + z lies in the clip range [Q_n, Q_p], else 0.0 (a constant for the gradient)."""
    qn, qp = code_bounds(scheme)
    v = sg(xg) / sg(scale) + (0.0 if zero is None else sg(zero))
    return ((v >= qn) & (v <= qp)).astype(jnp.float32)


def trust_mask(fx: jax.Array, x: jax.Array, step: jax.Array, trust: float = 1.0) -> jax.Array:
    """QuEST's trust mask (Panferov et al. 2025): 1.0 where the rounding error |fx − x| ≤ trust · step / 2, else 0.0
    (f32, broadcast shape of the inputs; `step` the grid spacing, broadcastable). With trust = 1 it passes every value
    inside the grid and those within half a step beyond its end levels; the rest — clipped outliers whose gradient
    through the identity STE would be most wrong — get none. A constant for the gradient."""
    if not trust > 0:
        raise ValueError(f"QAT option trust={trust!r}: the trust factor must be > 0 (1.0: half a step)")
    return (jnp.abs(sg(fx) - sg(x)) <= trust * 0.5 * sg(step)).astype(jnp.float32)


def _uniform_step(scheme: Scheme, what: str) -> None:
    if not scheme.fmt.is_int:
        raise ValueError(f"QAT option ste='trust' needs a uniform (int) grid, but {what} uses format "
                         f"{scheme.format!r}; use an int format or ste: identity / clipped")


def code_bounds(scheme: Scheme) -> tuple[float, float]:
    """(Q_n, Q_p): the clip range of `x / scale + zero` in code units — the int code range (−8..7 for int4,
    0..15 asymmetric), ±max for fp8 and the codebooks (fp4 ±6, NF4 ±1)."""
    f = scheme.fmt
    if f.is_int:
        lo, hi = f.int_range(scheme.symmetric, scheme.restricted)
        return float(lo), float(hi)
    return -f.max, f.max


def _numel_per_scale(layout: Layout) -> int:
    g = layout.grouped_shape
    return math.prod(g[a] for a in layout.reduce_axes)


def lsq_grad_scale(scheme: Scheme, layout: Layout) -> float:
    """LSQ's g = 1 / sqrt(N · Q_p): N weights share one step size, Q_p is the largest positive code level
    (7 for int4 symmetric, 15 asymmetric, the format's max for fp8 / fp4 / NF4)."""
    _, qp = code_bounds(scheme)
    return 1.0 / math.sqrt(_numel_per_scale(layout) * qp)


def _range_scale_zero(xg: jax.Array, scheme: Scheme, layout: Layout):
    """Scale / zero (keepdims, grouped view) from the data by the scheme's range, as RTN computes them."""
    lo, hi = ranges.estimate(xg, layout.reduce_axes, scheme)
    return scheme.grid.scale_zero(lo, hi)


def fake_quant(w: jax.Array, scheme: Scheme, layout: Layout, mode: str = "identity", trust: float = 1.0) -> jax.Array:
    """Quantize → dequantize `w` (logical shape) with the range taken from `w` (RTN), straight through.

    The scale and zero point are constants for the gradient. `mode="identity"`: dŵ/dw = 1 everywhere (Bengio et al.
    2013); `"clipped"`: 1 inside the clip range, 0 where `w / s + z` falls outside it (percentile / MSE ranges);
    `"trust"`: QuEST's trust estimator, 1 where |ŵ − w| ≤ trust · s / 2 (`trust_mask`; int grids only).
    Returns an array of `w`'s shape and dtype whose value equals `rtn(w).dequantize()` exactly (NVFP4: the
    quantized `w / outer_scale`, decoded with scale · outer_scale, as `jq.quantize_params` stores it).
    """
    xg = layout.to_grouped(w.astype(jnp.float32))
    outer = scheme.grid.outer_scale(sg(w))
    xs = sg(xg) if outer is None else sg(xg) / outer
    scale, zero = _range_scale_zero(xs, scheme, layout)
    scale, zero = sg(scale), None if zero is None else sg(zero)
    fq = scheme.grid.decode(scheme.grid.encode(xs, scale, zero), scale if outer is None else scale * outer, zero)
    if mode == "clipped":
        fq = fq + _inside(xg, scale, zero, scheme) * _d(xg)
    elif mode == "trust":
        _uniform_step(scheme, "this weight")
        fq = fq + trust_mask(fq, xg, scale, trust) * _d(xg)
    else:
        fq = ste(fq, xg)
    return layout.from_grouped(fq).astype(w.dtype)


# -- learned step sizes (LSQ) -----------------------------------------------------------------------------------


def lsq_init(w: jax.Array, scheme: Scheme, layout: Layout, how: str = "range") -> dict[str, jax.Array]:
    """Initial learned quantization parameters of one weight, f32 of shape `layout.scale_shape`.

    how="range": the scale (and zero) RTN would use, so step 0 of QAT is exactly the PTQ model;
    how="paper": LSQ's s = 2·mean|w| / sqrt(Q_p) per scale group (zero as for "range").
    Returns {"scale": s} for symmetric schemes, {"scale": s, "zero": z} (code units) for asymmetric ones.
    Microscaling presets are refused: their scales are powers of two (e8m0) or e4m3 under a per-tensor scale, which
    a free step size cannot be learned into; QAT trains them straight through on the spec's scales (lsq: false).
    """
    if scheme.fmt.is_mx:
        raise ValueError(f"QAT option 'lsq' is true but format {scheme.format!r} has fixed power-of-two / e4m3 block "
                         "scales a step size cannot be learned into; set lsq: false (straight-through QAT on the "
                         "spec's scales)")
    xg = layout.to_grouped(jnp.asarray(w, jnp.float32))
    scale, zero = _range_scale_zero(xg, scheme, layout)
    if how == "paper":
        _, qp = code_bounds(scheme)
        scale = 2.0 * jnp.mean(jnp.abs(xg), axis=layout.reduce_axes, keepdims=True) / math.sqrt(qp)
        scale = jnp.where(scale > 0, scale, 1.0)
    elif how != "range":
        raise ValueError(f"lsq_init {how!r} unknown; choose one of {list(LSQ_INITS)}")
    out = {"scale": _squeeze(scale, layout)}
    if zero is not None:
        out["zero"] = _squeeze(zero, layout)
    return out


def _squeeze(a: jax.Array, layout: Layout) -> jax.Array:
    """Grouped keepdims → stored scale shape (`layout.scale_shape`), f32."""
    return jnp.reshape(a.astype(jnp.float32), layout.scale_shape)


# The smallest positive scale a learned step may reach: the smallest number scale_dtype holds that is normal in f32.
_SCALE_FLOOR = {n: max(float(jnp.finfo(n).smallest_subnormal), float(jnp.finfo(jnp.float32).tiny))
                for n in ("float32", "float16", "bfloat16")}


def lsq_scale_zero(q: dict[str, jax.Array], scheme: Scheme, layout: Layout,
                   g: float = 1.0) -> tuple[jax.Array, jax.Array | None]:
    """The scale and zero the forward pass (and `convert`) uses from learned `q`, broadcastable to the grouped view.

    scale = round_to(scale_dtype, max(s, floor)); int zero = clip(round(z), 0, 2^b − 1), float zero rounded to
    scale_dtype — the values a QTensor stores. Rounding is straight through and gradients are scaled by `g`.
    q["scale"] / q["zero"]: `layout.scale_shape`; returns f32 keepdims (e.g. [G, 1, N]), zero None when q has none.
    """
    sdt = jnp.dtype(scheme.scale_dtype)
    s = scale_grad(layout.expand_scale(q["scale"]), g)
    s = jnp.maximum(s, _SCALE_FLOOR[sdt.name])
    s = ste(s.astype(sdt).astype(jnp.float32), s)
    if "zero" not in q:
        return s, None
    z = scale_grad(layout.expand_scale(q["zero"]), g)
    if scheme.zero_point == "int":
        zr = jnp.clip(jnp.round(z), 0, 2**scheme.bits - 1)
    else:
        zr = z.astype(sdt).astype(jnp.float32)
    return s, ste(zr, z)


def lsq_fake_quant(w: jax.Array, q: dict[str, jax.Array], scheme: Scheme, layout: Layout) -> jax.Array:
    """Learned-step-size fake quantization (Esser et al. 2019) of `w` (logical shape) with parameters `q`.

    Value: `Scheme.decode(Scheme.encode(w, s, z), s, z)`. Gradients, with v = w/s + z and c = clip(v, Q_n, Q_p):
    dŵ/dw = 1[Q_n ≤ v ≤ Q_p]; dŵ/ds = g·(round(c) − z − (w/s)·1[inside]) (= g·(round(v) − v) inside and
    g·(Q_n − z) or g·(Q_p − z) outside); dŵ/dz = −g·s·1[outside] (LSQ+ offset). g = `lsq_grad_scale`.
    """
    g = lsq_grad_scale(scheme, layout)
    xg = layout.to_grouped(w.astype(jnp.float32))
    s, z = lsq_scale_zero(q, scheme, layout, g)
    codes = sg(scheme.grid.encode(xg, s, z))
    deq = scheme.grid.decode(codes, s, z)  # (code − z)·s: gives dŵ/ds = code − z and dŵ/dz = −s
    inner = _d(xg) - sg(xg / s) * _d(s)  # inside the range: dŵ/dw = 1, and −w/s added to dŵ/ds
    if z is not None:
        inner = inner + sg(s) * _d(z)  # inside the range: dŵ/dz = −s + s = 0
    out = deq + _inside(xg, s, z, scheme) * inner  # value: deq exactly (the added terms are 0)
    return layout.from_grouped(out).astype(w.dtype)


def lsq_qtensor(w: jax.Array, q: dict[str, jax.Array], scheme: Scheme, layout: Layout) -> QTensor:
    """The QTensor of `w` (logical shape) under learned parameters `q` (`layout.scale_shape`): the codes and scales
    `lsq_fake_quant` rounds to."""
    xg = layout.to_grouped(jnp.asarray(w, jnp.float32))
    s, z = lsq_scale_zero(q, scheme, layout)
    return scheme.make_qtensor(scheme.grid.encode(xg, s, z), s, z, layout, w.dtype)


# -- activations ------------------------------------------------------------------------------------------------


def fake_quant_act(x: jax.Array, fmt: str, axes: tuple[int, ...], clip: float | str = 1.0,
                   trust: float | None = None) -> jax.Array:
    """Dynamic per-token fake quantization of activations x (clip · abs-max over the contracted `axes`, or α*·rms
    with clip "gaussian": `jq.ops.activations.token_range`; the numbers
    `jq.ops` uses in a W8A8 / W4A8 / W4A4 / BitNet matmul), straight through — or, with `trust` set (int formats),
    QuEST's trust estimator: gradient only where |x̂ − x| ≤ trust · step / 2, step the token's scale. Same shape
    and dtype as x."""
    if trust is None:
        return ste(ops.fake_quantize_activations(x, fmt, tuple(axes), clip), x)
    if not fmt.startswith("int"):
        raise ValueError(f"QAT option ste='trust' needs int activations (a uniform grid); act is {fmt!r}")
    xf = x.astype(jnp.float32)
    codes, step = ops.quantize_activations(xf, fmt, tuple(axes), clip)
    fx = codes.astype(jnp.float32) * step
    return (sg(fx) + trust_mask(fx, xf, step, trust) * _d(xf)).astype(x.dtype)
