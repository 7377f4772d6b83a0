"""jq.qat: STE and LSQ gradients against NumPy, fake-quant forward = PTQ = convert for every format and granularity,
linen / NNX / Llama models (BitNet ternary included), a sharded step against the single-device step, bit-identical
resume from an Orbax checkpoint, distillation from a frozen float teacher, and the fine-tuning script on a tiny
model."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

import jq
import jq.interop
from jq import qat
from jq.tree.recipe import QuantConfig, Rule, load_recipe, recipe_from_dict
from jq.models.llama.config import LlamaConfig
from jq.models.llama.model import Llama, init_params
from jq.numbers.qtensor import QTensor
from jq.numbers.scheme import Scheme

REPO = Path(__file__).resolve().parents[2]


def _is_q(x) -> bool:
    return isinstance(x, QTensor)


def assert_trees_equal(a, b) -> None:
    """Same structure, every array leaf (QTensor fields included) equal bit for bit."""
    la, ta = jax.tree_util.tree_flatten(a)
    lb, tb = jax.tree_util.tree_flatten(b)
    assert ta == tb
    for x, y in zip(la, lb):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


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
    assert_trees_equal(qat.convert(qp, cfg), ptq)

    @jax.jit
    def fake_and_grad(qp):
        fq = qat.fake_quantize(qp, cfg)
        return fq, jax.grad(lambda p: sum(jnp.sum(x) for x in jax.tree_util.tree_leaves(qat.fake_quantize(p, cfg))))(qp)

    fq, grads = fake_and_grad(qp)
    assert_trees_equal(fq, jax.jit(jq.dequantize_params)(ptq))
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


# ------------------------------------------------------------------------------------------------- tiny Llama

TINY = dataclasses.replace(LlamaConfig.tiny(vocab_size=64), n_layers=1)  # one block: compile time
SEQ, MICRO, ACCUM = 16, 8, 2


def _windows(n: int = 64) -> np.ndarray:
    """Learnable token windows: each sequence counts up by a step from a random start (mod vocab)."""
    rng = np.random.default_rng(3)
    start, step = rng.integers(0, 64, size=(n, 1)), rng.integers(1, 3, size=(n, 1))
    return ((start + step * np.arange(SEQ)) % 64).astype(np.int32)


def _tiny_params():
    return jax.jit(init_params, static_argnums=0)(TINY, jax.random.PRNGKey(0))


def _lm_loss(model, act_cfg=None):
    def loss_fn(params, ids):
        logits = qat.apply(model, {"params": params}, ids, cfg=act_cfg)
        return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], ids[:, 1:]).mean()

    return loss_fn


@pytest.fixture(scope="module")
def llama():
    """The tiny Llama under configs/qat_w4_g128.yaml (int4 g128 flat groups, LSQ+), with one jitted train step on
    a 2x4 (data, fsdp) mesh and one on a single device, shared by the tests below (each compiles once)."""
    recipe = load_recipe(REPO / "configs" / "qat_w4_g128.yaml")
    model = Llama(TINY)
    params = _tiny_params()
    opt = optax.adam(3e-3)
    mesh = qat.make_mesh(data=2, fsdp=4)
    loss_fn = _lm_loss(model)
    return {
        "recipe": recipe, "model": model, "params": params, "opt": opt, "mesh": mesh,
        "step_mesh": qat.make_train_step(loss_fn, opt, recipe, mesh=mesh),
        "step_one": qat.make_train_step(loss_fn, opt, recipe, donate=False),
    }


def _run(step, state, batches, n, mesh=None):
    losses = []
    for _ in range(n):
        state, m = step(state, qat.shard_batch(next(batches), mesh))
        losses.append(float(m["loss"]))
    return state, losses


def test_sharded_step_equals_single_device_step(llama):
    mesh = llama["mesh"]
    qp = qat.init(llama["params"], llama["recipe"])
    s_mesh = qat.init_train_state(qp, llama["opt"], mesh)
    kernel = s_mesh["params"]["params"]["layers_0"]["mlp"]["gate_proj"]["kernel"]  # (32, 64): fsdp on dim 1
    assert kernel.sharding.spec == P(None, "fsdp")
    s_mesh, l_mesh = _run(llama["step_mesh"], s_mesh, qat.WindowBatches(_windows(), MICRO, ACCUM), 2, mesh)
    s_one, l_one = _run(llama["step_one"], qat.init_train_state(qp, llama["opt"]),
                        qat.WindowBatches(_windows(), MICRO, ACCUM), 2)
    np.testing.assert_allclose(l_mesh, l_one, rtol=1e-5)
    assert s_mesh["params"]["params"]["layers_0"]["mlp"]["gate_proj"]["kernel"].sharding.spec == P(None, "fsdp")
    for a, b in zip(jax.tree_util.tree_leaves(s_mesh), jax.tree_util.tree_leaves(s_one)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


def test_gradient_accumulation_takes_the_same_step_as_one_big_batch(llama):
    """ACCUM micro-batches of MICRO windows = one batch of ACCUM·MICRO windows (same windows, same order): what lets
    a user trade the [batch, seq, vocab] logits' memory for time without changing the run."""
    qp = qat.init(llama["params"], llama["recipe"])
    s_acc, l_acc = _run(llama["step_one"], qat.init_train_state(qp, llama["opt"]),
                        qat.WindowBatches(_windows(), MICRO, ACCUM, seed=2), 2)
    s_big, l_big = _run(llama["step_one"], qat.init_train_state(qp, llama["opt"]),
                        qat.WindowBatches(_windows(), MICRO * ACCUM, 1, seed=2), 2)
    assert ACCUM > 1
    np.testing.assert_allclose(l_acc, l_big, rtol=1e-5)
    for a, b in zip(jax.tree_util.tree_leaves(s_acc), jax.tree_util.tree_leaves(s_big)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


def test_resume_from_checkpoint_is_bit_identical(llama, tmp_path):
    mesh, step, recipe, opt = llama["mesh"], llama["step_mesh"], llama["recipe"], llama["opt"]

    def fresh():
        return qat.init_train_state(qat.init(llama["params"], recipe), opt, mesh)

    straight, _ = _run(step, fresh(), qat.WindowBatches(_windows(), MICRO, ACCUM, seed=5), 4, mesh)

    batches = qat.WindowBatches(_windows(), MICRO, ACCUM, seed=5)
    half, _ = _run(step, fresh(), batches, 2, mesh)
    with qat.Checkpointer(tmp_path / "ckpt") as ckpt:
        assert ckpt.save(half, {"data": batches.state()}) == 2
    del half
    with qat.Checkpointer(tmp_path / "ckpt") as ckpt:
        state, extra = ckpt.restore(fresh())
    assert int(state["step"]) == 2 and state["params"]["params"]["embed"]["embedding"].sharding.spec == P("fsdp")
    resumed_batches = qat.WindowBatches(_windows(), MICRO, ACCUM, seed=5)
    resumed_batches.restore(extra["data"])
    resumed, _ = _run(step, state, resumed_batches, 2, mesh)
    assert_trees_equal(jax.device_get(resumed), jax.device_get(straight))


def test_llama_lsq_training_lowers_loss_and_converts_to_the_trained_forward(llama):
    model, recipe = llama["model"], llama["recipe"]
    qp0 = qat.init(llama["params"], recipe)
    state, losses = _run(llama["step_one"], qat.init_train_state(qp0, llama["opt"]),
                         qat.WindowBatches(_windows(), MICRO, ACCUM), 4)
    assert losses[-1] < losses[0]
    qp = state["params"]
    s0 = qp0["quant"]["layers_0"]["attn"]["q_proj"]["kernel"]["scale"]
    assert float(jnp.max(jnp.abs(qp["quant"]["layers_0"]["attn"]["q_proj"]["kernel"]["scale"] - s0))) > 0
    conv = qat.convert(qp, recipe)
    fq = jax.jit(qat.fake_quantize, static_argnums=1)(qp, recipe)
    assert_trees_equal(jq.dequantize_params(conv), fq)  # the trained forward is the converted model's
    ids = jnp.asarray(_windows(4))
    y_q = jax.jit(lambda q: jq.interop.apply(model, {"params": q}, ids))(conv)
    np.testing.assert_allclose(np.asarray(y_q), np.asarray(jax.jit(model.apply)({"params": fq}, ids)),
                               rtol=1e-5, atol=1e-5)
    # without learned step sizes, convert is quantize_params on the master weights, bit for bit
    plain = recipe_from_dict({"rules": [{"pattern": ".*kernel", "method": "qat", "format": "int4",
                                         "symmetric": False, "group_size": 128, "flat_groups": True}]})
    assert_trees_equal(qat.convert({"params": qp["params"], "quant": {}}, plain),
                       jq.quantize_params(qp["params"], plain))


def _np_kl(s, t, tau):
    """KL(softmax(t/τ) ‖ softmax(s/τ)) · τ² per row, in float64 NumPy."""
    def log_softmax(z):
        z = z - z.max(-1, keepdims=True)
        return z - np.log(np.exp(z).sum(-1, keepdims=True))
    lt, ls = log_softmax(np.float64(t) / tau), log_softmax(np.float64(s) / tau)
    return tau**2 * (np.exp(lt) * (lt - ls)).sum(-1)


@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_distill_loss_against_numpy(tau):
    rng = np.random.default_rng(0)
    s, t = rng.normal(size=(2, 5, 11)).astype(np.float32) * 3, rng.normal(size=(2, 5, 11)).astype(np.float32) * 3
    labels = rng.integers(0, 11, size=(2, 5))
    np.testing.assert_allclose(np.asarray(qat.kl_divergence(s, t, tau)), _np_kl(s, t, tau), rtol=1e-5, atol=1e-6)
    assert float(jnp.max(jnp.abs(qat.kl_divergence(t, t, tau)))) < 1e-6
    ce = np.asarray(optax.softmax_cross_entropy_with_integer_labels(s, labels))
    for alpha in (0.0, 0.3, 1.0):
        want = np.mean(alpha * _np_kl(s, t, tau) + (1 - alpha) * ce)
        np.testing.assert_allclose(float(qat.distill_loss(s, t, labels, alpha, tau)), want, rtol=1e-5)
    # the teacher gets no gradient; the student's is softmax(s/τ) − softmax(t/τ), times τ / positions
    g_s, g_t = jax.grad(lambda a, b: qat.distill_loss(a, b, labels, 1.0, tau), argnums=(0, 1))(s, t)
    assert float(jnp.max(jnp.abs(g_t))) == 0.0
    want = tau * (jax.nn.softmax(s / tau) - jax.nn.softmax(t / tau)) / 10
    np.testing.assert_allclose(np.asarray(g_s), np.asarray(want), rtol=1e-4, atol=1e-7)
    with pytest.raises(ValueError, match=r"alpha=1.5 must lie in \[0, 1\]"):
        qat.distill_loss(s, t, labels, 1.5)
    with pytest.raises(ValueError, match="distillation temperature 0.0 must be > 0"):
        qat.distill_loss(s, t, labels, 1.0, 0.0)


def test_distillation_step_with_a_sharded_teacher(llama):
    """KD from a frozen teacher passed to the step: the float model distilled from itself has zero loss and zero
    gradient; the quantized student's sharded step equals the single-device step and lowers the KD loss."""
    from jq.apps.finetune import make_loss

    model, recipe, mesh, params = llama["model"], llama["recipe"], llama["mesh"], llama["params"]
    opt = optax.adam(3e-4)  # the student starts close to its teacher: a small step
    kd = make_loss(model, None, alpha=1.0)
    float_step = qat.make_train_step(kd, opt, None, donate=False)
    s0 = qat.init_train_state({"params": params, "quant": {}}, opt)
    _, m = float_step(s0, jnp.asarray(next(qat.WindowBatches(_windows(), MICRO, ACCUM))), params)
    assert abs(float(m["loss"])) < 1e-6 and float(m["grad_norm"]) < 1e-6  # rounding only (Adam would amplify it)

    qp = qat.init(params, recipe)
    teacher = qat.shard_tree(params, mesh)
    assert teacher["layers_0"]["mlp"]["gate_proj"]["kernel"].sharding.spec == P(None, "fsdp")
    step_mesh = qat.make_train_step(kd, opt, recipe, mesh=mesh)
    step_one = qat.make_train_step(kd, opt, recipe, donate=False)
    s_mesh, s_one = qat.init_train_state(qp, opt, mesh), qat.init_train_state(qp, opt)
    b_mesh, b_one = qat.WindowBatches(_windows(), MICRO, ACCUM), qat.WindowBatches(_windows(), MICRO, ACCUM)
    held_out = jnp.asarray(_windows(8))
    kd_of = jax.jit(lambda qp: kd(qat.fake_quantize(qp, recipe), held_out, params))
    before = float(kd_of(s_one["params"]))
    l_mesh, l_one = [], []
    for _ in range(4):
        s_mesh, m = step_mesh(s_mesh, qat.shard_batch(next(b_mesh), mesh), teacher)
        l_mesh.append(float(m["loss"]))
        s_one, m = step_one(s_one, jnp.asarray(next(b_one)), params)
        l_one.append(float(m["loss"]))
    np.testing.assert_allclose(l_mesh, l_one, rtol=1e-4, atol=1e-7)
    assert 0 < float(kd_of(s_one["params"])) < 0.9 * before


def test_bitnet_ternary_weights_and_int8_activations():
    recipe = load_recipe(REPO / "configs" / "qat_bitnet_b158.yaml")
    model = Llama(TINY)
    params = _tiny_params()
    qp = qat.init(params, recipe)
    conv = qat.convert(qp, recipe)
    kernels = [(p, x) for p, x in jq.leaf_paths(conv) if _is_q(x)]
    assert len(kernels) == 7 * TINY.n_layers
    for path, x in kernels:
        assert x.fmt == "int2" and x.restricted and x.policy.act == "int8"
        assert set(np.unique(np.asarray(x.unpacked_codes()))) <= {-1, 0, 1}
        w = np.asarray(dict(jq.leaf_paths(params))[path])
        np.testing.assert_allclose(float(x.scale.reshape(())), np.abs(w).mean(), rtol=1e-5)  # abs-mean scale
    ids = jnp.asarray(_windows(2))
    y_q = jax.jit(lambda q: jq.interop.apply(model, {"params": q}, ids))(conv)
    loss = _lm_loss(model, recipe)

    @jax.jit
    def forward_and_grad(p):
        y = qat.apply(model, {"params": qat.fake_quantize(p, recipe)}, ids, cfg=recipe)
        return y, jax.grad(lambda p: loss(qat.fake_quantize(p, recipe), ids))(p)

    y_fq, g = forward_and_grad(qp)
    np.testing.assert_allclose(np.asarray(y_fq), np.asarray(y_q), rtol=1e-4, atol=1e-4)
    gk = g["params"]["layers_0"]["attn"]["q_proj"]["kernel"]
    assert bool(jnp.all(jnp.isfinite(gk))) and float(jnp.abs(gk).sum()) > 0


def test_qat_recipes_load_and_quantize_as_ptq():
    for name in ("qat_w4_g128", "qat_w3_g128", "qat_bitnet_b158"):
        r = load_recipe(REPO / "configs" / f"{name}.yaml")
        assert r.name == name and r.rules[0].method == "qat"
        qat.qat_options(r.rules[0])
    w3 = load_recipe(REPO / "configs" / "qat_w3_g128.yaml")
    q = jq.quantize_params({"mlp": {"kernel": jnp.ones((128, 8)) * jnp.arange(8.0)}}, w3)["mlp"]["kernel"]
    assert q.fmt == "int3" and q.layout.group_size == 128 and not q.layout.flat and q.zero.dtype == jnp.uint8
    # the rotated W3 pair: the PTQ start's QTensors are on the QAT recipe's grid, the rotation sections equal
    rot_qat, rot_ptq = (load_recipe(REPO / "configs" / f"{n}.yaml") for n in ("qat_quarot_w3_g128",
                                                                             "quarot_gptq_refit_w3_g128_natural"))
    assert rot_qat.rotation == rot_ptq.rotation is not None
    rng = np.random.default_rng(0)
    mlp = {p: {"kernel": jnp.asarray(rng.normal(size=(128, 64)).astype(np.float32))} for p in ("down_proj", "up_proj")}
    calib = {"mlp": {p: {"kernel": {"hessian": jnp.eye(128), "count": jnp.float32(64)}} for p in mlp}}
    qp = qat.init_from(jq.quantize_params({"mlp": mlp}, rot_ptq, calib), rot_qat)
    assert set(qp["quant"]["mlp"]) == {"down_proj", "up_proj"}
    assert str(qat.convert(qp, rot_qat)["mlp"]["down_proj"]["kernel"].policy.rotation) == "hadamard"


# ----------------------------------------------------------------------------------------- mesh, multi-host


def test_param_spec_shards_the_largest_divisible_dimension():
    assert qat.param_spec((64, 32), 4) == P("fsdp")
    assert qat.param_spec((30, 8), 4) == P(None, "fsdp")
    assert qat.param_spec((3, 5), 4) == P()
    assert qat.param_spec((64, 32), 1) == P()
    mesh = qat.make_mesh(data=2, fsdp=4)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 4}
    assert qat.batch_sharding(mesh, (2, 8, 16)).spec == P(None, ("data", "fsdp"), None)
    assert qat.batch_sharding(mesh, (2, 6, 16)).spec == P(None, "data", None)


