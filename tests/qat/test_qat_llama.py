"""jq.qat on a tiny Llama: a sharded step against the single-device step, gradient accumulation, bit-identical
resume from an Orbax checkpoint, LSQ training that converts to the trained forward, distillation from a frozen float
teacher (against NumPy, and sharded), BitNet ternary weights with int8 activations, the shipped QAT recipes, and the
mesh / multi-host helpers."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P
from jqtest.checkpoints import _same

import jq
import jq.interop
from jq import qat
from jq.models.llama.config import LlamaConfig
from jq.models.llama.model import Llama, init_params
from jq.numbers.qtensor import QTensor
from jq.tree.recipe import load_recipe, recipe_from_dict

REPO = Path(__file__).resolve().parents[2]


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
    _same(jax.device_get(resumed), jax.device_get(straight))


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
    _same(jq.dequantize_params(conv), fq)  # the trained forward is the converted model's
    ids = jnp.asarray(_windows(4))
    y_q = jax.jit(lambda q: jq.interop.apply(model, {"params": q}, ids))(conv)
    np.testing.assert_allclose(np.asarray(y_q), np.asarray(jax.jit(model.apply)({"params": fq}, ids)),
                               rtol=1e-5, atol=1e-5)
    # without learned step sizes, convert is quantize_params on the master weights, bit for bit
    plain = recipe_from_dict({"rules": [{"pattern": ".*kernel", "method": "qat", "format": "int4",
                                         "symmetric": False, "group_size": 128, "flat_groups": True}]})
    _same(qat.convert({"params": qp["params"], "quant": {}}, plain),
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
    kernels = [(p, x) for p, x in jq.leaf_paths(conv) if isinstance(x, QTensor)]
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
