"""Pallas kernels in interpret mode against the XLA fallback (dequantize + dot) and a NumPy float64 reference.

Both kernel structures are interpreted — "gpu" (Triton-shaped) and "tpu" (Mosaic-shaped) — so the bodies that
compile on those backends are the ones checked here. Shapes are small and odd (M = 1, 3, 17; K and N that the
blocks do not divide) to exercise padding and multi-step K loops. Plus: dispatch rules and their logged reasons,
that CPU never takes the kernels unless forced, act-order / padded groups, gradients, the autotuner's cache, and
that every kernel lowers for CUDA (Triton IR) and TPU (Mosaic) from this CPU machine.
"""

from __future__ import annotations

import dataclasses
import json
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jq
import jq.pallas_kernels as pk
from jq.pallas_kernels import autotune, common, dispatch
from jq.pallas_kernels.common import Blocks, Mode

TOL_FALLBACK = {"float32": 2e-5, "bfloat16": 1.6e-2}  # max |kernel − fallback| / max |fallback|
TOL_NUMPY = {"float32": 2e-5, "bfloat16": 2.5e-2}  # max |kernel − float64 reference| / max |reference|


def quantize(w, **scheme):
    cfg = jq.QuantConfig.simple(jq.Scheme(**scheme))
    return jax.jit(lambda w: jq.quantize_params({"l": {"kernel": w}}, cfg)["l"]["kernel"])(w)


# Every call below jits a fresh lambda: jit caches by function, and the kernel mode is read when tracing, so a
# shared function would silently reuse a trace made under another mode. One jit also compiles much faster in
# interpret mode than op-by-op execution.


def normal(shape, seed) -> np.ndarray:  # NumPy, not jax.random: no compilation per shape
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def weight(K, N, *features, seed=0):
    return jnp.asarray(normal((K, N, *features), seed) * 0.05)


def acts(M, K, dtype, seed=1):
    return jnp.asarray(normal((M, K), seed), dtype)


def np_dequant(q) -> np.ndarray:
    """A QTensor of shape (K, *features) → float64 (K, N), decoded with NumPy only (independent of jq.numbers.formats)."""
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


def kernel_used(monkeypatch):
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
    import dataclasses

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


# -- dispatch ---------------------------------------------------------------------------------------------------


def _fallback_messages(caplog):
    return [r.getMessage() for r in caplog.records if r.name == "jq.ops" and "falls back" in r.getMessage()]


def test_cpu_does_not_take_kernels_unless_forced(monkeypatch, caplog):
    q = quantize(weight(64, 32), format="int4", group_size=32)
    x = acts(2, 64, jnp.float32)
    calls = kernel_used(monkeypatch)
    with caplog.at_level(logging.DEBUG, logger="jq.ops"):
        y0 = jax.jit(lambda x, q: jq.ops.qdot(x, q))(x, q)
        assert calls == []
        assert any("only run interpreted" in m for m in _fallback_messages(caplog))
        caplog.clear()
        monkeypatch.setenv("JQ_KERNELS", "interpret")
        y1 = jax.jit(lambda x, q: jq.ops.qdot(x, q))(x, q)
        assert calls == ["w4a16_sym_g32"] and not _fallback_messages(caplog)
        monkeypatch.setenv("JQ_KERNELS", "off")
        with pk.force_interpret("tpu"):  # force_interpret wins over the environment
            assert common.kernel_mode() == (Mode("tpu", True), None)
        jax.jit(lambda x, q: jq.ops.qdot(x, q))(x, q)
        assert len(calls) == 1 and any("disabled by JQ_KERNELS=off" in m for m in _fallback_messages(caplog))
    assert rel_err(y1, y0) < TOL_FALLBACK["float32"]
    assert common.kernel_mode()[0] is None


