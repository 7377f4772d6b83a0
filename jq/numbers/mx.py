"""Microscaling block scales: OCP MX v1.0 (MXFP4 / MXFP6 / MXFP8 / MXINT8) and NVIDIA's NVFP4.

A microscaling preset (`jq.numbers.formats`: `mxfp4`, `mxfp6_e2m3`, `mxfp6_e3m2`, `mxfp8_e4m3`, `mxfp8_e5m2`,
`mxint8`, `nvfp4`) is an element format, a block size along the contraction axis and a scale dtype:

- MX (blocks of 32, e8m0 scales, 1 byte each): the spec's shared scale X = 2^(floor(log2 amax) − emax_elem), emax_elem
  the exponent of the element format's largest normal (fp4 e2m1: 2, fp6 e2m3: 2, fp6 e3m2: 4, fp8 e4m3: 8, e5m2: 15),
  elements V / X rounded to nearest-even and saturated to ± the element max. `scale_round: ceil` instead takes the
  smallest power of two with amax / X ≤ element max (torchao's RCEIL: nothing clips, one binade less resolution
  for blocks whose amax is just above a power of two). MXINT8's elements are int8 with an implicit 2^−6, so its
  stored scale is X · 2^−6 = 2^(floor(log2 amax) − 6) and its codes the int8 values ±127 (the reference library's
  symmetric clamp; −128 decodes but is never produced).
- NVFP4 (blocks of 16, fp4 e2m1 elements, e4m3 scales): a float32 per-tensor `outer` = amax / (448 · 6) brings the
  block scales into e4m3's range; on x / outer a block's scale is e4m3(amax_block / 6) (saturating at 448), and a
  weight is fp4 · e4m3 · outer (`QTensor.outer_scale`). Activations get one outer scale per token.

Exponents are clamped to [−126, 127]: XLA flushes float32 subnormals (2^−127 is one) to zero, so an all-zero (or
≤ 2^−126-sized) block gets the scale 2^−126 (e8m0 code 1) rather than the spec's clamp 2^−127; its codes are zeros
either way. Non-finite inputs are refused for weights (`quantize_leaf`); for activations a NaN / inf makes its
block's scale NaN (the spec's rule: the whole block decodes to NaN).
"""

from __future__ import annotations

import math

import jax.numpy as jnp

from jq.numbers.formats import Format, get_format

__all__ = ["PRESETS", "SCALE_ROUNDINGS", "NVFP4_OUTER_SPAN", "emax", "block_scale", "outer_scale", "fake_quant_blocks"]

PRESETS = ("mxfp4", "mxfp6_e2m3", "mxfp6_e3m2", "mxfp8_e4m3", "mxfp8_e5m2", "mxint8", "nvfp4")
SCALE_ROUNDINGS = ("floor", "ceil")
NVFP4_OUTER_SPAN = 448.0 * 6.0  # e4m3 max × fp4 e2m1 max: outer = amax / this


def emax(f: Format) -> int:
    """The exponent of the element format's largest value in code units: floor(log2 max) (MXINT8: 6, i.e. the
    spec's emax 0 of 1.984375 with its implicit 2^−6 moved into the stored scale)."""
    return math.floor(math.log2(f.max))


def _pow2(e: jnp.ndarray) -> jnp.ndarray:
    return jnp.ldexp(jnp.float32(1.0), jnp.clip(e, -126, 127).astype(jnp.int32))


def block_scale(amax: jnp.ndarray, f: Format, rounding: str = "floor") -> jnp.ndarray:
    """Float32 block scales (exactly representable in `f.scale_dtype_name`) for block abs-maxima `amax` (any shape,
    float32, ≥ 0; NVFP4: of x / outer). MX: a power of two by the spec's rule (`rounding` "floor") or the smallest
    one not clipping ("ceil"); NVFP4: e4m3(amax / 6), saturating at 448, 1 where that is 0."""
    amax = amax.astype(jnp.float32)
    if f.scale_dtype_name == "float8_e4m3fn":
        s = jnp.minimum(amax / f.max, 448.0).astype(jnp.float8_e4m3fn).astype(jnp.float32)
        return jnp.where(s > 0, s, jnp.where(jnp.isnan(amax), jnp.nan, 1.0))
    _, e = jnp.frexp(amax)  # amax = m · 2^e, m in [0.5, 1): floor(log2 amax) = e − 1
    e = jnp.where(amax > 0, e - 1 - emax(f), -126)
    if rounding == "ceil":  # one binade up where the spec's scale would clip the block's largest element
        e = e + (amax > f.max * _pow2(e)).astype(e.dtype)
    return jnp.where(jnp.isfinite(amax), _pow2(e), jnp.nan)


def outer_scale(amax: jnp.ndarray) -> jnp.ndarray:
    """NVFP4's float32 second-level scale amax / (448 · 6) for abs-maxima `amax` (a tensor's: shape (); a token's:
    keepdims), 1 where amax is 0. Computed as amax · fl32(1 / 2688), one correctly rounded product (XLA turns a
    division by a constant into that under jit but not eagerly, which would make jitted and eager scales differ)."""
    o = amax.astype(jnp.float32) * jnp.float32(1.0 / NVFP4_OUTER_SPAN)
    return jnp.where(o > 0, o, 1.0)


def fake_quant_blocks(x: jnp.ndarray, fmt: str, axis: int = -1, rounding: str = "floor",
                      clip: float = 1.0) -> jnp.ndarray:
    """x (any float array) through a microscaling preset along `axis` and back, float32 of x's shape: blocks of
    `block` consecutive elements (the axis zero-padded to a multiple; padding does not change a block's amax), each
    with its block scale; NVFP4 first divides by one outer scale per slice along `axis` (per token for
    activations). `clip` scales every block's amax (and the outer scale) before the scale is chosen."""
    f = get_format(fmt)
    if not f.is_mx:
        raise ValueError(f"format {fmt!r} is not a microscaling preset; choose one of {list(PRESETS)}")
    x = jnp.moveaxis(x.astype(jnp.float32), axis, -1)
    k = x.shape[-1]
    xb = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, -k % f.block)]).reshape(x.shape[:-1] + (-1, f.block))
    outer = None
    if f.scale_dtype_name == "float8_e4m3fn":
        outer = outer_scale(jnp.max(jnp.abs(x), axis=-1, keepdims=True)[..., None] * clip)
        xb = xb / outer
    s = block_scale(jnp.max(jnp.abs(xb), axis=-1, keepdims=True) * clip, f, rounding)
    y = f.decode(f.encode(xb / s, symmetric=True, restricted=True), jnp.float32) * (s if outer is None else s * outer)
    return jnp.moveaxis(y.reshape(x.shape[:-1] + (-1,))[..., :k], -1, axis)
