"""jq.qat: STE and LSQ gradients against NumPy, fake-quant forward = PTQ = convert for every format and granularity,
QAT options validated, linen and NNX MLPs whose fake-quantized forward is the converted model's, and a start from a
GPTQ result (tests/qat/test_qat_llama.py trains a tiny Llama; tests/apps/test_finetune.py runs `jq qat`)."""

from __future__ import annotations

from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jqtest.checkpoints import _same

import jq
import jq.interop
from jq import qat
from jq.numbers.qtensor import QTensor
from jq.numbers.scheme import Scheme
from jq.tree.recipe import QuantConfig, Rule, recipe_from_dict

REPO = Path(__file__).resolve().parents[2]


def _is_q(x) -> bool:
    return isinstance(x, QTensor)


# ------------------------------------------------------------------------------------------- gradients vs NumPy


def test_plain_ste_gradient_is_identity_or_clipped():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(32, 6)).astype(np.float32)
    w[3, 1] = 9.0  # far outside the 90th-percentile clip
    sch = Scheme("int4", range="percentile", percentile=90.0, scale_dtype="float32")
    lay = sch.layout(w.shape, (0,))
    c = rng.normal(size=w.shape).astype(np.float32)

    def grad(mode):
        return np.asarray(jax.grad(lambda x: jnp.sum(qat.fake_quant(x, sch, lay, mode) * c))(jnp.asarray(w)))

    np.testing.assert_array_equal(grad("identity"), c)
    lo, hi = np.percentile(w, [10.0, 90.0], axis=0, keepdims=True)
    s = (np.maximum(np.abs(lo), np.abs(hi)) / np.float32(7.5)).astype(np.float32)
    v = w / s
    inside = (v >= -8) & (v <= 7)  # int4 codes -8..7
    assert 0 < (~inside).sum() < inside.size
    np.testing.assert_array_equal(grad("clipped"), c * inside)