FALLBACKS = [  # (what, rhs builder, lhs shape, dimension numbers, reason fragment)
    ("int3", lambda: quantize(weight(64, 32), format="int3", group_size=32), (2, 64),
     (((1,), (0,)), ((), ())), "format int3 is not int4"),
    ("w8a8 groups", lambda: quantize(weight(64, 32), format="int8", group_size=32, act="int8"), (2, 64),
     (((1,), (0,)), ((), ())), "group scales"),
    ("flat groups", lambda: quantize(weight(64, 32), format="int4", group_size=32, flat_groups=True), (2, 64),
     (((1,), (0,)), ((), ())), "flat groups"),
    ("a padded N-D kernel", lambda: jax.jit(lambda w: jq.Scheme(format="int4", group_size=8, pad=True).make_qtensor(
        *_grouped(w, jq.Scheme(format="int4", group_size=8, pad=True), (0, 1))))(weight(4, 12, 16)), (2, 4, 12),
     (((1, 2), (0, 1)), ((), ())), "kernels take axis 0 only"),
    ("batch dims", lambda: quantize(weight(3, 64, 32), format="int4", group_size=32, axes=(1,)), (3, 2, 64),
     (((2,), (1,)), ((0,), (0,))), "batch dimensions"),
]


def _grouped(w, scheme, axes):
    """Quantize w by hand (RTN, min-max) with `axes` as contraction axes; returns make_qtensor's arguments."""
    lay = scheme.layout(w.shape, axes)
    xg = lay.to_grouped(w)
    lo = jnp.min(xg, axis=lay.reduce_axes, keepdims=True)
    hi = jnp.max(xg, axis=lay.reduce_axes, keepdims=True)
    s, z = scheme.grid.scale_zero(lo, hi)
    return scheme.grid.encode(xg, s, z), s, z, lay, jnp.float32


@pytest.mark.parametrize("what,build,lhs_shape,dn,reason", FALLBACKS, ids=[f[0] for f in FALLBACKS])
def test_unsupported_falls_back_with_reason(monkeypatch, caplog, what, build, lhs_shape, dn, reason):
    q = build()
    x = jnp.asarray(normal(lhs_shape, 7))
    calls = kernel_used(monkeypatch)
    with caplog.at_level(logging.DEBUG, logger="jq.ops"), pk.force_interpret():
        y = jax.jit(lambda x, q: jq.ops.qdot_general(x, q, dn))(x, q)
    assert calls == []
    msgs = _fallback_messages(caplog) + [r.getMessage() for r in caplog.records if "W8A8" in r.getMessage()]
    assert any(reason in m for m in msgs) or (what == "w8a8 groups"), msgs
    if what == "w8a8 groups":  # not the XLA int path either (it takes per-channel only): the generic fallback
        assert any(reason in m for m in _fallback_messages(caplog)), msgs
    if q.policy.act is None:
        ref = jax.jit(lambda x, q: jax.lax.dot_general(x, q.dequantize(jnp.float32), dn))(x, q)
        assert rel_err(y, ref) < 1e-5


def test_dense_general_and_einsum_weights_reach_the_kernels_as_matrices(monkeypatch, caplog):
    """A kernel [heads, head_dim, out] contracting (0, 1), called by dot_general or by a model's einsum, runs on the
    2-D kernel through its matrix view (`jq.ops.matrix_view`): same result as the fallback, no fallback logged."""
    q = jax.jit(lambda w: jq.Scheme(format="int4", group_size=16).make_qtensor(
        *_grouped(w, jq.Scheme(format="int4", group_size=16), (0, 1))))(weight(4, 32, 16))
    x = jnp.asarray(normal((2, 3, 4, 32), 7))
    calls = kernel_used(monkeypatch)
    with caplog.at_level(logging.DEBUG, logger="jq.ops"), pk.force_interpret():
        y = jax.jit(lambda x, q: jq.ops.qeinsum("bthd,hdn->btn", x, q))(x, q)
    assert calls == ["w4a16_sym_g16"] and not _fallback_messages(caplog)
    assert rel_err(y, jnp.einsum("bthd,hdn->btn", x, q.dequantize(jnp.float32))) < TOL_FALLBACK["float32"]


