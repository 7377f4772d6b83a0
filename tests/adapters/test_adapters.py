"""jq.adapters: the LowRank leaf in the forward (NumPy reference, linen and NNX), QA-LoRA's exact integer merge,
LoftQ's falling residual, LoRC's weighted fit and honest size, PEQA's scale-only tuning, adapter files, and the
refusals (rank, shapes, paths, merges that would not be exact)."""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jq
import jq.interop
from jq import checkpoint
from jq import adapters as A
from jq import ops
from jq.algorithms.lowrank import low_rank_fit
from jq.algorithms.stats import LayerStats
from jq.numbers.lowrank import LowRank
from jq.numbers.qtensor import QTensor
from jq.numbers.scheme import Scheme

INT4 = jq.QuantConfig.simple(Scheme("int4", group_size=16, symmetric=False))


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.relu(nn.Dense(48, name="up")(x))
        y = nn.DenseGeneral((2, 8), name="heads")(h)  # kernel [48, 2, 8]
        return nn.Dense(32, name="down")(y.reshape(y.shape[:-2] + (16,)))


@pytest.fixture(scope="module")
def mlp():
    model = MLP()
    x = jax.random.normal(jax.random.PRNGKey(1), (3, 5, 32))
    params = model.init(jax.random.PRNGKey(0), x)["params"]
    qparams = jq.quantize_params(params, INT4, warn_unmatched=False)
    return model, x, params, qparams


def _random_factors(adapters, seed=7):
    """Adapters with b drawn too (init's b = 0 would hide the adapter path)."""
    leaves, tree = jax.tree_util.tree_flatten(adapters)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    return jax.tree_util.tree_unflatten(tree, [0.1 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])


# ------------------------------------------------------------------------------------------------ the leaf in ops

