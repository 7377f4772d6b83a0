"""Pallas kernels in interpret mode against the XLA fallback (dequantize + dot) and a NumPy float64 reference.

Both kernel structures are interpreted — "gpu" (Triton-shaped) and "tpu" (Mosaic-shaped) — so the bodies that
compile on those backends are the ones checked here. Shapes are small and odd (M = 1, 3, 17; K and N that the
blocks do not divide) to exercise padding and multi-step K loops. Plus: act-order / padded groups and feature
dimensions, and that every kernel lowers for CUDA (Triton IR) and TPU (Mosaic) from this CPU machine. Dispatch and
its logged reasons: test_dispatch.py; the autotuner: test_autotune.py; shared helpers: tests/jqtest/kernels.py.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jqtest.kernels import (TOL_FALLBACK, TOL_NUMPY, acts, fallback, kernel_used, np_dequant,
                             quantize, rel_err, run_kernel, weight)

import jq
import jq.pallas_kernels as pk
from jq.pallas_kernels import autotune, common
from jq.pallas_kernels.common import Blocks, Mode


# -- weight-only kernels ----------------------------------------------------------------------------------------

W4_CASES = [  # symmetric, g, M, K, N, dtype, style
    (True, 32, 1, 256, 80, "bfloat16", "gpu"),
    (False, 32, 17, 96, 48, "float32", "tpu"),
    (True, 64, 3, 192, 136, "float32", "gpu"),
    (False, 64, 1, 128, 256, "bfloat16", "tpu"),
    (True, 128, 17, 384, 40, "bfloat16", "tpu"),
    (False, 128, 3, 256, 200, "float32", "gpu"),
    (False, None, 3, 100, 24, "bfloat16", "gpu"),  # per channel, K not a multiple of 8 (packing pads it)
]


@pytest.mark.parametrize("sym,g,M,K,N,dtype,style", W4_CASES)
def test_w4a16(monkeypatch, sym, g, M, K, N, dtype, style):
    q = quantize(weight(K, N), format="int4", symmetric=sym, **({"group_size": g} if g else {}))
    x = acts(M, K, dtype)
    calls = kernel_used(monkeypatch)
    y = run_kernel(x, q, style)
    assert calls and calls[0].startswith("w4a16")
    assert y.shape == (M, N) and y.dtype == jnp.dtype(dtype)
    assert rel_err(y, fallback(x, q)) < TOL_FALLBACK[dtype]
    assert rel_err(y, np.asarray(x.astype(jnp.float32), np.float64) @ np_dequant(q)) < TOL_NUMPY[dtype]


@pytest.mark.parametrize("style", ["gpu", "tpu"])
def test_w4a16_reads_float32_zero_points_exactly(monkeypatch, style):
    """A QA-LoRA merge leaves fractional float32 zeros: the kernel keeps them float32 (rounding them to the scale
    dtype would move every weight of a group by up to 2^-11 of its zero)."""
    q = quantize(weight(256, 64), format="int4", symmetric=False, group_size=64)
    shift = np.random.default_rng(5).normal(size=q.zero.shape).astype(np.float32) * 0.37
    q = dataclasses.replace(q, zero=q.zero.astype(jnp.float32) + shift)
    x = acts(3, 256, "float32")
    calls = kernel_used(monkeypatch)
    y = run_kernel(x, q, style)
    assert calls and calls[0].startswith("w4a16")
    assert rel_err(y, np.asarray(x, np.float64) @ np_dequant(q)) < 1e-5


W8_CASES = [  # scheme, M, K, N, dtype, style
    (dict(format="int8"), 17, 200, 72, "bfloat16", "gpu"),
    (dict(format="int8", symmetric=False, group_size=32), 3, 256, 160, "float32", "tpu"),
    (dict(format="int8", group_size=128), 1, 384, 96, "float32", "gpu"),
    (dict(format="int8", symmetric=False), 1, 64, 40, "bfloat16", "tpu"),
    (dict(format="fp8_e4m3", scale_dtype="float32"), 3, 128, 48, "bfloat16", "gpu"),
]


@pytest.mark.parametrize("scheme,M,K,N,dtype,style", W8_CASES)
def test_w8a16(monkeypatch, scheme, M, K, N, dtype, style):
    q = quantize(weight(K, N), **scheme)
    x = acts(M, K, dtype)
    calls = kernel_used(monkeypatch)
    y = run_kernel(x, q, style)
    assert calls and calls[0].startswith("w8a16")
    assert y.shape == (M, N) and y.dtype == jnp.dtype(dtype)
    assert rel_err(y, fallback(x, q)) < TOL_FALLBACK[dtype]
    assert rel_err(y, np.asarray(x.astype(jnp.float32), np.float64) @ np_dequant(q)) < TOL_NUMPY[dtype]


# -- W8A8 -------------------------------------------------------------------------------------------------------

W8A8_CASES = [  # fmt, granularity, M, K, N, dtype, style
    ("int8", "channel", 17, 160, 96, "bfloat16", "gpu"),
    ("int8", "tensor", 1, 96, 136, "float32", "tpu"),
    ("fp8_e4m3", "tensor", 3, 128, 80, "bfloat16", "gpu"),
    ("fp8_e4m3", "channel", 17, 192, 48, "float32", "tpu"),
]


@pytest.mark.parametrize("fmt,gran,M,K,N,dtype,style", W8A8_CASES)
def test_w8a8(monkeypatch, fmt, gran, M, K, N, dtype, style):
    q = quantize(weight(K, N), format=fmt, granularity=gran, act=fmt, scale_dtype="float32")
    x = acts(M, K, dtype)
    calls = kernel_used(monkeypatch)
    y = run_kernel(x, q, style)
    assert calls == ["w8a8_int8" if fmt == "int8" else "w8a8_fp8"]
    assert y.shape == (M, N) and y.dtype == jnp.dtype(dtype)
    # NumPy: the same per-token activation codes, an exact float64 dot of codes, scales after.
    xq, xs = pk.quantize_rows(x, fmt)
    ref = (np.asarray(xq.astype(jnp.float32), np.float64) @ np_dequant(q)) * np.asarray(xs, np.float64)
    assert rel_err(y, ref) < TOL_NUMPY[dtype]
    # The fallback: exact integer dot for int8 (same numbers); fake-quantized activations rounded to the
    # activation dtype for fp8 (so a looser bound in bf16).
    tol = TOL_FALLBACK[dtype] if fmt == "int8" or dtype == "float32" else 3e-2
    assert rel_err(y, fallback(x, q)) < max(tol, 1e-5 if fmt == "int8" else 1e-4)


def test_quantize_rows_matches_ops():
    x = acts(5, 64, jnp.bfloat16) * 3
    for fmt in ("int8", "fp8_e4m3"):
        a, sa = pk.quantize_rows(x, fmt)
        b, sb = jq.ops.quantize_activations(x, fmt, (1,))
        np.testing.assert_array_equal(np.asarray(a.astype(jnp.float32)), np.asarray(b.astype(jnp.float32)))
        np.testing.assert_array_equal(np.asarray(sa), np.asarray(sb))


# -- direct kernel API: explicit blocks, several K steps, padded N and K ----------------------------------------


@pytest.mark.parametrize("style", ["gpu", "tpu"])
def test_direct_api_padding_and_k_loop(style):
    K, N, M = 512, 100, 5  # N = 100: no power-of-two block divides it (GPU pads N); K walked in 4 steps
    q = quantize(weight(K, N, seed=3), format="int4", symmetric=False, group_size=64)
    x = acts(M, K, jnp.float32)
    blocks = Blocks(16, 64, 128) if style == "gpu" else Blocks(32, 128, 256)
    f = jax.jit(lambda x, c, s, z: pk.w4a16_matmul(x, c, s, z, group_size=64, blocks=blocks, mode=Mode(style, True)))
    y = f(x, q.codes, q.scale, q.zero)
    assert rel_err(y, np.asarray(x, np.float64) @ np_dequant(q)) < TOL_NUMPY["float32"]
    fit = common.fit_blocks(blocks, style, M, K, N, pk.w4a16.k_align(style, 64))
    assert fit.nk >= 2 and fit.Mp % fit.blocks.bm == 0 and fit.Np >= N


def test_act_order_padded_groups_and_feature_dims(monkeypatch):
    K, N = 160, 48
    w = weight(K, N, seed=4)
    perm = jnp.asarray(np.random.default_rng(5).permutation(K), jnp.int32)
    stored = quantize(w[perm], format="int4", symmetric=False, group_size=32)
    q_perm = dataclasses.replace(stored, perm=perm)  # act-order: codes hold W[perm]
    q_pad = quantize(w, format="int4", group_size=64, pad=True)  # 160 = 2.5 groups: stored padded to 192
    q_feat = quantize(weight(K, 4, 12, seed=6), format="int8", symmetric=False, group_size=32)  # (K, 4, 12)
    x = acts(3, K, jnp.float32)
    calls = kernel_used(monkeypatch)
    for q in (q_perm, q_pad, q_feat):
        y = run_kernel(x, q, "gpu")
        ref = np.asarray(x, np.float64) @ np_dequant(q)
        assert y.shape == (3,) + q.shape[1:]
        assert rel_err(y.reshape(3, -1), ref) < TOL_NUMPY["float32"]
        assert rel_err(y, fallback(x, q)) < TOL_FALLBACK["float32"]
    assert len(calls) == 3


# -- lowering for the real backends (no accelerator needed) -----------------------------------------------------


def _lowering_cases():
    K, N = 512, 256
    w4 = jax.ShapeDtypeStruct((K // 2, N), jnp.uint8)
    s = jax.ShapeDtypeStruct((K // 128, N), jnp.float16)
    i8 = jax.ShapeDtypeStruct((K, N), jnp.int8)
    f8 = jax.ShapeDtypeStruct((K, N), jnp.float8_e4m3fn)
    x = jax.ShapeDtypeStruct((16, K), jnp.bfloat16)
    xi = jax.ShapeDtypeStruct((16, K), jnp.int8)
    xf = jax.ShapeDtypeStruct((16, K), jnp.float8_e4m3fn)
    xs = jax.ShapeDtypeStruct((16, 1), jnp.float32)
    ws = jax.ShapeDtypeStruct((1, N), jnp.float32)
    return {
        "w4a16": (lambda m, b: lambda x, w, s, z: pk.w4a16_matmul(x, w, s, z, group_size=128, blocks=b, mode=m),
                  (x, w4, s, s)),
        "w8a16": (lambda m, b: lambda x, w, s: pk.w8a16_matmul(x, w, s, group_size=128, blocks=b, mode=m),
                  (x, i8, s)),
        "w8a8_int8": (lambda m, b: lambda *a: pk.w8a8_int8_matmul(*a, blocks=b, mode=m), (xi, xs, i8, ws)),
        "w8a8_fp8": (lambda m, b: lambda *a: pk.fp8_matmul(*a, blocks=b, mode=m), (xf, xs, f8, ws)),
    }


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_kernels_lower_for_accelerators(platform):
    """Pallas → Triton IR / Mosaic lowering runs here; only the backend compilers (ptxas, libtpu) are missing."""
    style = "gpu" if platform == "cuda" else "tpu"
    mode = Mode(style)
    blocks = autotune.default_blocks(style, 16)
    for name, (make, args) in _lowering_cases().items():
        if style == "tpu" and name == "w8a8_fp8":
            continue  # not enabled on TPU
        try:
            text = jax.jit(make(mode, blocks)).trace(*args).lower(lowering_platforms=(platform,)).as_text()
        except Exception as e:  # a jaxlib built without that backend's dialects
            if "Unsupported" in str(e) and "platform" in str(e):
                pytest.skip(f"{platform} lowering not available: {e}")
            raise
        assert ("__gpu$xla.gpu.triton" in text or "triton" in text) if style == "gpu" else "tpu_custom_call" in text
