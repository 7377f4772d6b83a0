"""jq.ops (qdot_general / qeinsum / kernel dispatch) and Flax interop: unmodified linen and NNX models run on
quantized parameters, equal to the same models on the dequantized parameters."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx

import jq
import jq.interop
from jq import QTensor, QuantConfig, Rule, Scheme
from jq.algorithms import get_method

rtn = get_method("rtn")


def rnd(*shape, seed=0, dtype=np.float32):
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


def quant(w, scheme, axes=(0,)):
    return rtn(jnp.asarray(w), scheme, scheme.layout(w.shape, axes))


# ------------------------------------------------------------------------------------------------------------ ops


@pytest.fixture(scope="module")
def q2d():
    w = rnd(32, 24, seed=1)
    return w, quant(w, Scheme("int4", symmetric=False, group_size=8))


def test_qdot_general_rhs_and_lhs(q2d):
    w, q = q2d
    d = np.asarray(q.dequantize())
    assert np.abs(d - w).max() > 0  # the weight really is quantized
    x = rnd(5, 32, seed=2)
    # x @ W
    dn = (((1,), (0,)), ((), ()))
    y = jq.ops.qdot_general(jnp.asarray(x), q, dn)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(jax.lax.dot_general(jnp.asarray(x), jnp.asarray(d), dn)))
    np.testing.assert_allclose(np.asarray(y), x.astype(np.float64) @ d, rtol=1e-5, atol=1e-5)
    # W^T x^T with the QTensor on the left
    dn = (((0,), (1,)), ((), ()))
    y = jq.ops.qdot_general(q, jnp.asarray(x), dn)
    assert y.shape == (24, 5)
    np.testing.assert_allclose(np.asarray(y), (x.astype(np.float64) @ d).T, rtol=1e-5, atol=1e-5)
    # both quantized
    y = jq.ops.qdot_general(q, q, (((0,), (0,)), ((), ())))
    np.testing.assert_allclose(np.asarray(y), d.T.astype(np.float64) @ d, rtol=1e-5, atol=1e-4)
    # qdot and plain arrays
    np.testing.assert_allclose(np.asarray(jq.ops.qdot(jnp.asarray(x), q)), x @ d, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(jq.ops.qdot_general(jnp.asarray(x), jnp.asarray(w), (((1,), (0,)), ((), ())))),
                               x @ w, rtol=1e-5, atol=1e-5)


def test_qdot_general_activation_dtype_and_preferred(q2d):
    _, q = q2d
    x = jnp.asarray(rnd(3, 32, seed=3), jnp.bfloat16)
    dn = (((1,), (0,)), ((), ()))
    y = jq.ops.qdot_general(x, q, dn)
    assert y.dtype == jnp.bfloat16  # the activation dtype, weight dequantized to it
    ref = jax.lax.dot_general(x, q.dequantize(jnp.bfloat16), dn)
    np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(ref, np.float32))
    y32 = jq.ops.qdot_general(x, q, dn, preferred_element_type=jnp.float32)
    assert y32.dtype == jnp.float32


def test_qdot_general_multi_axis_and_batch():
    w = rnd(4, 16, 32, seed=4)
    q = quant(w, Scheme("int4", group_size=8), axes=(0, 1))
    d = np.asarray(q.dequantize(), np.float64)
    x = rnd(5, 4, 16, seed=5)
    y = jq.ops.qdot_general(jnp.asarray(x), q, (((1, 2), (0, 1)), ((), ())))
    np.testing.assert_allclose(np.asarray(y), np.einsum("bhd,hdo->bo", x, d), rtol=1e-5, atol=1e-5)
    # batch dimension over the heads axis
    xb = rnd(4, 5, 16, seed=6)
    y = jq.ops.qdot_general(jnp.asarray(xb), q, (((2,), (1,)), ((0,), (0,))))
    np.testing.assert_allclose(np.asarray(y), np.einsum("hbd,hdo->hbo", xb, d), rtol=1e-5, atol=1e-5)


def test_qeinsum(q2d):
    _, q = q2d
    d = np.asarray(q.dequantize(), np.float64)
    x = rnd(2, 3, 32, seed=7)
    y = jq.ops.qeinsum("btk,kn->btn", jnp.asarray(x), q)
    np.testing.assert_allclose(np.asarray(y), np.einsum("btk,kn->btn", x, d), rtol=1e-5, atol=1e-5)
    y = jq.ops.qeinsum("btk,kn->bn", jnp.asarray(x), q)
    np.testing.assert_allclose(np.asarray(y), np.einsum("btk,kn->bn", x, d), rtol=1e-5, atol=1e-4)


def test_registered_kernel_dispatch_order_and_reasons(q2d):
    _, q = q2d
    calls = []

    def supports_a(lhs, rhs, dn):
        calls.append("a?")
        return None if isinstance(rhs, QTensor) else "rhs is not a QTensor"

    def fn_a(lhs, rhs, dn, pet):
        calls.append("a")
        return jax.lax.dot_general(lhs, rhs.dequantize(lhs.dtype), dn)

    def supports_b(lhs, rhs, dn):
        calls.append("b?")
        return "never"

    before = list(jq.ops.KERNELS)
    try:
        jq.ops.register_kernel("test_a", supports_a, fn_a)
        jq.ops.register_kernel("test_b", supports_b, lambda *a: pytest.fail("b does not support the call"))
        assert [k.name for k in jq.ops.KERNELS[:2]] == ["test_b", "test_a"]  # later registrations asked first
        x = jnp.asarray(rnd(3, 32, seed=8))
        y = jq.ops.qdot_general(x, q, (((1,), (0,)), ((), ())))
        assert calls == ["b?", "a?", "a"]
        np.testing.assert_allclose(np.asarray(y), np.asarray(x @ q.dequantize()), rtol=1e-6)
        calls.clear()
        jq.ops.qdot_general(q, x, (((0,), (1,)), ((), ())))  # a refuses (lhs is the QTensor): falls back
        assert calls == ["b?", "a?"]
    finally:
        jq.ops.KERNELS[:] = before
    assert jq.ops.KERNELS == before


# ---------------------------------------------------------------------------------------------------------- linen


class LinenModel(nn.Module):
    @nn.compact
    def __call__(self, x):  # x: [B, T, 32]
        h = nn.Dense(48)(x)
        h = nn.LayerNorm()(h)
        h = h.reshape(h.shape[:-1] + (4, 12))
        h = nn.DenseGeneral(features=32, axis=(-2, -1))(h)  # kernel (4, 12, 32)
        h = nn.Einsum(shape=(32, 16), einsum_str="btk,kn->btn", use_bias=False)(h)
        w = self.param("custom", nn.initializers.normal(0.5), (16, 16))
        return jnp.tanh(h) @ w


LINEN_CFG = QuantConfig(
    rules=(
        Rule(r"DenseGeneral_0/kernel", Scheme("int4", group_size=4, axes=(0, 1))),
        Rule(r".*kernel", Scheme("int4", symmetric=False, group_size=16)),
        Rule(r"custom", Scheme("int8")),
    )
)
ROUTED = {"Dense_0/kernel", "DenseGeneral_0/kernel", "Einsum_0/kernel"}


@pytest.fixture(scope="module")
def linen_setup():
    model = LinenModel()
    x = jnp.asarray(rnd(2, 3, 32, seed=9))
    params = model.init(jax.random.key(0), x)["params"]
    qparams = jq.quantize_params(params, LINEN_CFG)
    return model, x, params, qparams


def test_linen_quantized_leaves(linen_setup):
    _, _, params, qparams = linen_setup
    quantized = {p for p, v in jq.leaf_paths(qparams) if isinstance(v, QTensor)}
    assert quantized == ROUTED | {"custom"}
    dg = qparams["DenseGeneral_0"]["kernel"]
    assert dg.layout.axes == (0, 1) and dg.scale.shape == (4, 3, 32)


def test_linen_apply_equals_dequantized_model(linen_setup):
    model, x, params, qparams = linen_setup
    y = jax.jit(lambda p, x: jq.interop.apply(model, {"params": p}, x))(qparams, x)
    ref = model.apply({"params": jq.dequantize_params(qparams)}, x)
    assert y.shape == ref.shape == (2, 3, 16)
    np.testing.assert_allclose(np.asarray(y), np.asarray(ref), rtol=1e-5, atol=1e-5)
    # not trivially equal to the float model (so the comparison above is about the quantized weights)
    assert np.abs(np.asarray(y) - np.asarray(model.apply({"params": params}, x))).max() > 1e-3
    # without QTensors jq.interop.apply is model.apply
    np.testing.assert_array_equal(np.asarray(jq.interop.apply(model, {"params": params}, x)),
                                  np.asarray(model.apply({"params": params}, x)))


def test_linen_routed_paths(linen_setup):
    model, x, _, qparams = linen_setup
    assert jq.interop.routed_paths(model, {"params": qparams}, x) == ROUTED


def test_linen_dense_reaches_registered_kernel(linen_setup):
    model, x, _, qparams = linen_setup
    seen = []

    def supports(lhs, rhs, dn):
        if isinstance(rhs, QTensor) and rhs.ndim == 2 and rhs.layout.granularity == "group":
            return None
        return "only 2-D grouped kernels"

    def fake(lhs, rhs, dn, preferred_element_type):
        seen.append((rhs.shape, rhs.fmt, rhs.codes.dtype, rhs.codes.shape))
        return jax.lax.dot_general(lhs, rhs.dequantize(lhs.dtype), dn, preferred_element_type=preferred_element_type)

    jq.ops.register_kernel("test_fake_dense", supports, fake)
    try:
        y = jax.jit(lambda p, x: jq.interop.apply(model, {"params": p}, x))(qparams, x)
    finally:
        jq.ops.KERNELS.remove(next(k for k in jq.ops.KERNELS if k.name == "test_fake_dense"))
    assert all(k.name != "test_fake_dense" for k in jq.ops.KERNELS)
    # the Dense kernel arrives packed: (32, 48) int4 → (16, 48) uint8 codes, and so does the Einsum one (qeinsum turns
    # "btk,kn->btn" into a dot_general); the DenseGeneral one (4, 12, 32) has no matrix view (its 12 packed int4 codes
    # per row block are padded to 8 bytes, not 6) and is dequantized
    assert seen == [((32, 48), "int4", jnp.uint8, (16, 48)), ((32, 16), "int4", jnp.uint8, (16, 16))]
    ref = model.apply({"params": jq.dequantize_params(qparams)}, x)
    np.testing.assert_allclose(np.asarray(y), np.asarray(ref), rtol=1e-5, atol=1e-5)


def test_linen_bias_einsum_is_dequantized_not_routed():
    class M(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Einsum(shape=(32, 16), einsum_str="bk,kn->bn", use_bias=True)(x)

    m = M()
    x = jnp.asarray(rnd(3, 32, seed=10))
    p = m.init(jax.random.key(1), x)["params"]
    q = jq.quantize_params(p, QuantConfig.simple(Scheme("int8")))
    assert isinstance(q["Einsum_0"]["kernel"], QTensor)
    assert jq.interop.routed_paths(m, {"params": q}, x) == set()
    y = jq.interop.apply(m, {"params": q}, x)
    np.testing.assert_allclose(np.asarray(y), np.asarray(m.apply({"params": jq.dequantize_params(q)}, x)), rtol=1e-6)


# ------------------------------------------------------------------------------------------------------------ NNX


class NNXModel(nnx.Module):
    def __init__(self, rngs):
        self.lin = nnx.Linear(32, 48, rngs=rngs)
        self.norm = nnx.LayerNorm(48, rngs=rngs)
        self.out = nnx.Linear(48, 16, use_bias=False, rngs=rngs)
        self.custom = nnx.Param(jax.random.normal(rngs.params(), (16, 8)))

    def __call__(self, x):
        return self.out(self.norm(self.lin(x))) @ self.custom[...]


def test_nnx_merge_equals_dequantized_model():
    model = NNXModel(nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    cfg = QuantConfig(rules=(Rule(r".*kernel", Scheme("int4", symmetric=False, group_size=16)),
                             Rule(r"custom", Scheme("int8"))))
    qstate = jq.quantize_params(state, cfg)
    quantized = {p for p, v in jq.leaf_paths(qstate) if isinstance(v, QTensor)}
    assert quantized == {"lin/kernel", "out/kernel", "custom"}
    x = jnp.asarray(rnd(2, 5, 32, seed=11))

    seen = []

    def supports(lhs, rhs, dn):
        return None if isinstance(rhs, QTensor) else "not quantized"

    def fake(lhs, rhs, dn, pet):
        seen.append(rhs.shape)
        return jax.lax.dot_general(lhs, rhs.dequantize(lhs.dtype), dn, preferred_element_type=pet)

    @jax.jit
    def run(qs, x):
        return jq.interop.nnx_merge(graphdef, qs)(x)

    jq.ops.register_kernel("test_fake_nnx", supports, fake)
    try:
        y = run(qstate, x)
    finally:
        jq.ops.KERNELS.remove(next(k for k in jq.ops.KERNELS if k.name == "test_fake_nnx"))
    assert sorted(seen) == [(32, 48), (48, 16)]  # both nnx.Linear kernels reached jq.ops as QTensors
    ref = nnx.merge(graphdef, jq.dequantize_params(qstate))(x)
    assert y.shape == ref.shape == (2, 5, 8)
    np.testing.assert_allclose(np.asarray(y), np.asarray(ref), rtol=1e-5, atol=1e-5)
    assert np.abs(np.asarray(y) - np.asarray(model(x))).max() > 1e-3


@pytest.mark.parametrize("axis", [(-1, -2), (2, 1), (-2, -1)])
def test_linen_dense_general_unsorted_axis(axis):
    """Flax sorts DenseGeneral's `axis` (the kernel is laid out in sorted-axis order); the routed path must too.
    Equal contracted sizes (6, 6) would otherwise give a silently wrong result instead of a shape error."""

    class M(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.DenseGeneral(features=5, axis=axis)(x)

    m = M()
    x = jnp.asarray(rnd(3, 6, 6, seed=12))
    p = m.init(jax.random.key(2), x)["params"]
    assert p["DenseGeneral_0"]["kernel"].shape == (6, 6, 5)
    q = jq.quantize_params(p, QuantConfig.simple(Scheme("int8", axes=(0, 1))))
    assert jq.interop.routed_paths(m, {"params": q}, x) == {"DenseGeneral_0/kernel"}
    y = jax.jit(lambda q, x: jq.interop.apply(m, {"params": q}, x))(q, x)
    d = np.asarray(q["DenseGeneral_0"]["kernel"].dequantize(), np.float64)
    b = np.asarray(p["DenseGeneral_0"]["bias"], np.float64)
    np.testing.assert_allclose(np.asarray(y), np.einsum("bij,ijo->bo", np.asarray(x, np.float64), d) + b,
                               rtol=1e-5, atol=1e-5)
