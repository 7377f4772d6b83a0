"""W4A16: packed int4 weights, float activations, f32 accumulation; nibbles unpacked and scaled inside the kernel.

Weight layout: jq's own, used as stored — no prepacking. Codes of a (K, N) weight are packed along K,
little-endian: byte j of a column holds code 2j in its low nibble and code 2j+1 in its high nibble (two's
complement for symmetric formats, 0..15 for asymmetric). Group scales / zero points are (K/g, N); per-channel
ones (1, N).

Why x is split, not the weight: interleaving the two nibble planes back into K order inside a kernel needs a
shuffle Mosaic does not do well, so the wrapper splits the *activations* instead (cheap: M·K elements, one XLA
op): x_even = x[:, 0::2] multiplies the low nibbles and x_odd = x[:, 1::2] the high ones,

    x @ W = x_even @ W_low + x_odd @ W_high,       W_low/high: (K/2, N), row j ↔ K rows 2j / 2j+1.

Tile (one K step of bk logical rows): x_even, x_odd (bm, bk/2); packed bytes (bk/2, bn) as int8; scales and
zeros (bk/g, bn). In the kernel: sign- or zero-extend each nibble to int32, (q − z)·s in f32 per group (group i
covers packed rows i·g/2 … (i+1)·g/2 of the tile), cast to the activation dtype, two dots accumulating in f32.
The dequantized tile equals `QTensor.dequantize(x.dtype)` bit for bit, so results differ from the XLA fallback
only in summation order.

bk is a multiple of g (so each step sees whole groups); on GPU bk/2 >= 16 (Triton's minimum dot K) and powers of
two; on TPU bk/2 a multiple of 128 lanes, or all of K in one step.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.typing import DTypeLike

from jq.pallas_kernels import autotune
from jq.pallas_kernels.common import Blocks, Fit, Mode, default_mode, dequant_rows, fit_blocks, pad_to, tpu_k_align
from jq.pallas_kernels.driver import Operand, identity_epilogue, tiled_matmul

__all__ = ["w4a16_matmul", "select_blocks", "fit", "k_align", "unsupported"]


def k_align(style: str, group_size: int | None) -> int:
    """What bk must be a multiple of: whole groups, and each nibble plane's K step a legal dot / lane width."""
    if style == "gpu":
        return max(32, group_size or 1)
    return tpu_k_align(0.5, group_size)


def unsupported(style: str, group_size: int | None) -> str | None:
    """Why this kernel cannot take a weight with these groups in this style, or None."""
    g = group_size
    if g is None:
        return None
    if g % 2:
        return f"odd group size {g}"
    if style == "gpu" and (g & (g - 1) or g < 16):
        return f"group size {g} is not a power of two >= 16 (Triton tiles)"
    if style == "tpu" and g % 16:
        return f"group size {g} is not a multiple of 16 (Mosaic sublane tiles)"
    return None


def _tile(x_even, x_odd, w, scale, zero=None, *, symmetric: bool, zero_min: bool = False):
    """One K step. x_even, x_odd: (bm, h); w: (h, bn) int8 bytes; scale/zero: (r, bn), r | h. → (bm, bn) f32."""
    v = w.astype(jnp.int32)
    if symmetric:  # sign-extend each nibble: shift it to the top of the int32, shift back arithmetically
        lo = jax.lax.shift_right_arithmetic(jax.lax.shift_left(v, 28), 28)
        hi = jax.lax.shift_right_arithmetic(jax.lax.shift_left(v, 24), 28)
    else:
        lo = v & 15
        hi = jax.lax.shift_right_arithmetic(v, 4) & 15
    dt = x_even.dtype
    w_lo = dequant_rows(lo, scale, zero, zero_min).astype(dt)
    w_hi = dequant_rows(hi, scale, zero, zero_min).astype(dt)
    acc = jnp.dot(x_even, w_lo, preferred_element_type=jnp.float32)
    return acc + jnp.dot(x_odd, w_hi, preferred_element_type=jnp.float32)


