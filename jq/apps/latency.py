"""Measured matmul latency of a quantized weight on the device at hand: the latency model `jq autoquant` allocates
against when the budget is a time (`--budget 2ms`).

A layer's latency under a candidate is the median wall time of x [tokens, K...] · Ŵ through `jq.ops` — the path the
quantized model takes: a Pallas kernel where one runs on this backend, else XLA's dequantize-and-dot fallback —
compiled once, after warm-up. It depends on the shape, dtype and stored format, not on the weights' values, so
autoquant times each (shape, candidate) once. Figures from a CPU describe the CPU fallback, not a GPU kernel: measure
on the device that will serve.
"""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp

from jq import ops
from jq.numbers.qtensor import QTensor

__all__ = ["matmul_seconds"]


def matmul_seconds(w: jax.Array | QTensor, tokens: int, repeats: int = 15, warmup: int = 2) -> float:
    """Median seconds of `tokens` rows times `w` (a float array or QTensor of logical shape [K..., N...], contracted
    over its leading axes: a QTensor's `layout.axes`, else the first one), jitted, inputs in w's dtype.

    Raises ValueError for tokens < 1 or repeats < 1."""
    if int(tokens) < 1 or int(repeats) < 1:
        raise ValueError(f"matmul_seconds: tokens {tokens!r} and repeats {repeats!r} must be positive integers")
    axes = tuple(w.layout.axes) if isinstance(w, QTensor) else (0,)
    k_shape = tuple(w.shape[a] for a in axes)
    dtype = w.dtype if isinstance(w, QTensor) else jnp.result_type(w)
    x = jax.random.normal(jax.random.key(0), (int(tokens), *k_shape), dtype)
    dims = ((tuple(range(1, 1 + len(axes))), axes), ((), ()))
    f = jax.jit(lambda x, w: ops.qdot_general(x, w, dims))
    for _ in range(warmup):
        jax.block_until_ready(f(x, w))
    times = []
    for _ in range(int(repeats)):
        t0 = time.perf_counter()
        jax.block_until_ready(f(x, w))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)
