"""W8A8 fp8: e4m3 activations × e4m3 weights with f32 accumulation, scales in the epilogue.

Activations are quantized outside the kernel per token (`w8a8.quantize_rows(x, "fp8_e4m3")`: scale =
absmax / 448, codes = x / scale rounded to e4m3) or per tensor (any (1, 1) scale). Weights are jq's fp8_e4m3
codes (K, N) — stored as the float8 dtype itself — with a per-tensor (1, 1) or per-channel (1, N) scale.

Tile (one K step): x codes (bm, bk) and weight codes (bk, bn), both float8_e4m3fn, one fp8 dot into f32 (Hopper
tensor cores; Triton needs compute capability >= 8.9). Epilogue: acc · x_scale[m] · w_scale[n]. Same skeleton
as the int8 kernel (`w8a8.scaled_matmul`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.typing import DTypeLike

from jq.pallas_kernels.common import Blocks, Mode
from jq.pallas_kernels.w8a8 import scaled_matmul

__all__ = ["fp8_matmul"]


def fp8_matmul(xq: jax.Array, xs: jax.Array, wq: jax.Array, ws: jax.Array, *, out_dtype: DTypeLike = jnp.float32,
               blocks: Blocks | None = None, mode: Mode | None = None) -> jax.Array:
    """e4m3 codes (M, K) × e4m3 codes (K, N) → f32, then · xs (M, 1) or (1, 1) · ws (1, N) or (1, 1) → (M, N) in
    out_dtype."""
    if xq.dtype != jnp.float8_e4m3fn or wq.dtype != jnp.float8_e4m3fn:
        raise ValueError(f"fp8_matmul takes float8_e4m3fn codes, got {xq.dtype} and {wq.dtype}")
    return scaled_matmul(xq, xs, wq, ws, acc_dtype=jnp.float32, name="w8a8_fp8", out_dtype=out_dtype,
                         blocks=blocks, mode=mode)
