"""The LUT kernel (`jq.pallas_kernels.lut`: learned-codebook weights, lookup and scale fused into the matmul tile) in
interpret mode, both kernel structures ("gpu": gather from the table; "tpu": select over the entries), against the
XLA fallback (dequantize + dot) and a NumPy float64 lookup: scalar and vector formats, channel / group / tensor
scales, tables per scale position or shared by all columns (GPTVQ), several K steps, padded N, act-order and padded
groups; that `jq.ops.qdot_general` reaches the kernel; and that what it refuses falls back with its reason.
"""

from __future__ import annotations

import dataclasses
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jqtest.kernels import TOL_FALLBACK, TOL_NUMPY, acts, fallback, fallback_messages, rel_err, run_kernel

import jq
import jq.pallas_kernels as pk
from jq.algorithms.gptvq import gptvq
from jq.algorithms.kmeans import kmeans
from jq.algorithms.stats import LayerStats
from jq.numbers import formats
from jq.numbers.codebook import stored_codebook_qtensor
from jq.numbers.qtensor import ExecPolicy, Layout
from jq.pallas_kernels import common, lut
from jq.pallas_kernels.common import Blocks, Mode


def rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def codebook_q(fmt: str, K: int, N: int, g: int | None, tables: str, seed: int = 0, gran: str | None = None,
               padded: int | None = None):
    """A random codebook QTensor [K, N]; tables "position" (one per scale position), "shared" ([G, 1]) or "one"."""
    f = formats.get_format(fmt)
    lay = Layout((K, N), (0,), gran or ("group" if g else "channel"), g, padded)
    ss, Ks = lay.scale_shape, lay.stored_shape[0]
    tshape = {"position": ss, "shared": (ss[0], 1), "one": (1, 1)}[tables]
    r = rng(seed)
    idx = r.integers(0, 2**f.bits, (Ks // f.vec, N))
    cb = r.uniform(-1, 1, tshape + (2**f.bits, f.vec))
    s = r.uniform(0.01, 0.05, ss)
    return stored_codebook_qtensor(jnp.asarray(idx), jnp.asarray(cb), jnp.asarray(s), lay, fmt, jnp.float32)


def np_dequant(q) -> np.ndarray:
    """W [K, N] in float64 from the stored arrays, by NumPy (independent of `QTensor._lookup`)."""
    lay, f = q.layout, q.format
    Ks, N = lay.stored_shape
    d = f.vec
    idx = np.asarray(q.unpacked_codes(), np.int64)  # [Ks/d, N]
    cb = np.asarray(q.codebook, np.float64)  # [Gt, Nt, E, d]
    s = np.asarray(q.scale, np.float64)
    G = s.shape[0]
    rows = Ks // G  # rows per scale row
    k = np.arange(Ks)[:, None]
    n = np.arange(N)[None, :]
    g = k // rows
    tg, tn = g // (G // cb.shape[0]), n // (N // cb.shape[1]) if cb.shape[1] > 1 else 0 * n
    w = cb[tg, tn, idx[k // d, n], k % d] * s[g, n if s.shape[1] > 1 else 0 * n]
    if q.perm is not None:
        out = np.empty_like(w)
        out[np.asarray(q.perm)] = w[: lay.shape[0]]
        return out
    return w[: lay.shape[0]]


@pytest.fixture
def calls(monkeypatch):
    """Which LUT grid skeletons ran ("gpu" / "tpu"), by spying on the module's pallas_call builders."""
    seen = []
    for style in ("gpu", "tpu"):
        real = getattr(lut, f"_{style}_call")

        def spy(*a, _real=real, _style=style, **kw):
            seen.append(_style)
            return _real(*a, **kw)

        monkeypatch.setattr(lut, f"_{style}_call", spy)
    return seen


def check(x, q, y, dtype):
    assert y.shape == (x.shape[0], q.shape[1]) and y.dtype == jnp.dtype(dtype)
    assert rel_err(y, fallback(x, q)) < TOL_FALLBACK[dtype]
    assert rel_err(y, np.asarray(x.astype(jnp.float32), np.float64) @ np_dequant(q)) < TOL_NUMPY[dtype]


CASES = [  # fmt, g, tables, M, K, N, dtype, style
    ("cb3", None, "position", 3, 96, 40, "float32", "gpu"),  # per channel, K walked in 3 steps of 32
    ("cb3", 64, "shared", 17, 128, 24, "bfloat16", "tpu"),
    ("cb4", 32, "shared", 17, 128, 48, "bfloat16", "gpu"),
    ("cb4", 32, "position", 2, 64, 136, "float32", "tpu"),
    ("cb8", 64, "position", 1, 128, 24, "float32", "tpu"),  # 256 entries per table
    ("cb8", 32, "shared", 3, 128, 40, "bfloat16", "gpu"),
    ("cb4x2", 32, "position", 3, 128, 136, "bfloat16", "tpu"),
    ("cb4x2", None, "one", 5, 64, 32, "float32", "gpu"),  # one table for the whole tensor, per-channel scales
    ("cb6x2", 32, "shared", 3, 256, 72, "bfloat16", "gpu"),
    ("cb6x2", 64, "shared", 1, 128, 48, "float32", "tpu"),
    ("cb8x4", 64, "shared", 5, 256, 32, "float32", "gpu"),
    ("cb4x4", 64, "shared", 2, 128, 40, "bfloat16", "tpu"),  # (cb8x4 is left to XLA on a compiled TPU)
]


@pytest.mark.parametrize("fmt,g,tables,M,K,N,dtype,style", CASES)
def test_lut_matches_fallback(calls, fmt, g, tables, M, K, N, dtype, style):
    q = codebook_q(fmt, K, N, g, tables, seed=K + N)
    x = acts(M, K, dtype)
    y = run_kernel(x, q, style)
    assert calls == [style]
    check(x, q, y, dtype)


@pytest.mark.parametrize("style", ["gpu", "tpu"])
def test_direct_api_k_steps_padded_n_and_tensor_scales(style):
    """Explicit small blocks: several K steps with several groups (and per-group tables) in each, N no block divides;
    and a tensor-granularity weight (one scale, one table)."""
    K, N, M = 512, 100, 5
    q = codebook_q("cb4x2", K, N, 32, "position", seed=3)
    x = acts(M, K, jnp.float32)
    blocks = Blocks(16, 32, 128) if style == "gpu" else Blocks(32, 128, 256)
    mode = Mode(style, True)
    y = jax.jit(lambda x, q: pk.lut_matmul(x, q, blocks=blocks, mode=mode))(x, q)
    assert rel_err(y, np.asarray(x, np.float64) @ np_dequant(q)) < TOL_NUMPY["float32"]
    plan = lut.fit(blocks, style, M, K, N, 32, 2, jnp.float32)
    assert plan.nk >= 2 and plan.blocks.bk // 32 >= 4
    qt = codebook_q("cb3", 64, 48, None, "one", seed=4, gran="tensor")
    xt = acts(3, 64, jnp.bfloat16)
    yt = jax.jit(lambda x, q: pk.lut_matmul(x, q, mode=mode))(xt, qt)
    assert rel_err(yt, np.asarray(xt.astype(jnp.float32), np.float64) @ np_dequant(qt)) < TOL_NUMPY["bfloat16"]


def test_fitted_codebooks_act_order_and_padded_groups(calls):
    """QTensors the algorithms make (GPTVQ with act-order: shared tables and `perm`; k-means: a table per group and
    channel), and a padded group axis (x zero-padded to the stored length)."""
    K, N = 64, 24
    r = rng(5)
    w = jnp.asarray(r.standard_normal((K, N)).astype(np.float32) * 0.05)
    xs = jnp.asarray(r.standard_normal((256, K)).astype(np.float32))
    stats = LayerStats(hessian=xs.T @ xs / xs.shape[0])
    s_vq = jq.Scheme(format="cb4x2", group_size=32)
    q_vq = jax.jit(lambda w: gptvq(w, s_vq, s_vq.layout((K, N), (0,)), stats, iters=3, update_iters=2,
                                   act_order=True))(w)
    s_km = jq.Scheme(format="cb3", group_size=32)
    q_km = jax.jit(lambda w: kmeans(w, s_km, s_km.layout((K, N), (0,)), iters=3))(w)
    q_pad = codebook_q("cb4", 80, N, 32, "shared", seed=6, padded=96)
    assert q_vq.perm is not None and q_vq.codebook.shape == (2, 1, 16, 2) and q_km.codebook.shape == (2, N, 8, 1)
    for q, style in ((q_vq, "gpu"), (q_km, "tpu"), (q_pad, "gpu")):
        x = acts(3, q.shape[0], jnp.float32)
        check(x, q, run_kernel(x, q, style), "float32")
    assert calls == ["gpu", "tpu", "gpu"]


def test_qdot_general_dispatch_and_gradient(calls, caplog):
    """A batched x [B, T, K] through `jq.ops.qdot_general` reaches the kernel (no fallback logged); gradients with
    respect to x are the fallback's."""
    q = codebook_q("cb6x2", 128, 48, 64, "shared", seed=7)
    x = jnp.asarray(rng(8).standard_normal((2, 3, 128)).astype(np.float32))
    dn = (((2,), (0,)), ((), ()))
    ref = jax.jit(lambda x, q: jq.ops.qdot_general(x, q, dn))(x, q)
    assert calls == []  # CPU, not forced: the XLA fallback
    with caplog.at_level(logging.DEBUG, logger="jq.ops"), pk.force_interpret():
        assert pk.dispatch.supports_lut(x, q, dn) is None
        y = jax.jit(lambda x, q: jq.ops.qdot_general(x, q, dn))(x, q)
        assert not fallback_messages(caplog)
        loss = lambda x: jnp.sum(jnp.sin(jq.ops.qdot_general(x, q, dn)))
        g = jax.jit(jax.grad(loss))(x)
    assert calls == ["gpu", "gpu"] and y.shape == (2, 3, 48)
    assert rel_err(y, ref) < TOL_FALLBACK["float32"]
    assert rel_err(g, jax.jit(jax.grad(loss))(x)) < 1e-5


def _three_d():
    lay = Layout((32, 4, 6), (0,), "channel")
    idx = rng(9).integers(0, 16, (32, 4, 6))
    cb = rng(10).uniform(-1, 1, (1, 4, 6, 16, 1))
    return stored_codebook_qtensor(jnp.asarray(idx), jnp.asarray(cb), jnp.full((1, 4, 6), 0.02), lay, "cb4",
                                   jnp.float32)


REFUSALS = [  # what, rhs builder, lhs shape, style, reason fragment
    ("group 48 on GPU", lambda: codebook_q("cb4x2", 96, 32, 48, "shared"), (2, 96), "gpu",
     "group size 48 is not a power of two"),
    ("act int8", lambda: dataclasses.replace(codebook_q("cb4", 64, 32, 32, "shared"), policy=ExecPolicy(act="int8")),
     (2, 64), "gpu", "activations quantized to int8"),
    ("group 40 on TPU", lambda: codebook_q("cb4x2", 80, 32, 40, "shared"), (2, 80), "tpu",
     "group size 40 is not a multiple of 16"),
]


@pytest.mark.parametrize("what,build,lhs_shape,style,reason", REFUSALS, ids=[r[0] for r in REFUSALS])
def test_refusals_fall_back_with_reason(calls, caplog, what, build, lhs_shape, style, reason):
    q = build()
    x = jnp.asarray(rng(11).standard_normal(lhs_shape).astype(np.float32))
    dn = (((1,), (0,)), ((), ()))
    with caplog.at_level(logging.DEBUG, logger="jq.ops"), pk.force_interpret(style):
        y = jax.jit(lambda x, q: jq.ops.qdot_general(x, q, dn))(x, q)
    assert calls == []
    assert any(f"pallas_lut: {reason}" in m for m in fallback_messages(caplog)), fallback_messages(caplog)
    if q.policy.act is None:
        ref = jax.jit(lambda x, q: jax.lax.dot_general(x, q.dequantize(jnp.float32), dn))(x, q)
        assert rel_err(y, ref) < 1e-5


def test_a_3d_weight_runs_as_its_matrix(calls):
    """A codebook weight [32, 4, 6] contracting axis 0 (tables per channel) reaches the kernel as the [32, 24] matrix
    its bytes are (`jq.ops.matrix_view`), with the fallback's result."""
    q = _three_d()
    x = jnp.asarray(rng(11).standard_normal((2, 32)).astype(np.float32))
    dn = (((1,), (0,)), ((), ()))
    with pk.force_interpret("gpu"):
        y = jax.jit(lambda x, q: jq.ops.qdot_general(x, q, dn))(x, q)
    assert calls == ["gpu"] and y.shape == (2, 4, 6)
    ref = jax.jit(lambda x, q: jax.lax.dot_general(x, q.dequantize(jnp.float32), dn))(x, q)
    assert rel_err(y, ref) < 1e-5


def test_group_48_runs_on_tpu_style(calls):
    """What the GPU style refuses for its tiles (a group size that is not a power of two, like GPTVQ's 192), the TPU
    style takes."""
    q = codebook_q("cb4x2", 96, 32, 48, "shared", seed=12)
    x = acts(2, 96, jnp.float32)
    check(x, q, run_kernel(x, q, "tpu"), "float32")
    assert calls == ["tpu"]


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_lut_lowers_for_accelerators(platform):
    """Pallas → Triton IR (gather loads) / Mosaic (compare-select) lowering runs here; the backend compilers do not."""
    style = "gpu" if platform == "cuda" else "tpu"
    blocks = pk.autotune.default_blocks(style, 16)
    for q in (codebook_q("cb4x2", 512, 256, 64, "shared"), codebook_q("cb3", 512, 256, None, "position")):
        x = jax.ShapeDtypeStruct((16, 512), jnp.bfloat16)
        f = jax.jit(lambda x, q: pk.lut_matmul(x, q, blocks=blocks, mode=Mode(style)))
        try:
            text = f.trace(x, q).lower(lowering_platforms=(platform,)).as_text()
        except Exception as e:  # a jaxlib built without that backend's dialects
            if "Unsupported" in str(e) and "platform" in str(e):
                pytest.skip(f"{platform} lowering not available: {e}")
            raise
        assert "triton" in text if style == "gpu" else "tpu_custom_call" in text


def test_compiled_tpu_leaves_large_tables_to_xla(monkeypatch):
    """On a compiled TPU the select lookup costs O(2^b · d) per index: cb8x4 (1024 values) is refused, cb8 taken."""
    monkeypatch.setattr(lut, "select_blocks", lambda *a, **kw: pk.autotune.default_blocks("tpu", 2))  # no compiling
    x = acts(2, 128, jnp.bfloat16)
    dn = (((1,), (0,)), ((), ()))
    with common.forced(Mode("tpu")):
        why = pk.dispatch.supports_lut(x, codebook_q("cb8x4", 128, 256, 64, "shared"), dn)
        assert why is not None and "1024 table values per index" in why
        assert pk.dispatch.supports_lut(x, codebook_q("cb8", 128, 256, 64, "shared"), dn) is None