@pytest.mark.parametrize(
    "sch",
    [Scheme("int4", scale_dtype="float32"), Scheme("int3", symmetric=False, group_size=8, scale_dtype="float32")],
    ids=["int4-sym-channel", "int3-asym-g8"],
)
def test_lsq_gradients_match_the_paper(sch):
    """dŵ/dw = 1 inside, 0 outside; dŵ/ds = g·(round(v) − v) inside, g·(Q_n − z) / g·(Q_p − z) outside;
    dŵ/dz = −g·s outside; g = 1/sqrt(N·Q_p) (Esser et al. 2019), all against a NumPy transcription."""
    rng = np.random.default_rng(1)
    w = rng.normal(size=(16, 4)).astype(np.float32)
    lay = sch.layout(w.shape, (0,))
    q = dict(qat.ste.lsq_init(jnp.asarray(w), sch, lay))
    q["scale"] = q["scale"] * 0.6  # a smaller step than the range: some weights clip
    if "zero" in q:
        q["zero"] = q["zero"] + 0.3  # a learned, non-integer zero point (the forward rounds it)
    c = rng.normal(size=w.shape).astype(np.float32)
    gw, gq = jax.grad(lambda w_, q_: jnp.sum(qat.lsq_fake_quant(w_, q_, sch, lay) * c), argnums=(0, 1))(
        jnp.asarray(w), q)

    g = 8 if sch.granularity == "group" else 16  # weights per step size
    qn, qp = (0, 7) if not sch.symmetric else (-8, 7)
    assert qat.lsq_grad_scale(sch, lay) == pytest.approx(1 / np.sqrt(g * 7))
    wg, cg = w.reshape(16 // g, g, 4), c.reshape(16 // g, g, 4)
    s = np.asarray(q["scale"]).reshape(16 // g, 1, 4)
    z = np.clip(np.round(np.asarray(q["zero"])), 0, 7).reshape(16 // g, 1, 4) if "zero" in q else 0.0
    v = wg / s + z
    inside = (v >= qn) & (v <= qp)
    assert 0 < (~inside).sum()
    code = np.clip(np.round(v), qn, qp)
    gscale = 1 / np.sqrt(g * 7)
    ds = gscale * np.sum(cg * np.where(inside, code - v, code - z), axis=1)
    np.testing.assert_array_equal(np.asarray(gw), (cg * inside).reshape(w.shape))
    np.testing.assert_allclose(np.asarray(gq["scale"]), ds.reshape(q["scale"].shape), rtol=1e-5, atol=1e-6)
    if "zero" in q:
        dz = gscale * np.sum(cg * -s * ~inside, axis=1)
        np.testing.assert_allclose(np.asarray(gq["zero"]), dz.reshape(q["zero"].shape), rtol=1e-5, atol=1e-6)


def test_rotated_lsq_gradient_is_the_clip_mask_seen_in_the_rotated_basis():
    """`rotate: hadamard`: ŵ = Q fq(Qᵀ W), so dŵ/dW·c = Q (inside ⊙ Qᵀ c) with the clip mask of the rotated weight
    (NumPy, with the dense Q of jq.numbers.hadamard), and the step-size gradients are those of fq at Qᵀ W."""
    from jq.numbers.hadamard import rotation_matrix

    rng = np.random.default_rng(6)
    w = rng.standard_t(4, size=(48, 8)).astype(np.float32)  # 48: a Hadamard basis that is not symmetric
    sch = Scheme("int4", symmetric=False, group_size=16, zero_point="float", scale_dtype="float32", rotate="hadamard")
    cfg = QuantConfig(rules=(Rule("l/kernel", sch, "qat", options=(("lsq", True),)),))
    qp = qat.init({"l": {"kernel": jnp.asarray(w)}}, cfg)
    qp["quant"]["l"]["kernel"]["scale"] = qp["quant"]["l"]["kernel"]["scale"] * 0.7  # some rotated weights clip
    c = rng.normal(size=w.shape).astype(np.float32)
    grads = jax.grad(lambda p: jnp.sum(qat.fake_quantize(p, cfg)["l"]["kernel"] * c))(qp)

    r = np.asarray(rotation_matrix(48), np.float64)  # hadamard_transform(W, axis=0) = Qᵀ W
    v = (r.T @ w).reshape(3, 16, 8)
    s = np.asarray(qp["quant"]["l"]["kernel"]["scale"]).reshape(3, 1, 8)
    z = np.asarray(qp["quant"]["l"]["kernel"]["zero"]).reshape(3, 1, 8)
    inside = ((v / s + z >= 0) & (v / s + z <= 15)).reshape(48, 8)
    assert 0 < (~inside).sum() < inside.size
    np.testing.assert_allclose(np.asarray(grads["params"]["l"]["kernel"]), r @ (inside * (r.T @ c)), rtol=1e-4,
                               atol=1e-5)
    lay = sch.layout(w.shape, (0,))
    _, gq = jax.grad(lambda v_, q_: jnp.sum(qat.lsq_fake_quant(v_, q_, sch, lay) * (r.T @ c).astype(np.float32)),
                     argnums=(0, 1))(jnp.asarray((r.T @ w).astype(np.float32)), qp["quant"]["l"]["kernel"])
    for k in ("scale", "zero"):
        np.testing.assert_allclose(np.asarray(grads["quant"]["l"]["kernel"][k]), np.asarray(gq[k]), rtol=1e-4,
                                   atol=1e-6)


def test_lsq_paper_initialisation():
    w = np.random.default_rng(4).normal(size=(16, 4)).astype(np.float32)
    sch = Scheme("int4", group_size=8, scale_dtype="float32")
    q = qat.ste.lsq_init(jnp.asarray(w), sch, sch.layout(w.shape, (0,)), "paper")
    ref = 2 * np.abs(w.reshape(2, 8, 4)).mean(axis=1) / np.sqrt(7)  # s = 2<|w|>/sqrt(Q_p)
    np.testing.assert_allclose(np.asarray(q["scale"]), ref, rtol=1e-6)


# ------------------------------------------------------------------------------ forward = PTQ, every format


SCHEMES = [  # (scheme, weight shape): every format and granularity, symmetric and not, padded and flat groups
    (Scheme("int2", restricted=True, granularity="tensor", range="absmean", scale_dtype="float32"), (48, 20)),
    (Scheme("int3", symmetric=False, group_size=16), (48, 20)),
    (Scheme("int4", symmetric=False, group_size=16, flat_groups=True), (20, 48)),
    (Scheme("int4", group_size=20, pad=True), (48, 20)),
    (Scheme("int5", symmetric=False, granularity="channel", zero_point="float"), (48, 20)),
    (Scheme("int6", range="mse", mse_grid=10), (48, 20)),
    (Scheme("int4", range="percentile", percentile=99.0, group_size=16), (48, 20)),
    (Scheme("int8", restricted=True, axes=(0, 1), group_size=4), (4, 8, 12)),
    (Scheme("fp8_e4m3"), (48, 20)),
    (Scheme("fp8_e5m2", granularity="tensor"), (48, 20)),
    (Scheme("fp4_e2m1", group_size=16), (48, 20)),
    (Scheme("nf4", group_size=16, scale_dtype="bfloat16"), (48, 20)),
    (Scheme("int4", symmetric=False, group_size=16, rotate="hadamard"), (48, 20)),  # stored as Qᵀ W
    (Scheme("int3", symmetric=False, group_size=20, pad=True, zero_point="float", rotate="hadamard"), (48, 20)),
]


def _zoo():
    rng = np.random.default_rng(2)
    params, rules = {}, []
    for i, (sch, shape) in enumerate(SCHEMES):
        params[f"l{i}"] = {"kernel": jnp.asarray(rng.standard_t(5, size=shape).astype(np.float32))}
        rules.append(Rule(f"l{i}/kernel", sch, "qat", options=(("lsq", i % 2 == 1),)))
    return params, QuantConfig(rules=tuple(rules))


def test_fake_quant_and_convert_equal_ptq_for_every_format_and_granularity():
    """At initialisation (learned steps start at RTN's), fake quantization is the PTQ model bit for bit, and
    convert returns the PTQ QTensors bit for bit, with and without learned step sizes."""
    params, cfg = _zoo()
    qp = qat.init(params, cfg)
    assert set(qp["quant"]) == {f"l{i}" for i in range(1, len(SCHEMES), 2)}
    ptq = jq.quantize_params(params, cfg)
    _same(qat.convert(qp, cfg), ptq)

    @jax.jit
    def fake_and_grad(qp):
        fq = qat.fake_quantize(qp, cfg)
        return fq, jax.grad(lambda p: sum(jnp.sum(x) for x in jax.tree_util.tree_leaves(qat.fake_quantize(p, cfg))))(qp)

    fq, grads = fake_and_grad(qp)
    _same(fq, jax.jit(jq.dequantize_params)(ptq))
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree_util.tree_leaves(grads))
    assert all(float(jnp.abs(x).sum()) > 0 for x in jax.tree_util.tree_leaves(grads["quant"]))


def test_qat_options_are_validated():
    with pytest.raises(ValueError, match="lsqq"):  # refused with the recipe, before any training
        recipe_from_dict({"rules": [{"pattern": ".*kernel", "method": "qat", "options": {"lsq": True, "lsqq": 1},
                                     "format": "int4"}]})
    cfg = recipe_from_dict({"rules": [{"pattern": ".*kernel", "method": "qat", "options": {"ste": "wiggly"},
                                       "format": "int4"}]})
    with pytest.raises(ValueError, match="option ste='wiggly'; choose one of"):
        qat.init({"d": {"kernel": jnp.ones((8, 8))}}, cfg)
    cfg = recipe_from_dict({"rules": [{"pattern": ".*kernel", "method": "qat", "options": {"lsq": True},
                                       "format": "int4"}]})
    with pytest.raises(ValueError, match="jq.qat.init"):
        qat.fake_quantize({"params": {"d": {"kernel": jnp.ones((8, 8))}}, "quant": {}}, cfg)
    # what QAT cannot train is refused by leaf, at init and inside the loss alike
    rot = recipe_from_dict({"rules": [{"pattern": ".*kernel", "method": "qat", "format": "int4",
                                       "rotate": "hadamard"}]})
    for fn in (lambda p: qat.init(p, rot), lambda p: qat.fake_quantize({"params": p, "quant": {}}, rot)):
        with pytest.raises(ValueError, match=r"d/kernel: rotate: hadamard along axis 0 of length 6, which has no "
                                             r"Hadamard construction"):
            fn({"d": {"kernel": jnp.ones((6, 8))}})
    outlier = recipe_from_dict({"rules": [{"pattern": ".*kernel", "method": "qat", "format": "int8", "act": "int8",
                                           "act_outlier": 6.0}]})
    with pytest.raises(ValueError, match=r"d/kernel: QAT does not train schemes with act_outlier"):
        qat.init({"d": {"kernel": jnp.ones((8, 8))}}, outlier)


# ------------------------------------------------------------------------------------------ linen and NNX MLPs

MLP_CFG = QuantConfig(rules=(
    Rule(".*0/kernel", Scheme("int4", symmetric=False, group_size=8, rotate="hadamard"), "qat",  # x Q · Qᵀ W
         options=(("lsq", True),)),
    Rule(".*1/kernel", Scheme("int8", restricted=True, act="int8"), "qat"),  # W8A8: activations too
))


class LinenMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(16, name="Dense_1")(nn.relu(nn.Dense(32, name="Dense_0")(x)))


class NNXMLP(nnx.Module):
    def __init__(self, rngs):
        self.lin0 = nnx.Linear(24, 32, rngs=rngs)
        self.lin1 = nnx.Linear(32, 16, rngs=rngs)

    def __call__(self, x):
        return self.lin1(jax.nn.relu(self.lin0(x)))


def _one_adam_step(qp, loss):
    opt = optax.adam(1e-2)

    @jax.jit
    def step(qp):
        grads = jax.grad(loss)(qp)
        updates, _ = opt.update(grads, opt.init(qp), qp)
        return optax.apply_updates(qp, updates), grads

    return step(qp)


def test_linen_mlp_fake_quant_forward_equals_converted_model():
    x = jax.random.normal(jax.random.PRNGKey(1), (5, 24))
    model = LinenMLP()
    qp = qat.init(model.init(jax.random.PRNGKey(0), x)["params"], MLP_CFG)

    def forward(qp):
        return qat.apply(model, {"params": qat.fake_quantize(qp, MLP_CFG)}, x, cfg=MLP_CFG)

    qp, grads = _one_adam_step(qp, lambda p: jnp.sum(forward(p) ** 2))
    assert float(jnp.abs(grads["quant"]["Dense_0"]["kernel"]["scale"]).sum()) > 0
    y_q = jax.jit(lambda q: jq.interop.apply(model, {"params": q}, x))(qat.convert(qp, MLP_CFG))
    np.testing.assert_allclose(np.asarray(jax.jit(forward)(qp)), np.asarray(y_q), rtol=1e-5, atol=1e-5)
    y_weights_only = jax.jit(lambda p: model.apply({"params": qat.fake_quantize(p, MLP_CFG)}, x))(qp)
    assert float(jnp.max(jnp.abs(y_weights_only - y_q))) > 1e-6  # the int8 activations are part of both


@pytest.mark.parametrize("zero_point,rotate", [("float", None), ("int", None), ("float", "hadamard")])
def test_init_from_a_gptq_result_starts_at_the_ptq_model(zero_point, rotate):
    """QAT started from GPTQ output: step 0's fake-quantized weights are GPTQ's dequantized ones, and converting
    without training gives back GPTQ's codes, scales and zeros (and rotation: learned in the rotated basis)."""
    k, n = 96, 40
    w = jax.random.normal(jax.random.PRNGKey(3), (k, n)) * 0.05
    x = jax.random.normal(jax.random.PRNGKey(4), (256, k)) * jnp.linspace(0.2, 3.0, k)
    rule = dict(format="int3", symmetric=False, group_size=32, pad=True, zero_point=zero_point)
    if rotate:
        rule["rotate"] = rotate
    gptq_cfg = recipe_from_dict({"rules": [{"pattern": ".*kernel", "method": "gptq", "options": {"refit": True},
                                            **rule}]})
    qat_cfg = recipe_from_dict({"rules": [{"pattern": ".*kernel", "method": "qat", "options": {"lsq": True}, **rule}]})
    calib = {"mlp": {"kernel": {"hessian": x.T @ x / 256, "count": jnp.float32(256)}}}
    ptq = jq.quantize_params({"mlp": {"kernel": w}, "norm": jnp.ones(k)}, gptq_cfg, calib)
    qp = qat.init_from(ptq, qat_cfg)
    g = ptq["mlp"]["kernel"]
    np.testing.assert_array_equal(np.asarray(qp["params"]["mlp"]["kernel"]), np.asarray(g.dequantize()))
    assert qp["params"]["norm"] is ptq["norm"]
    fq = qat.fake_quantize(qp, qat_cfg)["mlp"]["kernel"]
    np.testing.assert_allclose(np.asarray(fq), np.asarray(g.dequantize()), rtol=0, atol=1e-6)
    back = qat.convert(qp, qat_cfg)["mlp"]["kernel"]
    np.testing.assert_array_equal(np.asarray(back.unpacked_codes()), np.asarray(g.unpacked_codes()))
    np.testing.assert_array_equal(np.asarray(back.scale), np.asarray(g.scale))
    np.testing.assert_array_equal(np.asarray(back.zero), np.asarray(g.zero))
    assert back.policy.rotation == g.policy.rotation == jq.numbers.hadamard.Rotation.parse(rotate)


def test_init_from_refuses_a_ptq_grid_the_recipe_cannot_learn():
    k, n = 64, 16
    w = {"mlp": {"kernel": jax.random.normal(jax.random.PRNGKey(0), (k, n))}}
    calib = {"mlp": {"kernel": {"hessian": jnp.diag(jnp.linspace(1.0, 2.0, k))}}}
    qat_cfg = recipe_from_dict({"rules": [{"pattern": ".*kernel", "method": "qat", "options": {"lsq": True},
                                           "format": "int4", "symmetric": False, "group_size": 32}]})
    for extra, match in (({"group_size": 16}, "layout"), ({"zero_point": "float"}, "zero point"),
                         ({"options": {"act_order": True}}, "perm"), ({"rotate": "hadamard"}, "rotation")):
        rule = {"pattern": ".*kernel", "method": "gptq", "format": "int4", "symmetric": False, "group_size": 32,
                **extra}
        ptq = jq.quantize_params(w, recipe_from_dict({"rules": [rule]}), calib)
        with pytest.raises(ValueError, match=f"mlp/kernel.*{match}"):
            qat.init_from(ptq, qat_cfg)


def test_nnx_mlp_fake_quant_forward_equals_converted_model():
    x = jax.random.normal(jax.random.PRNGKey(1), (5, 24))
    graphdef, state = nnx.split(NNXMLP(nnx.Rngs(0)))
    qp = qat.init(state, MLP_CFG)
    assert set(qp["quant"]) == {"lin0"}

    def forward(qp):
        return qat.nnx_merge(graphdef, qat.fake_quantize(qp, MLP_CFG), cfg=MLP_CFG)(x)

    qp, _ = _one_adam_step(qp, lambda p: jnp.sum(forward(p) ** 2))
    y_q = jax.jit(lambda q: jq.interop.nnx_merge(graphdef, q)(x))(qat.convert(qp, MLP_CFG))
    np.testing.assert_allclose(np.asarray(jax.jit(forward)(qp)), np.asarray(y_q), rtol=1e-5, atol=1e-5)