def test_distributed_initialize_only_when_launched_multi_host(monkeypatch):
    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda *a: calls.append(a))
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
    monkeypatch.delenv("JAX_COORDINATOR_ADDRESS", raising=False)
    assert not qat.maybe_initialize_distributed()
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "10.0.0.1:1234")
    monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
    monkeypatch.setenv("JAX_PROCESS_ID", "1")
    assert qat.maybe_initialize_distributed()
    assert calls == [("10.0.0.1:1234", 2, 1)]


# --------------------------------------------------------------------------------------------------- the script


def test_finetune_script_smoke_on_a_tiny_model(tmp_path, capsys):
    from jq.apps import finetune as script
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("It is a truth universally acknowledged, that a single man in possession of a good fortune, "
                      "must be in want of a wife. " * 20)
    out = tmp_path / "q"
    rc = script.main(["--model", "tiny", "--steps", "2", "--seq-len", "32", "--batch-size", "8", "--corpus",
                      str(corpus), "--out", str(out), "--ckpt-dir", str(tmp_path / "ckpt"), "--no-progress"])
    assert rc == 0
    from jq import checkpoint

    tree, meta = checkpoint.load(out)
    assert meta["recipe"]["name"] == "qat_w4_g128"
    assert _is_q(tree["layers_0"]["attn"]["q_proj"]["kernel"])
    assert qat.Checkpointer(tmp_path / "ckpt").latest_step() == 2
    assert '"last_loss"' in capsys.readouterr().out