@pytest.mark.parametrize("base_kind", ["float", "int4"])
@pytest.mark.parametrize("pool", [1, 4, 5])
def test_lowrank_matmul_matches_numpy(base_kind, pool):
    rng = np.random.default_rng(0)
    w = rng.normal(size=(16, 12)).astype(np.float32)
    base = jnp.asarray(w) if base_kind == "float" else jq.quantize_params(
        {"k": {"kernel": jnp.asarray(w)}}, jq.QuantConfig.simple(Scheme("int4", group_size=4, symmetric=False)),
        warn_unmatched=False)["k"]["kernel"]
    a = rng.normal(size=(-(-16 // pool), 3)).astype(np.float32)
    b = rng.normal(size=(3, 12)).astype(np.float32)
    leaf = LowRank(base, jnp.asarray(a), jnp.asarray(b), scale=0.5, pool=pool)
    leaf.check()
    x = rng.normal(size=(2, 5, 16)).astype(np.float32)
    dense_base = np.asarray(base.dequantize(jnp.float32) if isinstance(base, QTensor) else base)
    rep = np.repeat(a, pool, axis=0)[:16]  # pool 5: a short last group
    ref = x @ (dense_base + 0.5 * rep @ b)
    np.testing.assert_allclose(np.asarray(ops.qdot(jnp.asarray(x), leaf)), ref, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(leaf.dequantize()), dense_base + 0.5 * rep @ b,
                               rtol=1e-5, atol=1e-5)
    # a transposed contraction (x [.., N] against the weight's out axis) takes the merged delta
    xt = rng.normal(size=(4, 12)).astype(np.float32)
    got = ops.qdot_general(jnp.asarray(xt), leaf, (((1,), (1,)), ((), ())))
    np.testing.assert_allclose(np.asarray(got), xt @ np.asarray(leaf.dequantize()).T, rtol=1e-4, atol=1e-4)


def test_dropout_drops_the_adapter_input_only():
    w = jnp.zeros((64, 8))
    leaf = LowRank(w, jnp.ones((64, 1)), jnp.ones((1, 8)), key=jax.random.PRNGKey(0), dropout=0.5)
    x = jnp.ones((4096, 64))
    y = ops.qdot(x, leaf)
    assert float(jnp.abs(y.mean() - 64.0)) < 1.0  # inverted dropout keeps the mean (64 inputs of 1)
    assert float(y.std()) > 4.0  # but each row saw a different mask
    np.testing.assert_array_equal(np.asarray(ops.qdot(x, dataclasses.replace(leaf, key=None))), 64.0)


def test_lowrank_check_names_the_leaf():
    leaf = LowRank(jnp.zeros((16, 8)), jnp.zeros((16, 2)), jnp.zeros((3, 8)))
    with pytest.raises(ValueError, match=r"layers/q/kernel: .*b shape \(3, 8\) != \(2, 8\)"):
        leaf.check("layers/q/kernel")


# ------------------------------------------------------------------------------------------- LoRA on linen / NNX

def test_lora_init_starts_at_the_base_and_combine_runs_like_the_merged_model(mlp):
    model, x, params, qparams = mlp
    cfg = A.LoraConfig(rank=4, alpha=8)
    ad = A.init(qparams, cfg, jax.random.PRNGKey(0))
    assert set(ad) == {"up", "heads", "down"} and ad["heads"]["kernel"]["a"].shape == (48, 4)
    assert ad["heads"]["kernel"]["b"].shape == (4, 2, 8)
    base_out = jq.interop.apply(model, {"params": qparams}, x)
    np.testing.assert_array_equal(np.asarray(jq.interop.apply(model, {"params": A.combine(qparams, ad, cfg)}, x)),
                                  np.asarray(base_out))
    ad = _random_factors(ad)
    got = jq.interop.apply(model, {"params": A.combine(qparams, ad, cfg)}, x)
    ref = model.apply({"params": A.merge(qparams, ad, cfg)}, x)
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-4, atol=1e-4)
    assert float(jnp.abs(got - base_out).max()) > 1e-2
    base, back = A.split(A.combine(qparams, ad, cfg))
    assert jax.tree_util.tree_structure(base, is_leaf=lambda q: isinstance(q, QTensor)) == \
        jax.tree_util.tree_structure(qparams, is_leaf=lambda q: isinstance(q, QTensor))
    for u, v in zip(jax.tree_util.tree_leaves(back), jax.tree_util.tree_leaves(ad)):
        np.testing.assert_array_equal(np.asarray(u), np.asarray(v))


def test_lora_gradients_equal_those_of_the_merged_float_model(mlp):
    """The adapter path ((x a) b beside the packed matmul) and the merged dense weight differentiate the same."""
    model, x, params, qparams = mlp
    cfg = A.LoraConfig(rank=4)
    ad = _random_factors(A.init(qparams, cfg, jax.random.PRNGKey(0)))
    routed = jax.grad(lambda t: jnp.mean(jq.interop.apply(model, {"params": A.combine(qparams, t, cfg)}, x) ** 2))(ad)
    merged = jax.grad(lambda t: jnp.mean(model.apply({"params": A.merge(qparams, t, cfg)}, x) ** 2))(ad)
    for u, v in zip(jax.tree_util.tree_leaves(routed), jax.tree_util.tree_leaves(merged)):
        np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=1e-4, atol=1e-6)
    assert float(jnp.abs(routed["up"]["kernel"]["a"]).max()) > 1e-3


def test_trainable_mask_freezes_a_float_base():
    params = {"d": {"kernel": jnp.ones((8, 4)), "bias": jnp.zeros(4)}}
    cfg = A.LoraConfig(rank=2)
    tree = A.combine(params, A.init(params, cfg, jax.random.PRNGKey(0)), cfg)
    mask = A.trainable_mask(tree)
    assert mask["d"]["kernel"].a is True and mask["d"]["kernel"].b is True and mask["d"]["kernel"].base is False
    assert mask["d"]["bias"] is False
    opt = A.only_adapters(optax.sgd(1.0), tree)
    grads = jax.tree_util.tree_map(jnp.ones_like, tree)
    new = optax.apply_updates(tree, opt.update(grads, opt.init(tree), tree)[0])
    np.testing.assert_array_equal(np.asarray(new["d"]["kernel"].base), 1.0)
    np.testing.assert_array_equal(np.asarray(new["d"]["kernel"].b), -1.0)


def test_lora_on_an_nnx_model():
    class Net(nnx.Module):
        def __init__(self, rngs):
            self.l1 = nnx.Linear(32, 16, rngs=rngs)
            self.l2 = nnx.Linear(16, 8, rngs=rngs)

        def __call__(self, x):
            return self.l2(nnx.relu(self.l1(x)))

    net = Net(nnx.Rngs(0))
    graphdef, state = nnx.split(net)
    qstate = jq.quantize_params(state, INT4, warn_unmatched=False)
    cfg = A.LoraConfig(rank=3)
    ad = _random_factors(A.init(qstate, cfg, jax.random.PRNGKey(0)))
    x = jax.random.normal(jax.random.PRNGKey(2), (4, 32))
    got = jq.interop.nnx_merge(graphdef, A.combine(qstate, ad, cfg))(x)
    ref = nnx.merge(graphdef, A.merge(qstate, ad, cfg))(x)
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-4, atol=1e-4)


