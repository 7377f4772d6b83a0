"""W8A16: 8-bit weight-only matmul — int8 (symmetric), uint8 (asymmetric) or fp8 codes, float activations.

Weight layout: jq's stored codes (K, N), one per byte, used as they are. Scales are per output channel (1, N)
or per group of g rows along K (K/g, N); asymmetric codes carry zero points of the same shape.

Tile (one K step of bk rows): x (bm, bk); codes (bk, bn); scales / zeros (bk/g, bn) or (1, bn). In the kernel
the codes become f32, (q − z)·s per group, cast to the activation dtype and one dot accumulates in f32. Unsigned
codes travel as int8 bytes (a free bitcast) and are recovered with `& 255`, because Mosaic and Triton both treat
small integers as signless. The dequantized tile equals `QTensor.dequantize(x.dtype)` exactly.

fp8 weights (e4m3 / e5m2) are decoded the same way (code → f32 → scale) and need a GPU with fp8 conversions
(compute capability >= 8.9); dispatch does not send them to a compiled TPU kernel (interpret mode runs them).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.typing import DTypeLike

from jq.pallas_kernels import autotune
from jq.pallas_kernels.common import Blocks, Fit, Mode, default_mode, dequant_rows, fit_blocks, pad_to, tpu_k_align
from jq.pallas_kernels.driver import Operand, identity_epilogue, tiled_matmul

__all__ = ["w8a16_matmul", "select_blocks", "fit", "k_align", "unsupported"]


def k_align(style: str, group_size: int | None) -> int:
    """The K step the blocks must be a multiple of: whole groups, at least 16 rows on GPU; Mosaic's on TPU."""
    if style == "gpu":
        return max(16, group_size or 1)
    return tpu_k_align(1, group_size)


def unsupported(style: str, group_size: int | None) -> str | None:
    """Why this kernel cannot take a weight with these groups in this style, or None."""
    g = group_size
    if style == "gpu" and g is not None and g & (g - 1):
        return f"group size {g} is not a power of two (Triton tiles)"
    if style == "tpu" and g is not None and g % 8:
        return f"group size {g} is not a multiple of 8 (Mosaic sublane tiles)"
    return None


def _tile(x, w, scale, zero=None, *, unsigned: bool, zero_min: bool = False):
    """One K step. x: (bm, bk); w: (bk, bn) codes; scale / zero: (r, bn). → (bm, bn) f32."""
    q = (w.astype(jnp.int32) & 255) if unsigned else w
    wd = dequant_rows(q, scale, zero, zero_min).astype(x.dtype)
    return jnp.dot(x, wd, preferred_element_type=jnp.float32)


def w8a16_matmul(
    x: jax.Array,
    codes: jax.Array,
    scale: jax.Array,
    zero: jax.Array | None = None,
    *,
    group_size: int | None = None,
    zero_min: bool = False,
    out_dtype: DTypeLike | None = None,
    blocks: Blocks | None = None,
    mode: Mode | None = None,
) -> jax.Array:
    """x @ W for an 8-bit weight.

    Args:
      x: (M, K) bf16 / f16 / f32, K <= Kq (zero-padded up to Kq).
      codes: (Kq, N) int8 (symmetric), uint8 (asymmetric, with `zero`) or float8 codes.
      scale: (Kq/g, N) group scales or (1, N) per channel. zero: same shape (code units; weight-unit offsets with
        `zero_min`) or None.
      group_size: g, or None for per-channel scales.
    Returns: (M, N) in out_dtype (default x.dtype).
    """
    mode = mode or default_mode()
    M, K = x.shape
    Kq, N = codes.shape
    G = 1 if group_size is None else Kq // group_size
    if K > Kq or (group_size is not None and Kq % group_size) or tuple(scale.shape) != (G, N):
        raise ValueError(f"x {x.shape}, codes {codes.shape}, scales {scale.shape} and group_size {group_size} disagree")
    unsigned = codes.dtype == jnp.uint8
    blocks = blocks or select_blocks(M, Kq, N, group_size=group_size, codes_dtype=codes.dtype, asym=zero is not None,
                                     dtype=x.dtype, mode=mode)
    plan = fit(blocks, mode.style, M, Kq, N, group_size, x.dtype)
    b = plan.blocks
    w = jax.lax.bitcast_convert_type(codes, jnp.int8) if unsigned else codes
    sdt = jnp.float32 if mode.style == "tpu" else scale.dtype
    if group_size is None:
        rows, meta = 1, Operand("kcol", 1, per_k=False)
    else:
        rows, meta = plan.Kp // group_size, Operand("kcol", b.bk // group_size)
    arrays = [pad_to(x, (plan.Mp, plan.Kp)), pad_to(w, (plan.Kp, plan.Np)), pad_to(scale.astype(sdt), (rows, plan.Np), 1)]
    specs = [Operand("lhs", b.bk), Operand("rhs", b.bk), meta]
    if zero is not None:
        zdt = jnp.float32 if zero.dtype == jnp.float32 else sdt  # float32 zeros (a QA-LoRA merge) stay exact
        arrays.append(pad_to(zero.astype(zdt), (rows, plan.Np), 0))
        specs.append(meta)
    out = tiled_matmul(
        functools.partial(_tile, unsigned=unsigned, zero_min=zero_min), identity_epilogue, arrays, specs,
        fit=plan, out_dtype=out_dtype or x.dtype, acc_dtype=jnp.float32, mode=mode,
        name=_name(group_size, codes.dtype),
    )
    return out[:M, :N]


def _name(group_size: int | None, codes_dtype: DTypeLike) -> str:
    dt = jnp.dtype(codes_dtype)
    kind = {"uint8": "u8", "int8": "i8"}.get(dt.name, dt.name)
    return f"w8a16_{kind}_{'g%d' % group_size if group_size else 'ch'}"


def fit(blocks: Blocks, style: str, M: int, K: int, N: int, group_size: int | None, dtype: DTypeLike) -> Fit:
    """Blocks adapted to this kernel and problem: whole groups per K step, one byte per weight."""
    return fit_blocks(blocks, style, M, K, N, k_align(style, group_size), jnp.dtype(dtype).itemsize, 1)


def select_blocks(M: int, K: int, N: int, *, group_size: int | None, codes_dtype: DTypeLike, asym: bool,
                  dtype: DTypeLike, mode: Mode) -> Blocks:
    """Blocks for x (M, K) @ W (K, N): the defaults, the tuning cache, or tuning now."""
    return autotune.choose(
        _name(group_size, codes_dtype), mode, M, K, N, dtype,
        functools.partial(fit, style=mode.style, M=M, K=K, N=N, group_size=group_size, dtype=dtype),
        functools.partial(_runner, K=K, N=N, group_size=group_size, codes_dtype=codes_dtype, asym=asym, dtype=dtype,
                          mode=mode),
    )


def _runner(*, K: int, N: int, group_size, codes_dtype, asym: bool, dtype, mode: Mode, M: int):
    """For the autotuner: synthetic operands of the real shapes; returns blocks → thunk."""
    key = jax.random.key(0)
    x = jax.random.normal(key, (M, K), dtype)
    codes = jax.random.randint(key, (K, N), -100, 100, jnp.int32).astype(codes_dtype)
    G = K // group_size if group_size else 1
    scale = jnp.full((G, N), 0.01, jnp.float16)
    zero = jnp.full((G, N), 128, jnp.uint8) if asym else None

    def run(blocks: Blocks):
        f = jax.jit(functools.partial(w8a16_matmul, group_size=group_size, blocks=blocks, mode=mode))
        return lambda: f(x, codes, scale, zero)

    return run
