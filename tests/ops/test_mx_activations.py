"""Microscaling activations (MX blocks of 32 with e8m0 scales, NVFP4 blocks of 16 with e4m3 scales and a per-token
float32 scale) in the matmul: against a NumPy reference written here, straight-through gradients, several
contraction axes, and the W+A recipes."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import jq
from jq import ops
from jq.tree.recipe import load_recipe

DT = {"mxfp8_e4m3": (ml_dtypes.float8_e4m3fn, 8), "mxfp4": (ml_dtypes.float4_e2m1fn, 2),
      "mxfp6_e3m2": (ml_dtypes.float6_e3m2fn, 4)}


def ref_act(x: np.ndarray, fmt: str) -> np.ndarray:
    """Per token (rows of x [T, K]), blocks along K (zero-padded), quantized and dequantized by the spec."""
    t, k = x.shape
    block = 16 if fmt == "nvfp4" else 32
    xp = np.pad(x.astype(np.float32), ((0, 0), (0, -k % block))).reshape(t, -1, block)
    if fmt == "nvfp4":
        outer = np.abs(xp).max(axis=(1, 2), keepdims=True) * np.float32(1 / 2688)
        outer = np.where(outer > 0, outer, np.float32(1))  # an all-zero token: any scale, its codes are zeros
        y = (xp / outer).astype(np.float32)
        s = np.minimum(np.abs(y).max(-1, keepdims=True) / np.float32(6), 448).astype(ml_dtypes.float8_e4m3fn)
        s = np.where(s.astype(np.float32) > 0, s.astype(np.float32), np.float32(1))
        v = np.clip(y / s, -6, 6).astype(ml_dtypes.float4_e2m1fn).astype(np.float32)
        out = v * (s * outer)
    else:
        dt, emax = DT[fmt]
        with np.errstate(divide="ignore"):  # an all-zero block: log2 0 = -inf, clamped at the floor 2^-126
            e = np.maximum(np.floor(np.log2(np.abs(xp).max(-1, keepdims=True).astype(np.float64))) - emax, -126)
        vmax = float(ml_dtypes.finfo(dt).max)
        out = np.clip(xp / 2.0**e, -vmax, vmax).astype(np.float32).astype(dt).astype(np.float32) * 2.0**e
    return out.reshape(t, -1)[:, :k].astype(np.float32)


@pytest.mark.parametrize("fmt", ["mxfp8_e4m3", "mxfp4", "mxfp6_e3m2", "nvfp4"])
@pytest.mark.parametrize("k", [64, 72])  # 72: the last block is partial (zero-padded)
def test_activation_round_trip_equals_the_reference(fmt, k):
    x = np.random.default_rng(5).standard_t(4, size=(6, k)).astype(np.float32)
    x[2] *= 100.0
    x[3] = 0.0
    got = np.asarray(ops.fake_quantize_activations(jnp.asarray(x), fmt, (1,)))
    np.testing.assert_array_equal(got, ref_act(x, fmt))
    assert (got[3] == 0).all()


def test_several_contraction_axes_flatten_in_order():
    x = jax.random.normal(jax.random.key(0), (3, 4, 16))
    a = ops.fake_quantize_activations(x, "mxfp4", (1, 2))
    b = ops.fake_quantize_activations(x.reshape(3, 64), "mxfp4", (1,)).reshape(3, 4, 16)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    c = ops.fake_quantize_activations(jnp.moveaxis(x, 0, 2), "mxfp4", (0, 1))  # tokens last
    np.testing.assert_array_equal(np.asarray(jnp.moveaxis(c, 2, 0)), np.asarray(a))


@pytest.mark.parametrize("w_fmt,act", [("mxfp4", "mxfp8_e4m3"), ("nvfp4", "nvfp4"), ("int8", "mxint8")])
def test_matmul_value_and_straight_through_gradient(w_fmt, act):
    rng = np.random.default_rng(6)
    w = jnp.asarray(rng.standard_normal((64, 8)).astype(np.float32))
    x = jnp.asarray(rng.standard_normal((2, 3, 64)).astype(np.float32))
    q = jq.quantize_params({"d": {"kernel": w}}, jq.QuantConfig.simple(jq.Scheme(w_fmt, act=act)))["d"]["kernel"]
    y = ops.qdot(x, q)
    xq = ops.fake_quantize_activations(x, act, (2,))
    np.testing.assert_allclose(np.asarray(y), np.asarray(xq @ q.dequantize()), rtol=1e-5, atol=1e-5)
    g = jax.grad(lambda x: jnp.sum(ops.qdot(x, q)))(x)
    np.testing.assert_allclose(np.asarray(g), np.broadcast_to(np.asarray(q.dequantize()).sum(1), x.shape), atol=1e-5)


def test_quantize_activations_refuses_block_formats():
    with pytest.raises(ValueError, match="'mxfp4' has block scales, not one per token; use fake_quantize_activations"):
        ops.quantize_activations(jnp.ones((2, 32)), "mxfp4", (1,))
    with pytest.raises(ValueError, match="scheme field 'act' has value 'mxfp3'"):
        jq.Scheme("mxfp4", act="mxfp3")


@pytest.mark.parametrize("recipe", ["mxfp4_a_mxfp8", "nvfp4_a_nvfp4"])
def test_w_and_a_recipes_quantize_weights_and_activations(recipe):
    cfg = load_recipe(f"configs/{recipe}.yaml")
    rng = np.random.default_rng(7)
    w = jnp.asarray(rng.standard_normal((96, 16)).astype(np.float32))
    x = jnp.asarray(rng.standard_normal((4, 96)).astype(np.float32))
    q = jq.quantize_params({"mlp": {"kernel": w}}, cfg)["mlp"]["kernel"]
    assert q.policy.act == cfg.rules[0].scheme.act and q.fmt == cfg.rules[0].scheme.format
    y = jax.jit(ops.qdot)(x, q)
    xq = ops.fake_quantize_activations(x, q.policy.act, (1,))
    np.testing.assert_allclose(np.asarray(y), np.asarray(xq @ q.dequantize()), rtol=1e-5, atol=1e-5)
    rel = float(jnp.linalg.norm(y - x @ w) / jnp.linalg.norm(x @ w))
    assert 0 < rel < 0.2