def test_bad_adapters_are_refused_naming_the_leaf(mlp):
    _, _, params, qparams = mlp
    with pytest.raises(ValueError, match=r"down/kernel: rank 20 exceeds min\(in, out\) = min\(16, 32\)"):
        A.init(qparams, A.LoraConfig(rank=20), jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="selects no matrix"):
        A.init(qparams, A.LoraConfig(pattern="nothing"), jax.random.PRNGKey(0))
    cfg = A.LoraConfig(rank=4)
    ad = A.init(qparams, cfg, jax.random.PRNGKey(0))
    other = A.init(qparams, A.LoraConfig(rank=2), jax.random.PRNGKey(0))
    ad["up"]["kernel"]["b"] = other["up"]["kernel"]["b"]  # a resume with other shapes
    with pytest.raises(ValueError, match=r"up/kernel: .*b shape \(2, 48\) != \(4, 48\)"):
        A.combine(qparams, ad, cfg)
    stray = {"nope": {"kernel": {"a": jnp.zeros((2, 1)), "b": jnp.zeros((1, 2))}}}
    with pytest.raises(ValueError, match="nope/kernel: the adapters name 1 path"):
        A.combine(qparams, stray, cfg)
    with pytest.raises(ValueError, match="pooled .* need a base quantized in groups"):
        A.init(params, A.LoraConfig(rank=2, pooled=True), jax.random.PRNGKey(0))


def test_adapters_need_a_matmul_to_sit_beside(mlp):
    model, x, params, qparams = mlp
    cfg = A.LoraConfig(rank=2)
    A.check_routes(model, {"params": qparams}, A.init(qparams, cfg, jax.random.PRNGKey(0)), x)

    class Gate(nn.Module):
        @nn.compact
        def __call__(self, x):
            w = self.param("gate", nn.initializers.ones, (5, 32))
            return nn.Dense(4)(x * w)

    gp = Gate().init(jax.random.PRNGKey(0), x)["params"]
    ad = A.init(gp, A.LoraConfig(rank=2, pattern=".*"), jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="gate: an adapter needs a matmul to sit beside"):
        A.check_routes(Gate(), {"params": gp}, ad, x)


def test_adapters_save_and_load(mlp, tmp_path):
    _, _, _, qparams = mlp
    cfg = A.LoraConfig(rank=4, alpha=2.0, dropout=0.1)
    ad = _random_factors(A.init(qparams, cfg, jax.random.PRNGKey(0)))
    A.io.save(tmp_path / "ad", ad, cfg)
    back, cfg2 = A.io.load(tmp_path / "ad")
    assert cfg2 == cfg
    for u, v in zip(jax.tree_util.tree_leaves(back), jax.tree_util.tree_leaves(ad)):
        np.testing.assert_array_equal(np.asarray(u), np.asarray(v))
    float_base = {"d": {"kernel": LowRank(jnp.ones((8, 4)), jnp.ones((8, 2)), jnp.ones((2, 4)))}}
    with pytest.raises(ValueError, match="d/kernel: a LowRank leaf on a float base .* is not stored"):
        checkpoint.save(tmp_path / "mixed", float_base)
    assert not (tmp_path / "mixed").exists()


