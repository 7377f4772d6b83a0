"""The Pallas kernel tests' shared pieces: tolerances per dtype, small random weights and activations, the int
QTensor decoded by NumPy alone, the XLA fallback and the interpreted kernel through `jq.ops.qdot`, and spies on what
ran (tests/pallas_kernels: test_kernels, test_dispatch, test_autotune, test_lut)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import jq
import jq.pallas_kernels as pk
from jq.pallas_kernels import common

__all__ = ["TOL_FALLBACK", "TOL_NUMPY", "quantize", "normal", "weight", "acts", "np_dequant", "fallback", "rel_err",
           "run_kernel", "kernel_used", "fallback_messages"]

TOL_FALLBACK = {"float32": 2e-5, "bfloat16": 1.6e-2}  # max |kernel − fallback| / max |fallback|
TOL_NUMPY = {"float32": 2e-5, "bfloat16": 2.5e-2}  # max |kernel − float64 reference| / max |reference|


def quantize(w, **scheme):
    cfg = jq.QuantConfig.simple(jq.Scheme(**scheme))
    return jax.jit(lambda w: jq.quantize_params({"l": {"kernel": w}}, cfg)["l"]["kernel"])(w)


# Every call here and in the tests jits a fresh lambda: jit caches by function, and the kernel mode is read
# when tracing, so a shared function would silently reuse a trace made under another mode. One jit also
# compiles much faster in interpret mode than op-by-op execution.


def normal(shape, seed) -> np.ndarray:  # NumPy, not jax.random: no compilation per shape
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def weight(K, N, *features, seed=0):
    return jnp.asarray(normal((K, N, *features), seed) * 0.05)


def acts(M, K, dtype, seed=1):
    return jnp.asarray(normal((M, K), seed), dtype)


def np_dequant(q) -> np.ndarray:
    """A QTensor of shape (K, *features) → float64 (K, N), decoded with NumPy only (independent of
    jq.numbers.formats)."""
    lay = q.layout
    K, Ks = lay.shape[0], lay.stored_shape[0]
    c = np.asarray(q.codes)
    c = c.reshape(c.shape[0], -1)
    if q.fmt == "int4":
        lo, hi = (c & 15).astype(np.int64), (c >> 4).astype(np.int64)
        codes = np.empty((2 * c.shape[0], c.shape[1]), np.int64)
        codes[0::2], codes[1::2] = lo, hi
        codes = codes[:Ks]
        if q.symmetric:
            codes = np.where(codes >= 8, codes - 16, codes)
        v = codes.astype(np.float64)
    else:
        v = c.astype(np.float32).astype(np.float64)  # int8 / uint8 / float8 codes are exact in float32
    N = v.shape[1]
    s = np.asarray(q.scale.astype(jnp.float32), np.float64).reshape(-1, N if lay.granularity != "tensor" else 1)
    z = 0.0 if q.zero is None else np.asarray(q.zero.astype(jnp.float32), np.float64).reshape(s.shape)
    if lay.granularity == "group":
        s, z = np.repeat(s, lay.group_size, 0), (np.repeat(z, lay.group_size, 0) if q.zero is not None else 0.0)
    w = (v - z) * s
    if q.perm is not None:
        out = np.empty_like(w)
        out[np.asarray(q.perm)] = w
        w = out
    return w[:K]


def fallback(x, q):
    """The XLA path of jq.ops (kernels are never taken on CPU unless forced)."""
    assert common.kernel_mode()[0] is None
    return jax.jit(lambda x, q: jq.ops.qdot(x, q))(x, q)


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def run_kernel(x, q, style):
    with pk.force_interpret(style):
        return jax.jit(lambda x, q: jq.ops.qdot(x, q))(x, q)


def kernel_used(monkeypatch) -> list[str]:
    """Count the Pallas calls made through the driver."""
    from jq.pallas_kernels import driver

    calls = []
    real = driver.tiled_matmul

    def spy(*a, **kw):
        calls.append(kw["name"])
        return real(*a, **kw)

    for mod in ("w4a16", "w8a16", "w8a8"):
        monkeypatch.setattr(f"jq.pallas_kernels.{mod}.tiled_matmul", spy)
    return calls


def fallback_messages(caplog) -> list[str]:
    """The `jq.ops` log lines saying a call fell back to XLA (and why)."""
    return [r.getMessage() for r in caplog.records if r.name == "jq.ops" and "falls back" in r.getMessage()]