@pytest.mark.parametrize("subscripts,w_shape,axis", [("btd,ndh->btnh", (4, 32, 16), 1),  # a Gemma-style q_einsum
                                                      ("btk,nk->btn", (16, 32), 1)])       # a torch-layout [N, K]
def test_weights_contracting_a_later_axis_reach_the_kernels_transposed(monkeypatch, caplog, subscripts, w_shape,
                                                                        axis):
    """Contraction axes that do not lead: the stored arrays are transposed (`jq.ops.matrix_view.leading`) and the 2-D
    kernel runs — same result as the fallback, no fallback logged."""
    s = jq.Scheme(format="int4", group_size=16)
    q = jax.jit(lambda w: s.make_qtensor(*_grouped(w, s, (axis,))))(weight(*w_shape))
    x = jnp.asarray(normal((2, 3, 32), 7))
    calls = kernel_used(monkeypatch)
    with caplog.at_level(logging.DEBUG, logger="jq.ops"), pk.force_interpret():
        y = jax.jit(lambda x, q: jq.ops.qeinsum(subscripts, x, q))(x, q)
    assert calls == ["w4a16_sym_g16"] and not _fallback_messages(caplog)
    assert rel_err(y, jnp.einsum(subscripts, x, q.dequantize(jnp.float32))) < TOL_FALLBACK["float32"]


def test_user_kernels_keep_priority_and_registration_is_idempotent():
    """Built-in kernels sit behind kernels registered with jq.ops.register_kernel, and come back after a reset."""
    before = list(jq.ops.KERNELS)
    try:
        jq.ops.register_kernel("user", lambda *a: "never", None)
        dispatch.register()
        names = [k.name for k in jq.ops.KERNELS]
        assert names[0] == "user" and names[-len(dispatch.KERNEL_NAMES):] == list(dispatch.KERNEL_NAMES)
        assert len(names) == len(set(names))
        jq.ops.KERNELS[:] = []
        with pk.force_interpret():
            assert [k.name for k in jq.ops.KERNELS] == list(dispatch.KERNEL_NAMES)
    finally:
        jq.ops.KERNELS[:] = before


def test_kernel_that_does_not_build_falls_back(monkeypatch, caplog):
    """On a device, block selection compiles the kernel first; if nothing builds, dispatch falls back."""

    def no_blocks(*a, **kw):
        raise autotune.NoBlocks("no block configuration of w4a16 ran (triton: out of resources)")

    monkeypatch.setattr(pk.w4a16, "select_blocks", no_blocks)
    q = quantize(weight(64, 32), format="int4", group_size=32)
    x = acts(2, 64, jnp.float32)
    with caplog.at_level(logging.DEBUG, logger="jq.ops"), pk.force_interpret():
        y = jax.jit(lambda x, q: jq.ops.qdot(x, q))(x, q)
    assert any("pallas_w4a16: no block configuration" in m for m in _fallback_messages(caplog))
    assert rel_err(y, np.asarray(x, np.float64) @ np_dequant(q)) < TOL_NUMPY["float32"]


def test_gradient_through_kernel_matches_fallback():
    q = quantize(weight(128, 64), format="int4", symmetric=False, group_size=32)
    x = acts(3, 128, jnp.float32)
    loss = lambda x: jnp.sum(jnp.sin(jq.ops.qdot(x, q)))
    g_ref = jax.jit(jax.grad(loss))(x)
    with pk.force_interpret():
        g = jax.jit(jax.grad(lambda x: loss(x)))(x)
    assert rel_err(g, g_ref) < 1e-5


# -- autotune -----------------------------------------------------------------------------------------------------