def test_a_lorc_model_round_trips_through_a_checkpoint(mlp, tmp_path):
    """LowRank leaves on QTensor bases are stored (format 2.0) and come back equal; load with a target and verify
    work; a tree without them is still written as 1.3."""
    model, x, params, qparams = mlp
    lq = A.lorc.compensate(params, qparams, 4)
    d = checkpoint.save(tmp_path / "lorc", lq)
    meta = checkpoint.read_meta(d)
    assert meta["format_version"] == "2.0" and meta["leaves"]["up/kernel"]["kind"] == "lowrank"
    back, _ = checkpoint.load(d)
    leaf = back["heads"]["kernel"]
    assert isinstance(leaf, LowRank) and isinstance(leaf.base, QTensor) and leaf.in_ndim == 1
    np.testing.assert_array_equal(np.asarray(leaf.b), np.asarray(lq["heads"]["kernel"].b))
    np.testing.assert_array_equal(np.asarray(jq.interop.apply(model, {"params": back}, x)),
                                  np.asarray(jq.interop.apply(model, {"params": lq}, x)))
    target = jax.eval_shape(lambda: lq)
    again, _ = checkpoint.load(d, target=target)
    assert isinstance(again["up"]["kernel"], LowRank)
    assert checkpoint.verify(d)["quantized"] == 3
    assert checkpoint.read_meta(checkpoint.save(tmp_path / "plain", qparams))["format_version"] == "1.3"


# ------------------------------------------------------------------------------------------------------- QA-LoRA