def test_finetune_script_distills_from_the_float_model(tmp_path, capsys):
    import json

    from jq.apps import finetune as script
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("Emma Woodhouse, handsome, clever, and rich, with a comfortable home and happy disposition. " * 20)
    common = ["--model", "tiny", "--steps", "2", "--seq-len", "32", "--batch-size", "4", "--corpus", str(corpus),
              "--no-progress"]
    assert script.main(common + ["--distill", "1", "--distill-temperature", "2", "--eval-windows", "2",
                                 "--eval-window", "16", "--eval-every", "1"]) == 0
    cap = capsys.readouterr()
    out = json.loads(cap.out.strip().splitlines()[-1])
    assert out["distill"] == {"alpha": 1.0, "temperature": 2.0} and out["first_loss"] > 0
    assert [p["step"] for p in out["curve"]] == [1] and out["curve"][0]["perplexity"] > 1  # step 2 is "eval"
    assert f"step 1: perplexity {out['curve'][0]['perplexity']:.3f} (2 × 16 tokens" in cap.err  # logged when measured
    assert out["eval"]["windows"] == 2
    with pytest.raises(ValueError, match="--eval-every 1 needs --eval-windows"):
        script.main(common + ["--eval-every", "1"])
    with pytest.raises(ValueError, match="with --float it would distill the float model from itself"):
        script.main(common + ["--distill", "1", "--float"])
    with pytest.raises(ValueError, match="--distill 2.0 must lie in"):
        script.main(common + ["--distill", "2"])
    with pytest.raises(ValueError, match="--distill-temperature -1.0 must be > 0"):
        script.main(common + ["--distill", "1", "--distill-temperature", "-1"])