def test_autotune_defaults_without_tuning(monkeypatch, tmp_path):
    def never(**kw):
        raise AssertionError("interpret mode must not compile anything")

    fit_gpu = lambda b: common.fit_blocks(b, "gpu", 7, 256, 256, 32)
    fit_tpu = lambda b: common.fit_blocks(b, "tpu", 700, 256, 256, 256)
    assert autotune.choose("k", Mode("gpu", True), 7, 256, 256, jnp.bfloat16, fit_gpu, never) == \
        autotune.default_blocks("gpu", 7)
    # JQ_AUTOTUNE=0 on a device: the defaults, after one compile-and-run check; nothing written to disk.
    monkeypatch.setenv("JQ_AUTOTUNE", "0")
    ran = []

    def probe(M):
        return lambda b: (lambda: ran.append(b))

    assert autotune.choose("k", Mode("tpu"), 700, 256, 256, jnp.bfloat16, fit_tpu, probe) == \
        autotune.default_blocks("tpu", 700)
    assert len(ran) == 1 and not (tmp_path / "autotune.json").exists()

    def broken(M):
        def run(b):
            raise RuntimeError("Mosaic failed to compile")
        return run

    with pytest.raises(autotune.NoBlocks, match="Mosaic failed"):
        autotune.choose("k2", Mode("tpu"), 700, 256, 256, jnp.bfloat16, fit_tpu, broken)


def test_autotune_picks_fastest_and_caches(monkeypatch, tmp_path):
    monkeypatch.setenv("JQ_AUTOTUNE_CACHE", str(tmp_path / "tune" / "cache.json"))
    built = []

    def make_runner(M):
        built.append(M)
        return lambda b: (lambda: b)

    def timer(thunk):
        b = thunk()
        if b.bn == 128:
            raise RuntimeError("out of shared memory")  # failing candidates are skipped
        return 1.0 / b.bn + b.bk * 1e-6

    mode = Mode("gpu")
    fit = lambda b: common.fit_blocks(b, "gpu", 5, 4096, 4096, 32, 2, 0.5)
    best = autotune.choose("w4a16_test", mode, 5, 4096, 4096, jnp.bfloat16, fit, make_runner, timer=timer)
    assert best.bn == 64 and best.bm == 16 and built == [5]
    data = json.loads((tmp_path / "tune" / "cache.json").read_text())
    (key,) = data
    assert key.endswith("|w4a16_test|m16|k4096|n4096|bfloat16") and data[key]["bn"] == 64
    autotune._MEMO.clear()  # a new process: read back from disk, no tuning
    assert autotune.choose("w4a16_test", mode, 6, 4096, 4096, jnp.bfloat16, fit, make_runner, timer=timer) == best
    assert built == [5]

    def all_fail(thunk):
        raise RuntimeError("no")

    with pytest.raises(autotune.NoBlocks):
        autotune.choose("w4a16_bad", mode, 5, 4096, 4096, jnp.bfloat16, fit, make_runner, timer=all_fail)


def test_fit_blocks_rules():
    f = common.fit_blocks(Blocks(16, 64, 256), "gpu", 1, 11008, 4096, 128)
    assert (f.blocks.bm, f.blocks.bn, f.blocks.bk, f.Mp, f.Kp, f.Np) == (16, 64, 256, 16, 11008, 4096)
    f = common.fit_blocks(Blocks(32, 512, 512), "tpu", 3, 11008, 14336, 256)
    assert f.blocks.bm == 32 and f.blocks.bn == 512 and 11008 % f.blocks.bk == 0 and f.blocks.bk % 256 == 0
    f = common.fit_blocks(Blocks(32, 512, 512), "tpu", 3, 96, 80, 128)  # small dims: one whole-dim block
    assert (f.blocks.bk, f.blocks.bn, f.Kp, f.Np) == (96, 80, 96, 80)
    # Shared memory: f32 activations with 128x128x128 tiles and 3 stages would need ~270 KiB on sm_90.
    f = common.fit_blocks(Blocks(128, 128, 64, 4, 3), "gpu", 256, 4096, 4096, 128, 4, 0.5)
    assert common.gpu_smem_estimate(f.blocks, 4, 0.5) <= common.GPU_SMEM_BUDGET and f.blocks.bk == 128


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