@pytest.mark.parametrize("group", [16, 12])
def test_qalora_merge_is_an_integer_model_with_the_unmerged_outputs(mlp, group):
    model, x, params, _ = mlp
    qparams = jq.quantize_params(params, jq.QuantConfig.simple(Scheme("int4", group_size=group, symmetric=False,
                                                                      pad=group == 12)), warn_unmatched=False)
    cfg = A.LoraConfig(rank=4, pooled=True)
    ad = A.init(qparams, cfg, jax.random.PRNGKey(0))
    assert ad["up"]["kernel"]["a"].shape == (-(-32 // group), 4)  # 32 inputs in groups (the last one short)
    ad = _random_factors(ad)
    unmerged = jq.interop.apply(model, {"params": A.combine(qparams, ad, cfg)}, x)
    merged = A.qalora.merge(qparams, ad, cfg)
    for name in ("up", "heads", "down"):
        q, q0 = merged[name]["kernel"], qparams[name]["kernel"]
        assert isinstance(q, QTensor)
        np.testing.assert_array_equal(np.asarray(q.codes), np.asarray(q0.codes))
        np.testing.assert_array_equal(np.asarray(q.scale), np.asarray(q0.scale))
    out = jq.interop.apply(model, {"params": merged}, x)
    np.testing.assert_allclose(np.asarray(out), np.asarray(unmerged), rtol=1e-5, atol=1e-5)
    assert float(jnp.abs(out - jq.interop.apply(model, {"params": qparams}, x)).max()) > 1e-2


def test_qalora_refuses_merges_that_would_not_be_exact(mlp):
    _, _, params, qparams = mlp
    with pytest.raises(ValueError, match="needs pooled adapters"):
        A.qalora.merge(qparams, A.init(qparams, A.LoraConfig(rank=2), jax.random.PRNGKey(0)), A.LoraConfig(rank=2))
    sym = jq.quantize_params(params, jq.QuantConfig.simple(Scheme("int4", group_size=16)), warn_unmatched=False)
    cfg = A.LoraConfig(rank=2, pooled=True)
    with pytest.raises(ValueError, match="down/kernel: the QA-LoRA merge would not be exact: .*no zero points"):
        A.qalora.merge(sym, A.init(sym, cfg, jax.random.PRNGKey(0)), cfg)
    leaf = LowRank(qparams["up"]["kernel"], jnp.zeros((4, 2)), jnp.zeros((2, 48)), pool=8)
    with pytest.raises(ValueError, match="x/kernel: .*pools 8 rows but the base is int4 asym g16"):
        A.qalora.merge_leaf("x/kernel", leaf)


# --------------------------------------------------------------------------------------------- LoftQ, LoRC, PEQA

def test_loftq_residual_falls_and_the_start_beats_zero_adapters():
    w = jax.random.normal(jax.random.PRNGKey(0), (64, 48)) * (1 + jnp.arange(48) / 8)
    params = {"l": {"kernel": w}}
    recipe = jq.QuantConfig.simple(Scheme("int2", group_size=16, symmetric=False))
    cfg = A.LoraConfig(rank=8, alpha=4)
    qp, ad, res = A.loftq.init(params, recipe, cfg, steps=4)
    r = res["l/kernel"]
    assert len(r) == 5 and r[2] < r[1] < 0.7 * r[0] and min(r) < r[1]  # the alternation beats one SVD
    plain = jq.quantize_params(params, recipe)["l"]["kernel"].dequantize()
    np.testing.assert_allclose(r[0], float(jnp.linalg.norm(w - plain) / jnp.linalg.norm(w)), rtol=1e-5)
    start = A.merge(qp, ad, cfg)["l"]["kernel"]
    np.testing.assert_allclose(float(jnp.linalg.norm(w - start) / jnp.linalg.norm(w)), min(r), rtol=1e-4)
    with pytest.raises(ValueError, match="needs calibration"):
        A.loftq.init(params, jq.QuantConfig.simple(Scheme("int2", group_size=16), method="gptq"), cfg)


def test_weighted_loftq_starts_closer_in_the_layer_output():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(256, 64)).astype(np.float32) * np.linspace(0.1, 3.0, 64).astype(np.float32)
    w = jnp.asarray(rng.normal(size=(64, 48)).astype(np.float32))
    params = {"l": {"kernel": w}}
    recipe = jq.QuantConfig.simple(Scheme("int2", group_size=16, symmetric=False))
    cfg = A.LoraConfig(rank=4, alpha=4)
    out = lambda qp, ad: float(np.linalg.norm(x @ (w - A.merge(qp, ad, cfg)["l"]["kernel"])))  # noqa: E731
    plain = A.loftq.init(params, recipe, cfg, steps=3)
    weighted = A.loftq.init(params, recipe, cfg, steps=3, stats={"l/kernel": LayerStats(hessian=jnp.asarray(x.T @ x))})
    assert out(*weighted[:2]) < 0.97 * out(*plain[:2])
    r = weighted[2]["l/kernel"]
    assert r[1] < r[0] and min(r) < r[1]  # measured in the output metric


def test_low_rank_fit_weighted_is_optimal_in_the_output_norm():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(256, 24)) * np.linspace(0.1, 3.0, 24)
    e = rng.normal(size=(24, 16))
    h = jnp.asarray(x.T @ x, jnp.float32)
    a, b = low_rank_fit(jnp.asarray(e), 4, h, damp=0.0)
    ap, bp = low_rank_fit(jnp.asarray(e), 4)
    out = lambda d: np.linalg.norm(x @ (e - d))  # noqa: E731
    assert out(np.asarray(a @ b)) < out(np.asarray(ap @ bp))
    # the weighted optimum: no random rank-4 perturbation of it does better
    for _ in range(20):
        da = rng.normal(size=a.shape) * 1e-2
        assert out(np.asarray(a @ b)) <= out(np.asarray((a + da) @ b)) + 1e-9
    with pytest.raises(ValueError, match="rank 17 must lie in"):
        low_rank_fit(jnp.asarray(e), 17)