def test_finetune_starts_from_a_calibrated_ptq_result(tmp_path, capsys):
    """--init-recipe: AWQ + GPTQ (act-order, static groups) on the corpus, then QAT on the same grid from it."""
    import json

    from jq.apps import finetune as script
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("Anne Elliot walked along the Cobb at Lyme, and Captain Wentworth followed her. " * 30)
    recipe = tmp_path / "qat.yaml"
    recipe.write_text("rules:\n  - pattern: '.*kernel'\n    method: qat\n    options: {lsq: true}\n"
                      "    format: int4\n    symmetric: false\n    group_size: 16\n")
    ptq = tmp_path / "ptq.yaml"
    ptq.write_text("name: awq_gptq_tiny\nrules:\n  - pattern: '.*kernel'\n    transforms: [awq]\n    method: gptq\n"
                   "    format: int4\n    symmetric: false\n    group_size: 16\n"
                   "    options: {act_order: true, static_groups: true}\n")
    rc = script.main(["--model", "tiny", "--steps", "1", "--seq-len", "32", "--batch-size", "4", "--corpus",
                      str(corpus), "--recipe", str(recipe), "--init-recipe", str(ptq), "--calib-samples", "4",
                      "--calib-len", "32", "--calib-seed", "5", "--calib-sampling", "stream", "--no-progress"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["init_recipe"]["name"] == "awq_gptq_tiny" and out["steps"] == 1
    assert out["init_recipe"]["calibration"] == {"files": [str(corpus)], "samples": 4, "length": 32, "seed": 5,
                                                 "sampling": "stream"}
    # resuming such a run restores the trained state and skips the PTQ (which would only be overwritten)
    ckpt = ["--ckpt-dir", str(tmp_path / "ckpt")]
    args = ["--model", "tiny", "--seq-len", "32", "--batch-size", "4", "--corpus", str(corpus), "--recipe",
            str(recipe), "--init-recipe", str(ptq), "--calib-samples", "4", "--calib-len", "32", "--no-progress"]
    assert script.main(args + ckpt + ["--steps", "1"]) == 0
    capsys.readouterr()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(script, "ptq_start", lambda *a: pytest.fail("PTQ ran on resume"))
        assert script.main(args + ckpt + ["--steps", "2", "--resume"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["init_recipe"] == {"name": "awq_gptq_tiny", "resumed_at_step": 1}
    assert qat.Checkpointer(tmp_path / "ckpt").latest_step() == 2
    bad = tmp_path / "bad.yaml"  # act-order with groups formed in the pass stores a permutation: refused by name
    bad.write_text(ptq.read_text().replace("static_groups: true", "static_groups: false"))
    common = ["--model", "tiny", "--steps", "1", "--seq-len", "32", "--batch-size", "4", "--corpus", str(corpus),
              "--recipe", str(recipe), "--calib-samples", "4", "--calib-len", "32", "--no-progress"]
    with pytest.raises(ValueError, match="layers_0/.*kernel: the PTQ weight is not on the QAT recipe's grid: perm"):
        script.main(common + ["--init-recipe", str(bad)])
    with pytest.raises(ValueError, match="--init-recipe starts QAT from a PTQ result; it has no meaning with --float"):
        script.main(common + ["--init-recipe", str(ptq), "--float"])
    rotated = tmp_path / "rotated.yaml"
    rotated.write_text("rotation: {seed: 1}\nrules:\n  - pattern: '.*kernel'\n    format: int4\n")
    with pytest.raises(ValueError, match=r"--init-recipe .*rotated\.yaml: its rotation section .* differs from the "
                                         r"QAT recipe's \(None\)"):
        script.main(common + ["--init-recipe", str(rotated)])


def test_finetune_trains_the_rotated_model_from_a_rotated_ptq_result(tmp_path, capsys):
    """A QAT recipe with a rotation section (QuaRot-style, down_proj in its online-Hadamard basis) trains the rotated
    model from the rotated GPTQ result: step 0 is the PTQ model, and the saved checkpoint is a rotated quantized
    model (its config, its rotated down_proj) that `jq eval` reads."""
    import json

    from jq import checkpoint
    from jq.apps import finetune as script
    from jq.apps import pipeline
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("Captain Wentworth wrote the letter while Anne spoke with Captain Harville by the window. " * 30)
    grid = "    format: int4\n    symmetric: false\n    group_size: 16\n    zero_point: float\n"
    qat_rules = ("rotation: {seed: 1}\nrules:\n  - pattern: '.*down_proj/kernel'\n    method: qat\n    rotate: hadamard\n"
                 f"    options: {{lsq: true}}\n{grid}  - pattern: '.*kernel'\n    method: qat\n    options: {{lsq: true}}\n{grid}")
    recipe = tmp_path / "qat_rot.yaml"
    recipe.write_text(qat_rules)
    ptq = tmp_path / "ptq_rot.yaml"
    ptq.write_text("name: quarot_gptq_tiny\n" + qat_rules.replace("method: qat", "method: gptq").replace(
        "{lsq: true}", "{refit: true}"))
    out_dir = tmp_path / "q"
    common = ["--model", "tiny", "--seq-len", "32", "--batch-size", "4", "--corpus", str(corpus), "--recipe",
              str(recipe), "--calib-samples", "4", "--calib-len", "32", "--eval-windows", "2", "--eval-window", "16",
              "--no-progress"]
    assert script.main(common + ["--steps", "0", "--init-recipe", str(ptq), "--out", str(out_dir)]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["eval"]["perplexity"] == pytest.approx(out["init_recipe"]["eval"]["perplexity"], rel=1e-5)
    tree, meta = checkpoint.load(out_dir)
    assert meta["meta"]["model_config"]["tie_embeddings"] is False  # the rotated model unties the head
    assert str(tree["layers_0"]["mlp"]["down_proj"]["kernel"].policy.rotation) == "hadamard"
    assert tree["layers_0"]["mlp"]["up_proj"]["kernel"].policy.rotation is None
    # the float model rotated by the same section computes the same function as the unrotated one
    from jq.apps.finetune_setup import training_model

    m = training_model("tiny", 0)
    mcfg, params = m.cfg, m.params
    rot = pipeline.rotated(m, jq.load_recipe(recipe))
    ids = jnp.arange(16, dtype=jnp.int32)[None] * 7 % 256
    np.testing.assert_allclose(np.asarray(Llama(rot.cfg).apply({"params": rot.params}, ids)),
                               np.asarray(Llama(mcfg).apply({"params": params}, ids)), rtol=1e-4, atol=1e-4)
    assert script.main(common + ["--steps", "2", "--init-recipe", str(ptq)]) == 0  # and it trains
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["last_loss"] > 0
    other = tmp_path / "ptq_rot2.yaml"
    other.write_text(ptq.read_text().replace("seed: 1", "seed: 2"))
    with pytest.raises(ValueError, match=r"ptq_rot2\.yaml: its rotation section .*seed=2.* differs from the QAT "
                                         r"recipe's .*seed=1"):
        script.main(common + ["--steps", "1", "--init-recipe", str(other)])
