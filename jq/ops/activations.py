"""Dynamic per-token activation quantization (W8A8 / W4A8 / W4A4, and microscaling MX / NVFP4 blocks) and the
LLM.int8 outlier mask: the numbers both the XLA fallback and the kernels use, so that they see the same codes."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from jq.numbers import mx
from jq.numbers.formats import get_format
from jq.numbers.grid import Grid
from jq.numbers.ranges import gaussian_clip

__all__ = ["token_range", "quantize_activations", "fake_quantize_activations", "outlier_channels"]


def token_range(x: jax.Array, fmt: str, axes: tuple[int, ...], clip: float | str = 1.0) -> jax.Array:
    """Per-token f32 range over the contracted `axes` (kept as size-1 dims): clip · max |x|, or with clip
    "gaussian" α*·rms(x), α* the MSE-optimal clip of a standard normal on the symmetric restricted grid of the int
    format `fmt` (QuEST's activation clip: Hadamard-rotated tokens are close to Gaussian)."""
    xf = x.astype(jnp.float32)
    if clip == "gaussian":
        alpha = gaussian_clip(Grid(format=fmt, symmetric=True, restricted=True))
        return alpha * jnp.sqrt(jnp.mean(xf * xf, axis=axes, keepdims=True))
    return jnp.max(jnp.abs(xf), axis=axes, keepdims=True) * clip


def quantize_activations(x: jax.Array, fmt: str, axes: tuple[int, ...], clip: float | str = 1.0
                         ) -> tuple[jax.Array, jax.Array]:
    """Dynamic per-token quantization: codes of x (int8, int4 (unpacked, in int8) or fp8 e4m3) and f32 scales with
    one value per token: `token_range` / qmax, kept as size-1 dims. Integer grids are symmetric restricted (±127,
    ±7); values beyond a clipped range saturate. Microscaling formats have one scale per block, not per token: they
    run through `fake_quantize_activations` only."""
    f = get_format(fmt)
    if f.is_mx:
        raise ValueError(f"quantize_activations: {fmt!r} has block scales, not one per token; use "
                         "fake_quantize_activations (the XLA path) for microscaling activations")
    amax = token_range(x, fmt, axes, clip)
    qmax = float(2 ** (f.bits - 1) - 1) if f.is_int else f.max
    scale = jnp.where(amax > 0, amax / qmax, 1.0)
    return f.encode(x.astype(jnp.float32) / scale, symmetric=True, restricted=True), scale


def fake_quantize_activations(x: jax.Array, fmt: str, axes: tuple[int, ...], clip: float | str = 1.0) -> jax.Array:
    """x through `quantize_activations` and back, in x's shape and dtype. Microscaling formats (`mxfp8_e4m3`,
    `mxfp4`, `nvfp4`, …: `jq.numbers.mx`) quantize each token's contracted elements (`axes` flattened in order) in
    blocks of the preset's size, the last block zero-padded; NVFP4 adds one float32 outer scale per token."""
    if get_format(fmt).is_mx:
        axes = tuple(sorted(a % x.ndim for a in axes))
        xm = jnp.moveaxis(x, axes, tuple(range(x.ndim - len(axes), x.ndim)))
        lead = xm.shape[: x.ndim - len(axes)]
        y = mx.fake_quant_blocks(xm.reshape(lead + (math.prod(xm.shape[len(lead):]),)), fmt, -1, clip=clip)
        y = jnp.moveaxis(y.reshape(xm.shape), tuple(range(x.ndim - len(axes), x.ndim)), axes)
        return y.astype(x.dtype)
    xq, xs = quantize_activations(x, fmt, axes, clip)
    return (get_format(fmt).decode(xq, jnp.float32) * xs).astype(x.dtype)


def outlier_channels(x: jax.Array, axes: tuple[int, ...], threshold: float) -> jax.Array:
    """LLM.int8's outlier mask: 1.0 for the contracted channels (`axes`) where some token of x has |x| > threshold,
    as a float array broadcastable against x."""
    other = tuple(a for a in range(x.ndim) if a not in axes)
    return (jnp.max(jnp.abs(x.astype(jnp.float32)), axis=other, keepdims=True) > threshold).astype(x.dtype)