def test_lorc_lowers_the_output_error_and_counts_its_bits():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(512, 64)).astype(np.float32) * np.linspace(0.2, 2.0, 64).astype(np.float32)
    w = rng.normal(size=(64, 96)).astype(np.float32)
    params = {"l": {"kernel": jnp.asarray(w)}}
    qp = jq.quantize_params(params, jq.QuantConfig.simple(Scheme("int3", group_size=32, symmetric=False)))
    stats = {"l/kernel": LayerStats(hessian=jnp.asarray(x.T @ x / len(x)))}
    plain = A.lorc.compensate(params, qp, 8)["l"]["kernel"]
    weighted = A.lorc.compensate(params, qp, 8, stats)["l"]["kernel"]
    err = lambda m: float(np.linalg.norm(x @ (w - np.asarray(m))))  # noqa: E731
    base_err = err(qp["l"]["kernel"].dequantize())
    assert err(weighted.dequantize()) < err(plain.dequantize()) < base_err
    assert weighted.a.dtype == jnp.float16 and isinstance(weighted.base, QTensor)
    q = qp["l"]["kernel"]
    np.testing.assert_allclose(weighted.bits_per_weight, q.bits_per_weight + 8 * (64 + 96) * 16 / (64 * 96))
    with pytest.raises(ValueError, match=r"l/kernel: Hessian shape \(3, 3\)"):
        A.lorc.compensate(params, qp, 8, {"l/kernel": LayerStats(hessian=jnp.eye(3))})


def test_peqa_tunes_scales_only(mlp):
    model, x, params, qparams = mlp
    scales = A.peqa.init(qparams)
    np.testing.assert_array_equal(np.asarray(jq.interop.apply(model, {"params": A.peqa.combine(qparams, scales)}, x)),
                                  np.asarray(jq.interop.apply(model, {"params": qparams}, x)))
    target = model.apply({"params": params}, x)

    def loss(s):
        return jnp.mean((jq.interop.apply(model, {"params": A.peqa.combine(qparams, s)}, x) - target) ** 2)

    opt = optax.adam(1e-3)
    state = opt.init(scales)
    first = float(loss(scales))
    for _ in range(20):
        g = jax.grad(loss)(scales)
        upd, state = opt.update(g, state)
        scales = optax.apply_updates(scales, upd)
    tuned = A.peqa.apply_scales(qparams, scales)
    assert float(jnp.mean((jq.interop.apply(model, {"params": tuned}, x) - target) ** 2)) < first
    q, q0 = tuned["up"]["kernel"], qparams["up"]["kernel"]
    np.testing.assert_array_equal(np.asarray(q.codes), np.asarray(q0.codes))
    np.testing.assert_array_equal(np.asarray(q.zero), np.asarray(q0.zero))
    assert q.scale.dtype == q0.scale.dtype and not np.array_equal(np.asarray(q.scale), np.asarray(q0.scale))


@pytest.mark.parametrize("scheme", [Scheme("int8", act="int8"), Scheme("int4", group_size=16, act="int8")])
def test_activation_quantized_bases_pass_straight_through_gradients(scheme):
    """Adapters in earlier layers learn through a W8A8 / W4A8 base: d(x·W)/dx is the dequantized W (straight
    through the activation rounding), on the integer path and the fallback alike; the forward is unchanged."""
    q = jq.quantize_params({"l": {"kernel": jax.random.normal(jax.random.PRNGKey(0), (32, 24))}},
                           jq.QuantConfig.simple(scheme))["l"]["kernel"]
    x = jax.random.normal(jax.random.PRNGKey(1), (5, 32))
    g = jax.grad(lambda x: jnp.sum(ops.qdot(x, q) * jnp.arange(24.0)))(x)
    want = np.broadcast_to(np.asarray(q.dequantize()) @ np.arange(24.0), (5, 32))
    np.testing.assert_allclose(np.asarray(g), want, rtol=1e-4, atol=1e-4)
