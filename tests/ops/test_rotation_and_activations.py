"""Model rotation (QuaRot-style), online Hadamard-rotated weights, activation quantization (int8 / fp8 / int4 with
clip) and the LLM.int8 outlier split: exactness of the float rotation, and each quantized path against a NumPy
reference written here."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jq
from jq import ops
from jq.tree.recipe import RotationConfig, recipe_from_dict
from jq.numbers.hadamard import rotation_matrix
from jq.models.llama.config import LlamaConfig
from jq.models.llama.model import init_params, make_forward
from jq.models.llama.rotate import rotate


def _with_norm_scales(params, seed=3):
    """Non-trivial RMSNorm scales, so that folding them is tested."""
    key = jax.random.key(seed)

    def f(path, v):
        if jax.tree_util.keystr(path).endswith("['scale']"):
            return v * (1.0 + 0.5 * jax.random.normal(key, v.shape))
        return v

    return jax.tree_util.tree_map_with_path(f, params)


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("spec", [RotationConfig(), RotationConfig(heads=False), RotationConfig(residual=False),
                                  RotationConfig(seed=7)])
def test_rotated_float_model_gives_the_same_logits(tie, spec):
    cfg = LlamaConfig.tiny(tie_embeddings=tie)
    p = _with_norm_scales(init_params(cfg, jax.random.key(0)))
    toks = jax.random.randint(jax.random.key(1), (2, 12), 0, cfg.vocab_size)
    ref = make_forward(cfg)(p, toks)
    p2, cfg2 = rotate(p, cfg, spec)
    out = make_forward(cfg2)(p2, toks)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=2e-5 * float(jnp.abs(ref).max()))
    if spec.residual:
        assert not cfg2.tie_embeddings and "lm_head" in p2
        for blk in (k for k in p2 if k.startswith("layers_")):
            np.testing.assert_array_equal(np.asarray(p2[blk]["input_norm"]["scale"]), 1.0)
        # the residual stream really is rotated: the embedding rows changed, their norms did not
        e0, e1 = np.asarray(p["embed"]["embedding"]), np.asarray(p2["embed"]["embedding"])
        assert not np.allclose(e0, e1)
        np.testing.assert_allclose(np.linalg.norm(e1, axis=1), np.linalg.norm(e0, axis=1), rtol=1e-5)
    # the input tree is untouched (pure function)
    np.testing.assert_array_equal(np.asarray(p["embed"]["embedding"]),
                                  np.asarray(_with_norm_scales(init_params(cfg, jax.random.key(0)))["embed"]["embedding"]))


def test_rotate_refuses_quantized_leaves_and_wrong_depth():
    cfg = LlamaConfig.tiny()
    p = init_params(cfg, jax.random.key(0))
    q = jq.quantize_params(p, jq.QuantConfig.simple(jq.Scheme("int8")))
    with pytest.raises(ValueError, match="float"):
        rotate(q, cfg)
    with pytest.raises(ValueError, match="layers"):
        rotate(p, dataclasses.replace(cfg, n_layers=3))


def test_recipe_rotation_section_and_errors():
    r = recipe_from_dict({"rules": [{"pattern": ".*kernel", "format": "int4", "group_size": 16}],
                          "rotation": {"seed": 3}})
    assert r.rotation == RotationConfig(seed=3)
    rules = [{"pattern": ".*kernel", "format": "int8"}]
    assert recipe_from_dict({"rules": rules, "rotation": True}).rotation == RotationConfig()
    with pytest.raises(ValueError, match="unknown field"):
        recipe_from_dict({"rules": rules, "rotation": {"angle": 1}})
    with pytest.raises(ValueError, match="seed"):
        recipe_from_dict({"rules": rules, "rotation": {"seed": "x"}})
    with pytest.raises(ValueError, match="rotate"):
        recipe_from_dict({"rules": [{"pattern": ".*", "format": "int8", "rotate": "givens"}]})


# -- online Hadamard-rotated weights ------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [64, 96, 48])  # 96 = 12·8 and 48 = 12·4: non-power-of-two Hadamard orders
def test_rotated_qtensor_dequantizes_to_the_weight_and_multiplies_rotated_inputs(k):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((k, 24)).astype(np.float32)
    w[3] *= 30.0  # an outlier input row: rotation spreads it over all rows before quantization
    x = rng.standard_normal((5, k)).astype(np.float32)
    plain = jq.Scheme("int4", symmetric=False, group_size=16)
    rot = dataclasses.replace(plain, rotate="hadamard")
    cfg = lambda s: jq.QuantConfig.simple(s)  # noqa: E731
    qp = jq.quantize_params({"d": {"kernel": w}}, cfg(plain))["d"]["kernel"]
    qr = jq.quantize_params({"d": {"kernel": w}}, cfg(rot))["d"]["kernel"]
    assert str(qr.policy.rotation) == "hadamard" and qp.policy.rotation is None
    q = np.asarray(rotation_matrix(k), np.float64)
    # stored weight = Qᵀ W quantized by the plain scheme
    ws = q.T @ w
    qs = jq.quantize_params({"d": {"kernel": ws.astype(np.float32)}}, cfg(plain))["d"]["kernel"]
    np.testing.assert_allclose(np.asarray(qr.unrotated().dequantize()), np.asarray(qs.dequantize()), atol=1e-5)
    # dequantize gives W back (up to the quantization error of Qᵀ W, rotated back)
    np.testing.assert_allclose(np.asarray(qr.dequantize()), q @ np.asarray(qs.dequantize(), np.float64), atol=1e-4)
    # the matmul rotates its input: x W ≈ (x Q)(Qᵀ W)
    y = np.asarray(ops.qdot(jnp.asarray(x), qr))
    np.testing.assert_allclose(y, x @ np.asarray(qr.dequantize(), np.float64), rtol=1e-4, atol=1e-4)
    # and the outlier row is what rotation is for: lower weight error than without
    err = lambda t: np.linalg.norm(np.asarray(t.dequantize()) - w)  # noqa: E731
    assert err(qr) < err(qp)


def test_rotated_gptq_uses_the_rotated_hessian():
    rng = np.random.default_rng(1)
    k, n = 64, 32
    xs = rng.standard_normal((512, k)).astype(np.float32)
    xs[:, 5] *= 20.0
    h = xs.T @ xs / len(xs)
    w = (rng.standard_normal((k, n)) * 0.05).astype(np.float32)
    sch = jq.Scheme("int4", symmetric=False, group_size=16, rotate="hadamard")
    calib = {"d": {"kernel": {"hessian": jnp.asarray(h), "count": 512}}}
    g = jq.quantize_params({"d": {"kernel": w}}, jq.QuantConfig((jq.Rule(".*kernel", sch, "gptq"),)), calib)
    r = jq.quantize_params({"d": {"kernel": w}}, jq.QuantConfig.simple(sch))
    out = lambda t: np.linalg.norm(xs @ (np.asarray(t["d"]["kernel"].dequantize()) - w))  # noqa: E731
    assert out(g) < 0.9 * out(r)  # GPTQ in the rotated basis still beats RTN in it on the real inputs


def test_rotate_needs_one_contraction_axis_and_a_known_order():
    sch = jq.Scheme("int8", rotate="hadamard")
    with pytest.raises(ValueError, match="Hadamard construction"):
        jq.quantize_params({"d": {"kernel": np.ones((6, 4), np.float32)}}, jq.QuantConfig.simple(sch))
    sch3 = jq.Scheme("int8", rotate="hadamard", axes=(0, 1))
    with pytest.raises(ValueError, match="one contraction axis"):
        jq.quantize_params({"d": {"kernel": np.ones((4, 4, 8), np.float32)}}, jq.QuantConfig.simple(sch3))


# -- activation quantization ------------------------------------------------------------------------------------


def np_act_quant(x, bits_or_fp8, clip=1.0):
    """Per-token symmetric fake quantization in NumPy (integer grids ±(2^(b−1)−1))."""
    amax = np.abs(x).max(-1, keepdims=True) * clip
    qmax = 2.0 ** (bits_or_fp8 - 1) - 1
    s = np.where(amax > 0, amax / qmax, 1.0)
    return np.clip(np.round(x / s), -qmax, qmax) * s


@pytest.mark.parametrize("fmt,bits,clip", [("int8", 8, 1.0), ("int4", 4, 1.0), ("int4", 4, 0.9), ("int8", 8, 0.5)])
def test_per_token_activation_quantization_matches_numpy(fmt, bits, clip):
    x = np.random.default_rng(2).standard_normal((3, 7, 32)).astype(np.float32)
    got = np.asarray(ops.fake_quantize_activations(jnp.asarray(x), fmt, (2,), clip))
    np.testing.assert_allclose(got, np_act_quant(x, bits, clip), rtol=1e-6, atol=1e-6)


def test_fp8_activations_round_to_e4m3():
    import ml_dtypes

    x = np.random.default_rng(3).standard_normal((4, 16)).astype(np.float32)
    s = np.abs(x).max(-1, keepdims=True) / 448.0
    ref = (x / s).astype(ml_dtypes.float8_e4m3fn).astype(np.float32) * s
    np.testing.assert_allclose(np.asarray(ops.fake_quantize_activations(jnp.asarray(x), "fp8_e4m3", (1,))), ref,
                               rtol=1e-6)


@pytest.mark.parametrize("act,clip", [("int8", 1.0), ("int4", 0.9), ("fp8_e4m3", 1.0), ("int4", "gaussian")])
def test_weight_activation_matmul_equals_fake_quant_reference(act, clip):
    rng = np.random.default_rng(4)
    w = rng.standard_normal((32, 16)).astype(np.float32)
    x = rng.standard_normal((2, 5, 32)).astype(np.float32)
    sch = jq.Scheme("int8", act=act, act_clip=clip)
    q = jq.quantize_params({"d": {"kernel": w}}, jq.QuantConfig.simple(sch))["d"]["kernel"]
    y = np.asarray(ops.qdot(jnp.asarray(x), q))
    xq = np.asarray(ops.fake_quantize_activations(jnp.asarray(x), act, (2,), clip), np.float64)
    np.testing.assert_allclose(y, xq @ np.asarray(q.dequantize(), np.float64), rtol=2e-4, atol=2e-4)


def test_llm_int8_outlier_channels_bypass_activation_quantization():
    rng = np.random.default_rng(5)
    w = rng.standard_normal((32, 8)).astype(np.float32)
    x = rng.standard_normal((6, 32)).astype(np.float32)
    x[2, [4, 9]] = [40.0, -25.0]  # two outlier channels (in one token)
    base = jq.Scheme("int8", act="int8")
    q = jq.quantize_params({"d": {"kernel": w}}, jq.QuantConfig.simple(dataclasses.replace(base, act_outlier=6.0)))
    q = q["d"]["kernel"]
    wd = np.asarray(q.dequantize(), np.float64)
    m = np.zeros(32)
    m[[4, 9]] = 1.0
    np.testing.assert_array_equal(np.asarray(ops.outlier_channels(jnp.asarray(x), (1,), 6.0)).ravel(), m)
    inner = np_act_quant(x * (1 - m), 8) @ wd
    ref = inner + (x * m) @ wd
    y = np.asarray(ops.qdot(jnp.asarray(x), q))
    np.testing.assert_allclose(y, ref, rtol=2e-4, atol=2e-4)
    # against plain W8A8 on the same input, the decomposition is far closer to the float-activation product
    plain = jq.quantize_params({"d": {"kernel": w}}, jq.QuantConfig.simple(base))["d"]["kernel"]
    exact = x @ wd
    assert np.abs(y - exact).max() < 0.2 * np.abs(np.asarray(ops.qdot(jnp.asarray(x), plain)) - exact).max()
    with pytest.raises(ValueError, match="act_outlier"):
        jq.Scheme("int8", act_outlier=6.0)  # needs activation quantization


@pytest.mark.parametrize("clip,act", [(0.0, "int4"), (1.5, "int4"), (-0.1, "int4"), ("gaussian", "fp8_e4m3"),
                                      ("gauss", "int4")])
def test_act_clip_outside_zero_one_is_a_clear_error(clip, act):
    with pytest.raises(ValueError, match=rf"scheme field 'act_clip' has value {clip!r} \(act {act!r}\); use a ratio "
                                         r"in \(0, 1\], or 'gaussian' with int activations"):
        jq.Scheme("int8", act=act, act_clip=clip)


@pytest.mark.parametrize("fmt,bits", [("int4", 4), ("int3", 3), ("int8", 8)])
def test_gaussian_activation_clip_is_alpha_rms_per_token_and_mse_optimal_on_gaussian_tokens(fmt, bits):
    from jq.numbers.grid import Grid
    from jq.numbers.ranges import gaussian_clip

    x = np.random.default_rng(7).standard_normal((256, 576)).astype(np.float32) * np.float32([[0.3], [2.0]] * 128)
    alpha = gaussian_clip(Grid(format=fmt, symmetric=True, restricted=True))
    rms = np.sqrt(np.mean(x.astype(np.float64) ** 2, -1, keepdims=True))
    got = np.asarray(ops.fake_quantize_activations(jnp.asarray(x), fmt, (1,), "gaussian"))
    diff = np.abs(got - np_act_quant(x, bits, alpha * rms / np.abs(x).max(-1, keepdims=True)))
    step = alpha * rms / (2 ** (bits - 1) - 1)
    assert np.mean(diff <= 1e-5) > 0.9999 and np.all(diff <= step + 1e-5)  # a rare tie may round either way (f32 rms)

    def mse(c):  # the clip scaled by c, in the NumPy reference
        return np.mean((np_act_quant(x, bits, c * alpha * rms / np.abs(x).max(-1, keepdims=True)) - x) ** 2)

    cs = np.linspace(0.7, 1.3, 13)
    assert abs(cs[int(np.argmin([mse(c) for c in cs]))] - 1.0) <= 0.05 + 1e-9  # α* is where the empirical MSE is least
    if bits < 8:  # at 3-4 bits the abs-max range of a 576-wide Gaussian token wastes levels on the tails
        assert mse(1.0) < 0.8 * np.mean((np_act_quant(x, bits) - x) ** 2)
