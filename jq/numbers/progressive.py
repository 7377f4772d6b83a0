"""Progressive group quantization (QServe's QoQ, Lin et al. 2024): int4 weights whose group parameters live on an
int8 grid, so a W4A8 matmul runs in int8 after a cheap integer dequantization.

Two levels, both stored:

1. per output channel, a float16 scale s1 = max |w| / 119 (the *protective range*: level-1 values w / s1 lie in
   [−119, 119] instead of [−127, 127]);
2. per group of `g` along the contraction axis, an unsigned 4-bit code q with an unsigned 8-bit integer scale s8 and
   an integer zero point z (asymmetric, range widened to contain 0): w8 = (q − z) · s8 is an integer.

A weight is w ≈ (q − z) · s8 · s1, and w8 = (q − z) · s8 is always in the int8 range: s8 = round((max − min) / 15)
≤ round(238 / 15) = 16 on the protected range, so a code rounded to nearest overshoots by at most s8 / 2 ≤ 8
(119 + 8 = 127), and `clamp_codes` keeps every code — also those GPTQ's error feedback pushes past the range — inside
[z − ⌊128 / s8⌋, z + ⌊127 / s8⌋]. The float dequantization (q − z) · (s8 · s1) is exact in float32 (s8 · s1 needs at
most 19 significant bits, times a 5-bit integer), so it equals the int8 path's w8 · s1 bit for bit.

Stored in a `QTensor`: `codes` int4 (packed), `scale` uint8 [groups, N], `zero` uint8 [groups, N] and
`outer_scale` float16 with 1 at the contraction axes (e.g. [1, N]); bits per weight count all of them:
4 + 8/g + 8/g + 16/K. Level-1 rounding happens only implicitly: the codes are fitted to w / s1 directly (rounding
w / s1 to int8 first and quantizing those integers again would only add a second rounding error; the stored numbers
have the same form either way).
"""

from __future__ import annotations

import jax.numpy as jnp

from jq.numbers.qtensor import Layout, QTensor

__all__ = ["PROTECT", "channel_scale", "scale_zero", "clamp_codes", "is_progressive", "int8_weights", "as_int8"]

PROTECT = 119.0  # level-1 range: |w / s1| <= 119, so that (q − z) · s8 stays within int8 after rounding


def channel_scale(w: jnp.ndarray, axes: tuple[int, ...]) -> jnp.ndarray:
    """Level-1 per-output-channel float16 scales s1 = max |w| / `PROTECT` over the contraction `axes`, keepdims
    (a Dense kernel [K, N] → [1, N]); an all-zero channel gets 1."""
    amax = jnp.max(jnp.abs(jnp.asarray(w, jnp.float32)), axis=tuple(axes), keepdims=True)
    s = (amax / PROTECT).astype(jnp.float16)
    return jnp.where(s > 0, s, jnp.ones_like(s))


def scale_zero(lo: jnp.ndarray, hi: jnp.ndarray, bits: int) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Level-2 integer group scale s8 ∈ [1, 255] and zero point z ∈ [0, 2^bits − 1] (both float32 holding integers)
    for level-1 ranges lo..hi (any broadcastable shape, e.g. keepdims [G, 1, N]); the range is widened to contain 0."""
    qmax = 2**bits - 1
    lo, hi = jnp.minimum(lo, 0.0), jnp.maximum(hi, 0.0)
    s = jnp.clip(jnp.round((hi - lo) / qmax), 1.0, 255.0)
    return s, jnp.clip(jnp.round(-lo / s), 0.0, qmax)


def clamp_codes(codes: jnp.ndarray, scale: jnp.ndarray, zero: jnp.ndarray) -> jnp.ndarray:
    """Codes restricted so that (q − z) · s8 lies in [−128, 127]; same shape and dtype as `codes`."""
    q = codes.astype(jnp.float32)
    q = jnp.clip(q, zero - jnp.floor(128.0 / scale), zero + jnp.floor(127.0 / scale))
    return q.astype(codes.dtype)


def is_progressive(q: QTensor) -> bool:
    """Whether `q` holds progressive weights: integer group scales under a per-channel float outer scale."""
    return q.outer_scale is not None and jnp.issubdtype(q.scale.dtype, jnp.integer)


def int8_weights(q: QTensor) -> jnp.ndarray:
    """The level-1 integer weights w8 = (q − z) · s8 of a progressive QTensor, int8 in the logical shape (e.g. a
    Dense kernel [K, N]; permutation undone, padding dropped) — what a W4A8 kernel forms in registers. The weight is
    w8 · `q.outer_scale`."""
    if not is_progressive(q):
        raise ValueError(f"int8_weights: {q!r} is not a progressive QTensor (uint8 group scales under a per-channel "
                         "outer scale: scheme progressive: true)")
    lay = q.layout
    v = q.unpacked_codes().astype(jnp.int32).reshape(lay.grouped_shape)
    w8 = (v - lay.expand_scale(q.zero.astype(jnp.int32))) * lay.expand_scale(q.scale.astype(jnp.int32))
    return lay.from_grouped(w8, q.perm).astype(jnp.int8)


def as_int8(q: QTensor) -> QTensor:
    """The same weight as an int8 symmetric per-channel QTensor (codes w8 [logical shape], scales s1), executing by
    q's policy: the form the W8A8 paths of `jq.ops` (the int8 × int8 → int32 dot, the Pallas W8A8 kernel) take."""
    lay = q.layout
    return QTensor(codes=int8_weights(q), scale=jnp.asarray(q.outer_scale),
                   layout=Layout(lay.shape, lay.axes, "channel"), fmt="int8", symmetric=True, dtype=q.dtype,
                   policy=q.policy)

