"""QuEST (Panferov et al. 2025) in jq: the Gaussian-MSE-optimal clip (`jq.numbers.ranges.gaussian*`) and the trust
gradient estimator (`ste: trust`) against NumPy references, the rotated W4A4 forward against the converted model,
and a tiny-Llama QuEST training run that lowers the loss."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jq
import jq.interop
from jq import ops, qat
from jq.models.llama.config import LlamaConfig
from jq.models.llama.model import Llama, init_params
from jq.numbers import ranges as R
from jq.numbers.scheme import Scheme
from jq.qat import ste as S
from jq.tree.recipe import load_recipe, recipe_from_dict

REPO = Path(__file__).resolve().parents[2]
CENTRED = {"symmetric": False, "zero_point": "float", "scale_dtype": "float32"}


def _np_round_to(x: np.ndarray, levels: np.ndarray) -> np.ndarray:
    """Nearest of `levels` for every x (NumPy reference quantizer)."""
    return levels[np.argmin(np.abs(x[:, None] - levels[None]), axis=1)]


# -------------------------------------------------------------------------------------- the Gaussian-MSE clip


@pytest.mark.parametrize("kw", [{"format": "int4", **CENTRED}, {"format": "int2", **CENTRED},
                                {"format": "int3", "symmetric": True},
                                {"format": "int2", "symmetric": True, "restricted": True},
                                {"format": "int4", "symmetric": False, "zero_point": "int"}])
def test_unit_levels_are_the_values_the_grid_rounds_to(kw):
    grid = Scheme(**{"scale_dtype": "float32", **kw}).grid
    x = jnp.linspace(-1.5, 1.5, 4001, dtype=jnp.float32)
    s, z = grid.scale_zero(jnp.float32(-1.0), jnp.float32(1.0))
    got = np.unique(np.round(np.asarray(grid.fake_quant(x, s, z)), 5))
    np.testing.assert_allclose(got, np.round(R.unit_levels(grid), 5), atol=2e-5)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_gaussian_mse_matches_monte_carlo_and_its_clip_is_a_minimum(bits):
    levels = R.unit_levels(Scheme(format=f"int{bits}", **CENTRED).grid)
    a = R.gaussian_clip(Scheme(format=f"int{bits}", **CENTRED).grid)
    x = np.random.default_rng(bits).standard_normal(400_000)
    for alpha in (a, 0.8 * a, 1.3 * a):
        mc = np.mean((x - _np_round_to(x, alpha * np.asarray(levels))) ** 2)
        np.testing.assert_allclose(R.gaussian_mse(alpha, levels), mc, rtol=0.02)
    for eps in (0.01, -0.01):  # α* is a minimum of the exact integral
        assert R.gaussian_mse(a, levels) < R.gaussian_mse(a + eps, levels)


def test_gaussian_clip_reproduces_the_centred_grid_constants_and_lloyd_max_ternary():
    # QuEST's centred grids (outermost level α*σ): our own search, compared with the values the paper's code uses
    for bits, ref in ((4, 2.5139), (3, 2.0511), (2, 1.4935)):
        assert abs(R.gaussian_clip(Scheme(format=f"int{bits}", **CENTRED).grid) - ref) < 2e-4
    # ternary {−a, 0, a}: the optimum satisfies a = E[x | x > a/2] (Lloyd-Max), checked with the normal pdf / cdf
    a = R.gaussian_clip(Scheme(format="int2", symmetric=True, restricted=True).grid)
    t = a / 2
    from math import erf, exp, pi, sqrt
    cond_mean = exp(-t * t / 2) / sqrt(2 * pi) / (0.5 * (1 - erf(t / sqrt(2))))
    assert abs(a - cond_mean) < 1e-6


def test_gaussian_range_is_alpha_times_rms_without_padding():
    sch = Scheme(format="int4", group_size=8, pad=True, range="gaussian", **CENTRED)
    w = np.random.default_rng(0).normal(size=(12, 3)).astype(np.float32)  # 12 rows: the 2nd group has 4 pad zeros
    lay = sch.layout(w.shape, (0,))
    lo, hi = R.estimate(lay.to_grouped(jnp.asarray(w)), lay.reduce_axes, sch)
    a = R.gaussian_clip(sch.grid)
    ref = np.stack([np.sqrt(np.mean(w[:8] ** 2, 0)), np.sqrt(np.mean(w[8:] ** 2, 0))]) * a
    np.testing.assert_allclose(np.asarray(hi).reshape(2, 3), ref, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(lo), -np.asarray(hi))
    with pytest.raises(ValueError, match="needs an integer format"):
        R.gaussian_clip(Scheme(format="fp8_e4m3").grid)


# ------------------------------------------------------------------------------------------- the trust estimator


def _value_and_vjp(f, x: np.ndarray, ct: np.ndarray):
    """(f(x), the vector-Jacobian product ctᵀ ∂f/∂x), jitted."""
    def run(x, ct):
        y, vjp = jax.vjp(f, x)
        return y, vjp(ct)[0]

    return jax.jit(run)(jnp.asarray(x), jnp.asarray(ct))


@pytest.mark.parametrize("trust", [1.0, 0.5, 2.0])
def test_trust_gradient_of_weights_is_the_numpy_mask(trust):
    sch = Scheme(format="int3", range="gaussian", **CENTRED)  # per channel: 1 scale per column
    w = np.random.default_rng(1).normal(size=(64, 4)).astype(np.float32) * np.array([1, 2, 0.5, 3], np.float32)
    lay = sch.layout(w.shape, (0,))
    g = np.random.default_rng(2).normal(size=w.shape).astype(np.float32)
    fq, grad = _value_and_vjp(lambda u: S.fake_quant(u, sch, lay, "trust", trust), w, g)
    # NumPy reference: centred 8-level grid with outermost level α*·rms per column
    amax = R.gaussian_clip(sch.grid) * np.sqrt(np.mean(w.astype(np.float64) ** 2, 0))
    step = 2 * amax / 7
    ref = np.stack([_np_round_to(w[:, j], -amax[j] + step[j] * np.arange(8)) for j in range(4)], 1)
    np.testing.assert_allclose(np.asarray(fq), ref, rtol=1e-5, atol=1e-6)
    mask = (np.abs(ref - w) <= trust * step / 2 * (1 + 1e-6)).astype(np.float32)
    if trust >= 1:  # everything inside the grid is trusted; only far outliers lose their gradient
        assert mask[np.abs(w) <= amax].all() and not mask.all()
    np.testing.assert_array_equal(np.asarray(grad), g * mask)
    np.testing.assert_array_equal(np.asarray(fq), np.asarray(jax.jit(lambda v: S.fake_quant(v, sch, lay))(w)))


def test_trust_gradient_of_activations_is_the_numpy_mask():
    x = np.random.default_rng(3).standard_t(3, size=(5, 32)).astype(np.float32)
    g = np.random.default_rng(4).normal(size=x.shape).astype(np.float32)
    y, grad = _value_and_vjp(lambda u: S.fake_quant_act(u, "int4", (1,), 0.7, 1.0), x, g)
    np.testing.assert_array_equal(np.asarray(S.fake_quant_act(jnp.asarray(x), "int4", (1,), 0.7, 1.0)),
                                  np.asarray(ops.fake_quantize_activations(jnp.asarray(x), "int4", (1,), 0.7)))
    step = 0.7 * np.abs(x).max(1, keepdims=True) / 7
    ref = np.clip(np.round(x / step), -7, 7) * step
    np.testing.assert_allclose(np.asarray(y), ref, rtol=1e-6, atol=1e-6)
    mask = np.abs(ref - x) <= step / 2 * (1 + 1e-6)
    assert not mask.all()  # the clipped tail gets no gradient
    np.testing.assert_array_equal(np.asarray(grad), g * mask)
    with pytest.raises(ValueError, match="int activations"):
        S.fake_quant_act(jnp.asarray(x), "fp8_e4m3", (1,), 1.0, 1.0)
    with pytest.raises(ValueError, match="trust factor must be > 0"):
        S.trust_mask(jnp.zeros(2), jnp.zeros(2), jnp.ones(2), 0.0)


def test_trust_option_is_validated():
    rule = {"pattern": ".*kernel", "method": "qat", "format": "int4", "range": "gaussian"}
    bad = recipe_from_dict({"rules": [{**rule, "options": {"ste": "trust", "lsq": True}}]})
    with pytest.raises(ValueError, match="ste: trust .* needs lsq: false"):
        qat.qat_options(bad.rules[0])
    stray = recipe_from_dict({"rules": [{**rule, "options": {"trust": 2.0}}]})
    with pytest.raises(ValueError, match="set ste: trust or drop trust"):
        qat.qat_options(stray.rules[0])
    fp = recipe_from_dict({"rules": [{"pattern": ".*", "method": "qat", "format": "fp8_e4m3",
                                      "options": {"ste": "trust"}}]})
    with pytest.raises(ValueError, match="uniform"):
        qat.fake_quantize(qat.init({"d": {"kernel": jnp.ones((8, 4))}}, fp), fp)


# ------------------------------------------------------------------------------------------------- tiny Llama

TINY = dataclasses.replace(LlamaConfig.tiny(vocab_size=64), n_layers=1)


def _windows(n: int = 16, seq: int = 16) -> np.ndarray:
    rng = np.random.default_rng(3)
    start, step = rng.integers(0, 64, size=(n, 1)), rng.integers(1, 3, size=(n, 1))
    return ((start + step * np.arange(seq)) % 64).astype(np.int32)


def test_quest_recipes_load_with_their_grids():
    for bits in (4, 3, 2):
        r = load_recipe(REPO / "configs" / f"quest_w{bits}a{bits}.yaml")
        sch = r.rules[0].scheme
        assert qat.qat_options(r.rules[0])["ste"] == "trust" and sch.range == "gaussian"
        assert sch.act == sch.format == f"int{bits}" and str(sch.policy.rotation) == "hadamard"
        base = load_recipe(REPO / "configs" / f"qat_ste_w{bits}a{bits}.yaml")  # its plain-STE baseline, same grid
        b = base.rules[0].scheme
        assert qat.qat_options(base.rules[0])["ste"] == "identity" and b.range == "minmax"
        assert (b.act, b.format, b.group_size, str(b.policy.rotation)) == (sch.act, sch.format, sch.group_size,
                                                                            "hadamard")
    tern = load_recipe(REPO / "configs" / "quest_ternary_a8.yaml")
    w = {"mlp": {"kernel": jnp.asarray(np.random.default_rng(0).normal(size=(256, 8)).astype(np.float32))}}
    q = jq.quantize_params(w, tern)["mlp"]["kernel"]
    assert set(np.unique(np.asarray(q.unpacked_codes()))) == {-1, 0, 1} and q.policy.act == "int8"


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(16, name="Dense_1")(nn.relu(nn.Dense(32, name="Dense_0")(x)))


@pytest.mark.parametrize("bits", [4, 2])
def test_quest_forward_equals_converted_model(bits):
    # the fake-quantized forward (weights in the rotated basis, inputs rotated then quantized, trust gradients) =
    # the converted QTensor model through jq.ops (online rotation, per-token activation quantization)
    recipe = load_recipe(REPO / "configs" / f"quest_w{bits}a{bits}.yaml")
    x = jax.random.normal(jax.random.PRNGKey(1), (6, 24))
    model = MLP()
    qp = qat.init(model.init(jax.random.PRNGKey(0), x)["params"], recipe)
    assert qp["quant"] == {}
    conv = qat.convert(qp, recipe)
    q = conv["Dense_0"]["kernel"]
    assert str(q.policy.rotation) == "hadamard" and q.policy.act == q.fmt == f"int{bits}"
    y_q = jax.jit(lambda c: jq.interop.apply(model, {"params": c}, x))(conv)
    y_fq = jax.jit(lambda p: qat.apply(model, {"params": qat.fake_quantize(p, recipe)}, x, cfg=recipe))(qp)
    np.testing.assert_allclose(np.asarray(y_fq), np.asarray(y_q), rtol=1e-4, atol=1e-4 * float(jnp.abs(y_q).max()))


def test_act_ste_sets_the_activations_estimator_apart_from_the_weights():
    """The input gradient sees only the activations' estimator (the weights enter by value): act_ste: identity under
    ste: trust gives plain STE's input gradient, act_ste: trust under ste: identity QuEST's masked one."""
    rule = {"pattern": ".*kernel", "method": "qat", "format": "int4", "symmetric": False, "zero_point": "float",
            "group_size": 8, "range": "gaussian", "rotate": "hadamard", "act": "int4", "act_clip": 0.5}
    x = jax.random.normal(jax.random.PRNGKey(1), (6, 16))
    model = MLP()
    params = model.init(jax.random.PRNGKey(0), x)["params"]

    def input_grad(options):
        r = recipe_from_dict({"rules": [{**rule, "options": options}]})
        qp = qat.init(params, r)
        return np.asarray(jax.grad(lambda u: qat.apply(model, {"params": qat.fake_quantize(qp, r)}, u,
                                                       cfg=r).sum())(x))

    plain, quest = input_grad({"ste": "identity"}), input_grad({"ste": "trust"})
    assert not np.allclose(plain, quest)  # clipping at half the abs-max: the trust mask drops some gradient
    np.testing.assert_array_equal(input_grad({"ste": "trust", "act_ste": "identity"}), plain)
    np.testing.assert_array_equal(input_grad({"ste": "identity", "act_ste": "trust"}), quest)
    bad = recipe_from_dict({"rules": [{**rule, "options": {"act_ste": "clipped"}}]})
    with pytest.raises(ValueError, match="option act_ste='clipped' .* choose identity or trust"):
        qat.qat_options(bad.rules[0])
    factor = recipe_from_dict({"rules": [{**rule, "options": {"act_ste": "trust", "trust": 2.0}}]})
    assert qat.qat_options(factor.rules[0])["trust"] == 2.0  # the factor serves the activations' trust alone
    zero = recipe_from_dict({"rules": [{**rule, "options": {"act_ste": "trust", "trust": 0.0}}]})
    with pytest.raises(ValueError, match=r"act_ste: trust needs a trust factor > 0; got trust=0.0"):
        qat.qat_options(zero.rules[0])


def test_quest_w4a4_llama_training_lowers_the_loss():
    recipe = load_recipe(REPO / "configs" / "quest_w4a4.yaml")
    model, params = Llama(TINY), jax.jit(init_params, static_argnums=0)(TINY, jax.random.PRNGKey(0))
    ids = jnp.asarray(_windows())

    def loss_fn(p, batch):
        logits = qat.apply(model, {"params": p}, batch, cfg=recipe)
        return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], batch[:, 1:]).mean()

    opt = optax.adam(3e-3)
    step = qat.make_train_step(loss_fn, opt, recipe, donate=False)
    state = qat.init_train_state(qat.init(params, recipe), opt)
    losses = []
    for _ in range(3):
        state, m = step(state, ids[None])
        losses.append(float(m["loss"]))
    assert np.isfinite(losses).all() and losses[-1] < losses[0] - 0.01, losses


def test_progressive_grids_are_refused_by_qat_naming_the_leaf():
    cfg = recipe_from_dict({"name": "p", "rules": [
        {"pattern": ".*kernel", "method": "qat", "format": "int4", "symmetric": False, "group_size": 32,
         "progressive": True}]})
    with pytest.raises(ValueError, match=r"dense/kernel: QAT does not train progressive \(QoQ\) grids"):
        qat.init({"dense": {"kernel": jnp.ones((64, 8))}}, cfg)


def test_the_trust_estimator_refuses_a_non_uniform_grid():
    sch = Scheme("nf4", group_size=32)
    layout = sch.layout((64, 8), (0,))
    with pytest.raises(ValueError, match=r"ste='trust' needs a uniform \(int\) grid, but this weight uses format "
                                         r"'nf4'; use an int format or ste: identity / clipped"):
        S.fake_quant(jnp.ones((64, 8)), sch, layout, mode="trust")
