"""W8A8 int8: int8 activations × int8 weights → int32, scales applied once in the epilogue.

Activations are quantized *outside* the kernel, per token (row) — `quantize_rows`, the same numbers as
`jq.ops.quantize_activations` over the last axis: scale = absmax / 127, codes = round(x / scale) in −127..127.
Weights are jq's symmetric int8 codes (K, N) with per-channel (1, N) or per-tensor scales.

Tile (one K step): x codes (bm, bk) int8, weight codes (bk, bn) int8, one integer dot into an int32 accumulator
(exact: no rounding until the end). Epilogue: acc · x_scale[m] · w_scale[n] in f32, cast to the output dtype —
the same expression, in the same order, as the XLA W8A8 path in `jq.ops`, so results agree to the last bit
up to the final cast.

`scaled_matmul` is the shared skeleton of this kernel and the fp8 one (`fp8.py`): codes in, per-row and
per-column scales in the epilogue.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.typing import DTypeLike

from jq.numbers.formats import get_format
from jq.pallas_kernels import autotune
from jq.pallas_kernels.common import Blocks, Mode, default_mode, fit_blocks, pad_to
from jq.pallas_kernels.driver import Operand, tiled_matmul

__all__ = ["w8a8_int8_matmul", "quantize_rows", "scaled_matmul", "select_blocks", "k_align"]


def k_align(style: str) -> int:
    """int8 / fp8 tensor-core dots take K in steps of 32 on GPU; 128 lanes on TPU."""
    return 32 if style == "gpu" else 128


def quantize_rows(x: jax.Array, fmt: str = "int8") -> tuple[jax.Array, jax.Array]:
    """Dynamic per-row quantization of x (M, K) to "int8" or "fp8_e4m3": codes (M, K) and f32 scales (M, 1).

    Identical to `jq.ops.quantize_activations(x, fmt, (x.ndim - 1,))`.
    """
    f = get_format(fmt)
    xf = x.astype(jnp.float32)
    amax = jnp.max(jnp.abs(xf), axis=-1, keepdims=True)
    qmax = 127.0 if fmt == "int8" else f.max
    scale = jnp.where(amax > 0, amax / qmax, 1.0)
    return f.encode(xf / scale, symmetric=True, restricted=True), scale


def _tile(x, w, *, acc_dtype):
    return jnp.dot(x, w, preferred_element_type=acc_dtype)


def _epilogue(acc, xs, ws):
    """acc (bm, bn) · x scales (bm, 1) · weight scales (1, bn), in f32."""
    return acc.astype(jnp.float32) * xs * ws


def scaled_matmul(
    xq: jax.Array,
    xs: jax.Array,
    wq: jax.Array,
    ws: jax.Array,
    *,
    acc_dtype: DTypeLike,
    name: str,
    out_dtype: DTypeLike = jnp.float32,
    blocks: Blocks | None = None,
    mode: Mode | None = None,
) -> jax.Array:
    """(xq · xs) @ (wq · ws) with the scales applied after an exact low-precision dot.

    xq: (M, K) codes; xs: (M, 1) or (1, 1) f32 row scales; wq: (K, N) codes of the same dtype;
    ws: (1, N) or (1, 1) column scales. Returns (M, N) in out_dtype.
    """
    mode = mode or default_mode()
    M, K = xq.shape
    Kw, N = wq.shape
    if K != Kw or xq.dtype != wq.dtype:
        raise ValueError(f"codes disagree: x {xq.shape} {xq.dtype}, w {wq.shape} {wq.dtype}")
    blocks = blocks or select_blocks(M, K, N, codes_dtype=xq.dtype, acc_dtype=acc_dtype, name=name, mode=mode)
    fit = fit_blocks(blocks, mode.style, M, K, N, k_align(mode.style), 1, 1)
    b = fit.blocks
    xs = jnp.broadcast_to(xs.astype(jnp.float32), (M, 1))
    ws = jnp.broadcast_to(ws.astype(jnp.float32).reshape(1, -1), (1, N))
    arrays = [pad_to(xq, (fit.Mp, fit.Kp)), pad_to(wq, (fit.Kp, fit.Np)),
              pad_to(xs, (fit.Mp, 1), 1), pad_to(ws, (1, fit.Np), 1)]
    specs = [Operand("lhs", b.bk), Operand("rhs", b.bk), Operand("row"), Operand("col")]
    out = tiled_matmul(
        functools.partial(_tile, acc_dtype=acc_dtype), _epilogue, arrays, specs,
        fit=fit, out_dtype=out_dtype, acc_dtype=acc_dtype, mode=mode, name=name,
    )
    return out[:M, :N]


def w8a8_int8_matmul(xq: jax.Array, xs: jax.Array, wq: jax.Array, ws: jax.Array, *, out_dtype: DTypeLike = jnp.float32,
                     blocks: Blocks | None = None, mode: Mode | None = None) -> jax.Array:
    """int8 codes (M, K) × int8 codes (K, N) → int32, then · xs (M, 1) · ws (1, N) → (M, N) in out_dtype. See
    `scaled_matmul`."""
    return scaled_matmul(xq, xs, wq, ws, acc_dtype=jnp.int32, name="w8a8_int8", out_dtype=out_dtype,
                         blocks=blocks, mode=mode)


def select_blocks(M: int, K: int, N: int, *, codes_dtype: DTypeLike, acc_dtype: DTypeLike, name: str,
                  mode: Mode) -> Blocks:
    """Blocks for codes (M, K) @ (K, N): the defaults, the tuning cache, or tuning now."""
    return autotune.choose(
        name, mode, M, K, N, codes_dtype,
        functools.partial(fit_blocks, style=mode.style, M=M, K=K, N=N, k_align=k_align(mode.style), x_bytes=1,
                          w_bytes=1),
        functools.partial(_runner, K=K, N=N, codes_dtype=codes_dtype, acc_dtype=acc_dtype, name=name, mode=mode),
    )


def _runner(*, K: int, N: int, codes_dtype, acc_dtype, name: str, mode: Mode, M: int):
    """For the autotuner: synthetic codes and scales of the real shapes; returns blocks → thunk."""
    key = jax.random.key(0)
    xq = jax.random.randint(key, (M, K), -100, 100, jnp.int32).astype(codes_dtype)
    wq = jax.random.randint(key, (K, N), -100, 100, jnp.int32).astype(codes_dtype)
    xs, ws = jnp.full((M, 1), 0.01, jnp.float32), jnp.full((1, N), 0.01, jnp.float32)

    def run(blocks: Blocks):
        f = jax.jit(functools.partial(scaled_matmul, acc_dtype=acc_dtype, name=name, blocks=blocks, mode=mode))
        return lambda: f(xq, xs, wq, ws)

    return run