def w4a16_matmul(
    x: jax.Array,
    packed: jax.Array,
    scale: jax.Array,
    zero: jax.Array | None = None,
    *,
    group_size: int | None = None,
    symmetric: bool | None = None,
    zero_min: bool = False,
    out_dtype: DTypeLike | None = None,
    blocks: Blocks | None = None,
    mode: Mode | None = None,
) -> jax.Array:
    """x @ W for an int4 weight in jq's packed layout.

    Args:
      x: (M, K) bf16 / f16 / f32 activations, K <= Kq (zero-padded up to Kq).
      packed: (Kq/2, N) uint8 or int8, two codes per byte along K (see the module docstring).
      scale: (Kq/g, N) group scales, or (1, N) per channel (group_size None).
      zero: zero points in code units, same shape as scale, or None for symmetric codes (with `zero_min`: offsets in
        weight units, w = q·s + zero, as GGUF Q4_1 stores d·q + m).
      group_size: g, or None for per-channel scales.
      symmetric: codes are two's complement (default: zero is None).
      out_dtype: result dtype (default x.dtype). blocks / mode: override the autotuner / the backend's mode.
    Returns: (M, N) in out_dtype.
    """
    mode = mode or default_mode()
    symmetric = zero is None if symmetric is None else symmetric
    M, K = x.shape
    Kq, N = packed.shape[0] * 2, packed.shape[1]
    if K > Kq:
        raise ValueError(f"x has K={K} but the packed weight holds only {Kq} rows")
    G = 1 if group_size is None else Kq // group_size
    if (group_size is not None and Kq % group_size) or tuple(scale.shape) != (G, N):
        raise ValueError(f"scales {tuple(scale.shape)} do not fit K={Kq}, N={N}, group_size={group_size}")
    blocks = blocks or select_blocks(M, Kq, N, group_size=group_size, symmetric=symmetric, dtype=x.dtype, mode=mode)
    plan = fit(blocks, mode.style, M, Kq, N, group_size, x.dtype)
    b = plan.blocks
    out_dtype = out_dtype or x.dtype

    xp = pad_to(x, (plan.Mp, plan.Kp))
    xe = xp.reshape(plan.Mp, plan.Kp // 2, 2)
    x_even, x_odd = xe[:, :, 0], xe[:, :, 1]
    w = jax.lax.bitcast_convert_type(packed, jnp.int8) if packed.dtype == jnp.uint8 else packed
    w = pad_to(w, (plan.Kp // 2, plan.Np))
    sdt = jnp.float32 if mode.style == "tpu" else scale.dtype  # Mosaic: f32 metadata; Triton: stored dtype
    arrays = [x_even, x_odd, w]
    specs = [Operand("lhs", b.bk // 2), Operand("lhs", b.bk // 2), Operand("rhs", b.bk // 2)]
    if group_size is None:
        meta_rows, meta_spec = 1, Operand("kcol", 1, per_k=False)
    else:
        meta_rows, meta_spec = plan.Kp // group_size, Operand("kcol", b.bk // group_size)
    arrays.append(pad_to(scale.astype(sdt), (meta_rows, plan.Np), 1))
    specs.append(meta_spec)
    if zero is not None:
        zdt = jnp.float32 if zero.dtype == jnp.float32 else sdt  # float32 zeros (a QA-LoRA merge) stay exact
        arrays.append(pad_to(zero.astype(zdt), (meta_rows, plan.Np), 0))
        specs.append(meta_spec)
    out = tiled_matmul(
        functools.partial(_tile, symmetric=symmetric, zero_min=zero_min), identity_epilogue, arrays, specs,
        fit=plan, out_dtype=out_dtype, acc_dtype=jnp.float32, mode=mode, name=_name(group_size, symmetric),
    )
    return out[:M, :N]


def _name(group_size: int | None, symmetric: bool) -> str:
    return f"w4a16_{'sym' if symmetric else 'asym'}_{'g%d' % group_size if group_size else 'ch'}"


def fit(blocks: Blocks, style: str, M: int, K: int, N: int, group_size: int | None, dtype: DTypeLike) -> Fit:
    """Blocks adapted to this kernel and problem: whole groups per K step, half a byte per weight."""
    return fit_blocks(blocks, style, M, K, N, k_align(style, group_size), jnp.dtype(dtype).itemsize, 0.5)


def select_blocks(M: int, K: int, N: int, *, group_size: int | None, symmetric: bool, dtype: DTypeLike,
                  mode: Mode) -> Blocks:
    """Blocks for x (M, K) @ W (K, N) (K: stored rows): the defaults, the tuning cache, or tuning now."""
    return autotune.choose(
        _name(group_size, symmetric), mode, M, K, N, dtype,
        functools.partial(fit, style=mode.style, M=M, K=K, N=N, group_size=group_size, dtype=dtype),
        functools.partial(_runner, K=K, N=N, group_size=group_size, symmetric=symmetric, dtype=dtype, mode=mode),
    )


def _runner(*, K: int, N: int, group_size, symmetric: bool, dtype, mode: Mode, M: int):
    """For the autotuner: synthetic operands of the real shapes and a function of blocks timing one call."""
    key = jax.random.key(0)
    x = jax.random.normal(key, (M, K), dtype)
    packed = jax.random.randint(key, (K // 2, N), 0, 256, jnp.int32).astype(jnp.uint8)
    G = K // group_size if group_size else 1
    scale = jnp.full((G, N), 0.01, jnp.float16)
    zero = None if symmetric else jnp.full((G, N), 8, jnp.uint8)

    def run(blocks: Blocks):
        f = jax.jit(functools.partial(w4a16_matmul, group_size=group_size, symmetric=symmetric, blocks=blocks, mode=mode))
        return lambda: f(x, packed, scale, zero)

    return run
