"""Dispatch of `jq.ops` to the Pallas kernels (`jq.pallas_kernels.dispatch`): CPU never takes a kernel unless forced,
what a kernel does not support falls back to XLA with its reason logged, dense-general / einsum weights and those
contracting a later axis reach the kernels as matrices, user kernels keep priority, a kernel that does not build
falls back, and the gradient through a kernel equals the fallback's."""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jqtest.kernels import (TOL_FALLBACK, TOL_NUMPY, acts, fallback_messages, kernel_used, normal, np_dequant,
                             quantize, rel_err, weight)

import jq
import jq.pallas_kernels as pk
from jq.pallas_kernels import autotune, common, dispatch
from jq.pallas_kernels.common import Mode


def test_cpu_does_not_take_kernels_unless_forced(monkeypatch, caplog):
    q = quantize(weight(64, 32), format="int4", group_size=32)
    x = acts(2, 64, jnp.float32)
    calls = kernel_used(monkeypatch)
    with caplog.at_level(logging.DEBUG, logger="jq.ops"):
        y0 = jax.jit(lambda x, q: jq.ops.qdot(x, q))(x, q)
        assert calls == []
        assert any("only run interpreted" in m for m in fallback_messages(caplog))
        caplog.clear()
        monkeypatch.setenv("JQ_KERNELS", "interpret")
        y1 = jax.jit(lambda x, q: jq.ops.qdot(x, q))(x, q)
        assert calls == ["w4a16_sym_g32"] and not fallback_messages(caplog)
        monkeypatch.setenv("JQ_KERNELS", "off")
        with pk.force_interpret("tpu"):  # force_interpret wins over the environment
            assert common.kernel_mode() == (Mode("tpu", True), None)
        jax.jit(lambda x, q: jq.ops.qdot(x, q))(x, q)
        assert len(calls) == 1 and any("disabled by JQ_KERNELS=off" in m for m in fallback_messages(caplog))
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
    msgs = fallback_messages(caplog) + [r.getMessage() for r in caplog.records if "W8A8" in r.getMessage()]
    assert any(reason in m for m in msgs) or (what == "w8a8 groups"), msgs
    if what == "w8a8 groups":  # not the XLA int path either (it takes per-channel only): the generic fallback
        assert any(reason in m for m in fallback_messages(caplog)), msgs
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
    assert calls == ["w4a16_sym_g16"] and not fallback_messages(caplog)
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
    assert calls == ["w4a16_sym_g16"] and not fallback_messages(caplog)
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
    assert any("pallas_w4a16: no block configuration" in m for m in fallback_messages(caplog))
    assert rel_err(y, np.asarray(x, np.float64) @ np_dequant(q)) < TOL_NUMPY["float32"]


def test_gradient_through_kernel_matches_fallback():
    q = quantize(weight(128, 64), format="int4", symmetric=False, group_size=32)
    x = acts(3, 128, jnp.float32)
    loss = lambda x: jnp.sum(jnp.sin(jq.ops.qdot(x, q)))
    g_ref = jax.jit(jax.grad(loss))(x)
    with pk.force_interpret():
        g = jax.jit(jax.grad(lambda x: loss(x)))(x)
    assert rel_err(g, g_ref) < 1e-5
