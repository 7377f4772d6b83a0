"""The mixture-of-experts family: a tiny MoE decoder (8 experts, top-2), trained a few steps on text with a
load-balancing loss so its router is not uniform, checked against dense Python-loop references — float, quantized
(groups per expert), per-expert calibration statistics from the routed tokens, GPTQ per expert, an expert no token
reaches, expert parallelism on 8 devices, and the calibrated pipeline end to end."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, PartitionSpec as P

import jq
from jq.apps import pipeline
from jq.calibration.experts import capture_experts
from jq.interop.layers import layer_interceptor
from jq.interop.linen import routed_paths
from jq.models import moe
from jq.models.family import LoadedModel
from jq.models.moe.model import MoE, MoeLM
from jq.tree.quantize import quantize_leaf

CFG = moe.MoeConfig.tiny()  # d 64, 2 layers, 8 experts of width 64, top-2, vocab 256 (bytes)
E, D, F, K = CFG.n_experts, CFG.dim, CFG.expert_dim, CFG.top_k
TEXT = Path(__file__).resolve().parents[2] / "data" / "persuasion_excerpt.txt"
W4 = jq.Scheme("int4", symmetric=False, group_size=32)
EXPERTS = ".*experts/(gate|up|down)/kernel"


def _windows(ids: np.ndarray, n: int, length: int, rng: np.random.Generator) -> np.ndarray:
    return np.stack([ids[s:s + length] for s in rng.integers(0, len(ids) - length, n)])


@pytest.fixture(scope="module")
def trained():
    """(params, calibration tokens [8, 32]) of the tiny MoE after 24 Adam steps on the text (cross-entropy plus a
    Switch-style balance loss, so that every expert is used and routing depends on the token)."""
    ids = np.frombuffer(TEXT.read_bytes(), np.uint8).astype(np.int32)
    model, params = MoeLM(CFG), moe.init_params(CFG, jax.random.key(0))

    def loss(p, x):
        logits, st = model.apply({"params": p}, x[:, :-1], mutable=["intermediates"])
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, x[:, 1:]).mean()
        bal = 0.0
        for i in range(CFG.n_layers):
            m = st["intermediates"][f"layers_{i}"]["moe"]
            frac = m["experts"]["expert_mask"][0].mean((0, 1)) / K
            bal += E * jnp.sum(frac * jax.nn.softmax(m["router_logits"][0]).mean((0, 1)))
        return ce + 0.05 * bal, ce

    opt = optax.adam(3e-3)

    @jax.jit
    def step(p, s, x):
        (_, ce), g = jax.value_and_grad(loss, has_aux=True)(p, x)
        u, s = opt.update(g, s, p)
        return optax.apply_updates(p, u), s, ce

    rng = np.random.default_rng(0)
    state, first = opt.init(params), None
    for _ in range(24):
        params, state, ce = step(params, state, jnp.asarray(_windows(ids, 8, 25, rng)))
        first = float(ce) if first is None else first
    assert float(ce) < first - 1.5  # it learned something
    return params, _windows(ids, 8, 32, rng)


@pytest.fixture(scope="module")
def x0(trained):
    """The input of layer 0's MoE on the calibration tokens: [8, 32, D]."""
    return _moe_input(*trained)


def _moe_input(params, tokens, layer: int = 0) -> jax.Array:
    """The input of layer `layer`'s MoE (the router's input) on `tokens`: [B, T, D]."""
    box = {}

    def keep(c):
        if c.path == f"layers_{layer}/moe/router/kernel":
            box["x"] = c.x
        return c.proceed()

    with nn.intercept_methods(layer_interceptor(keep)):
        MoeLM(CFG).apply({"params": params}, jnp.asarray(tokens))
    return box["x"]


# ------------------------------------------------------------------------------------- NumPy loop references


def _silu(a):
    return a / (1 + np.exp(-a))


def np_routes(x: np.ndarray, router: np.ndarray) -> list[list[tuple[int, float]]]:
    """Per token of x [T, D]: its top-k (expert, weight) pairs, Mixtral style."""
    out = []
    for row in x.astype(np.float64):
        logits = row @ router
        top = np.argsort(-logits, kind="stable")[:K]
        w = np.exp(logits[top] - logits[top].max())
        out.append(list(zip(top.tolist(), (w / w.sum()).tolist())))
    return out


def np_moe(x: np.ndarray, p: dict) -> np.ndarray:
    """The MoE layer by a Python loop over tokens and their routed experts; x [..., D]."""
    xs = np.asarray(x, np.float64).reshape(-1, D)
    g, u, d = (np.asarray(p["experts"][n]["kernel"], np.float64) for n in ("gate", "up", "down"))
    out = np.zeros_like(xs)
    for t, routes in enumerate(np_routes(xs, np.asarray(p["router"]["kernel"], np.float64))):
        for e, w in routes:
            out[t] += w * ((_silu(xs[t] @ g[e]) * (xs[t] @ u[e])) @ d[e])
    return out.reshape(np.shape(x))


def np_expert_stats(x: np.ndarray, p: dict) -> dict[str, dict[str, np.ndarray]]:
    """Per expert, the statistics of its gate/up input and its down input over the tokens routed to it."""
    xs = np.asarray(x, np.float64).reshape(-1, D)
    g, u = (np.asarray(p["experts"][n]["kernel"], np.float64) for n in ("gate", "up"))
    rows = {"in": [[] for _ in range(E)], "down": [[] for _ in range(E)]}
    for t, routes in enumerate(np_routes(xs, np.asarray(p["router"]["kernel"], np.float64))):
        for e, _ in routes:
            rows["in"][e].append(xs[t])
            rows["down"][e].append(_silu(xs[t] @ g[e]) * (xs[t] @ u[e]))
    out = {}
    for k, per in rows.items():
        st = {"hessian": [], "act_absmean": [], "act_sq": [], "act_absmax": [], "count": []}
        for r in per:
            a = np.asarray(r).reshape(-1, F if k == "down" else D)
            n = max(len(a), 1)
            st["hessian"].append(a.T @ a / n)
            st["act_absmean"].append(np.abs(a).sum(0) / n)
            st["act_sq"].append((a * a).sum(0) / n)
            st["act_absmax"].append(np.abs(a).max(0) if len(a) else np.zeros(a.shape[1]))
            st["count"].append(len(a))
        out[k] = {f: np.stack(v) for f, v in st.items()}
    return out


# ---------------------------------------------------------------------------------------------------- tests


def test_float_moe_layer_equals_the_dense_loop_reference(trained, x0):
    params, tokens = trained
    p = params["layers_0"]["moe"]
    x = x0[:2, :16]
    got = MoE(CFG).apply({"params": p}, x)
    np.testing.assert_allclose(np.asarray(got), np_moe(np.asarray(x), p), rtol=1e-4, atol=1e-5)
    counts = np.bincount([e for r in np_routes(np.asarray(x).reshape(-1, D), np.asarray(p["router"]["kernel"]))
                          for e, _ in r], minlength=E)
    assert (counts > 0).sum() >= E - 1 and counts.max() < 0.6 * counts.sum()  # the router is not collapsed


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 2e-4), (jnp.bfloat16, 6e-2)])
def test_quantized_experts_group_per_expert_and_run_through_qeinsum(trained, x0, dtype, tol, monkeypatch):
    params, tokens = trained
    q = jq.quantize_params(params, jq.QuantConfig.simple(W4))
    qe = q["layers_0"]["moe"]["experts"]
    assert isinstance(q["layers_0"]["moe"]["router"]["kernel"], jax.Array)  # the router stays float
    for name, (k, n) in (("gate", (D, F)), ("down", (F, D))):
        w, qt = params["layers_0"]["moe"]["experts"][name]["kernel"], qe[name]["kernel"]
        assert qt.layout.axes == (1,) and qt.scale.shape == (E, k // 32, n)
        for e in (0, E - 1):  # groups never cross experts: each expert is its own 2-D kernel's RTN
            alone = jq.quantize_params({"k": {"kernel": w[e]}}, jq.QuantConfig.simple(W4))["k"]["kernel"].dequantize()
            np.testing.assert_array_equal(np.asarray(qt.dequantize()[e]), np.asarray(alone))
    model = MoeLM(CFG)
    assert {f"layers_0/moe/experts/{n}/kernel" for n in ("gate", "up", "down")} <= routed_paths(
        model, {"params": q}, jnp.asarray(tokens[:1]))
    seen = []
    real = jq.ops.qeinsum

    def spy(eq, x, w, *a, **kw):
        seen.append((eq, type(w).__name__))
        return real(eq, x, w, *a, **kw)

    monkeypatch.setattr(jq.ops, "qeinsum", spy)
    x = x0[:2, :16].astype(dtype)
    got = jq.apply(MoE(CFG, dtype), {"params": q["layers_0"]["moe"]}, x)
    assert ("btd,edf->btef", "QTensor") in seen and ("btef,efd->bted", "QTensor") in seen
    want = np_moe(np.asarray(x, np.float32), jq.dequantize_params(q["layers_0"]["moe"]))
    assert got.dtype == dtype
    err = np.abs(np.asarray(got, np.float32) - want).max() / np.abs(want).max()
    assert err < tol, err


def test_per_expert_statistics_equal_the_routed_tokens_reference(trained, x0):
    params, tokens = trained
    p = params["layers_0"]["moe"]
    x = x0
    st = capture_experts(MoE(CFG), {"params": p}, [x[:3], x[3:]])
    ref = np_expert_stats(np.asarray(x), p)
    assert sorted(st) == [f"experts/{n}/kernel" for n in ("down", "gate", "up")]
    for path, key in (("experts/gate/kernel", "in"), ("experts/up/kernel", "in"), ("experts/down/kernel", "down")):
        for f, r in ref[key].items():
            np.testing.assert_allclose(np.asarray(getattr(st[path], f)), r, rtol=2e-4, atol=2e-5,
                                       err_msg=f"{path} {f}")
    assert int(st["experts/gate/kernel"].count.sum()) == x.shape[0] * x.shape[1] * K


def _objective(w, q, h):
    """Σ_e tr(Δ_eᵀ H_e Δ_e): the output error of the stacked layer over each expert's routed tokens."""
    d = np.asarray(w, np.float64) - np.asarray(q.dequantize(), np.float64)
    return float(np.einsum("ekn,ekl,eln->", d, np.asarray(h, np.float64), d))


def test_gptq_per_expert_beats_rtn_and_equals_gptq_on_each_expert(trained, x0):
    params, tokens = trained
    p = params["layers_0"]["moe"]
    x = x0
    st = capture_experts(MoE(CFG), {"params": p}, [x])
    scheme = jq.Scheme("int3", symmetric=False, group_size=32)
    gptq = jq.QuantConfig.simple(scheme, pattern=EXPERTS, method="gptq")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every expert has tokens: nothing to warn about
        qg = jq.quantize_params(p, gptq, calib=st)
    qr = jq.quantize_params(p, jq.QuantConfig.simple(scheme, pattern=EXPERTS))
    for name in ("gate", "up", "down"):
        path = f"experts/{name}/kernel"
        w = p["experts"][name]["kernel"]
        assert _objective(w, qg["experts"][name]["kernel"], st[path].hessian) < \
            0.9 * _objective(w, qr["experts"][name]["kernel"], st[path].hessian)
    e = 2  # the vmapped GPTQ is GPTQ on that expert's own kernel and statistics
    one = jax.tree_util.tree_map(lambda a: a[e], st["experts/gate/kernel"])
    alone = quantize_leaf("experts/gate/kernel", p["experts"]["gate"]["kernel"][e], gptq.rules[0], one)
    np.testing.assert_allclose(np.asarray(qg["experts"]["gate"]["kernel"].dequantize()[e]),
                               np.asarray(alone.dequantize()), atol=1e-6)
    moe_f = MoE(CFG).apply({"params": p}, x)
    err = [float(jnp.sum((jq.apply(MoE(CFG), {"params": q}, x) - moe_f) ** 2)) for q in (qg, qr)]
    assert err[0] < err[1], err  # the layer's output on the calibration tokens


def test_an_expert_no_token_reaches_warns_by_index_and_falls_back_to_rtn(trained, x0):
    params, tokens = trained
    p = jax.tree_util.tree_map(lambda a: a, params["layers_0"]["moe"])
    x = x0.at[..., 0].set(1.0 + jnp.abs(x0[..., 0]))  # a positive feature, so that one router column can veto
    p["router"]["kernel"] = p["router"]["kernel"].at[0, 3].set(-1e4)
    st = capture_experts(MoE(CFG), {"params": p}, [x])
    count = np.asarray(st["experts/up/kernel"].count)
    dead = np.flatnonzero(count == 0).tolist()  # expert 3, and any other the shifted feature vetoes
    assert 3 in dead and len(dead) < E // 2 and count.sum() == x.size // D * K
    with pytest.warns(UserWarning, match=r"experts/gate/kernel: no calibration token was routed to expert\(s\) "
                                         + re.escape(str(dead)) + " of 8; quantized them with RTN instead of 'gptq'"):
        qg = jq.quantize_params(p, jq.QuantConfig.simple(W4, pattern=EXPERTS, method="gptq"), calib=st)
    rtn = jq.quantize_params(p, jq.QuantConfig.simple(W4, pattern=EXPERTS))
    a, b = (np.asarray(q["experts"]["down"]["kernel"].dequantize()) for q in (qg, rtn))
    live = int(np.argmax(count))
    np.testing.assert_array_equal(a[dead], b[dead])
    assert not np.array_equal(a[live], b[live])


def test_expert_parallel_on_8_devices_equals_unsharded(trained, x0):
    params, tokens = trained
    mesh = Mesh(np.array(jax.devices()[:8]), ("expert",))
    model, toks = MoeLM(CFG), jnp.asarray(tokens[:2])
    fwd = jax.jit(lambda p, t: jq.apply(model, {"params": p}, t))
    q = jq.quantize_params(params, jq.QuantConfig.simple(W4))
    qs = moe.shard_experts(q, mesh)
    codes = qs["layers_1"]["moe"]["experts"]["down"]["kernel"].codes
    assert codes.sharding.spec == P("expert") and len(codes.addressable_shards) == 8
    assert codes.addressable_shards[0].data.shape[0] == 1  # one expert per device
    np.testing.assert_allclose(np.asarray(fwd(qs, toks)), np.asarray(fwd(q, toks)), rtol=1e-5, atol=1e-5)
    # calibration: per-expert statistics and per-expert GPTQ (under shard_map) on sharded experts
    whole = capture_experts(model, {"params": params}, [toks])
    assert len(whole) == 3 * CFG.n_layers and whole["layers_1/moe/experts/down/kernel"].hessian.shape == (E, F, F)
    p = params["layers_0"]["moe"]
    sp = moe.shard_experts(p, mesh)
    st, st_s = (capture_experts(MoE(CFG), {"params": v}, [x0]) for v in (p, sp))
    for path in st:
        for a, b in zip(jax.tree_util.tree_leaves(st[path]), jax.tree_util.tree_leaves(st_s[path])):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    gptq = jq.QuantConfig.simple(W4, pattern=".*experts/up/kernel", method="gptq")
    a = jq.quantize_params(p, gptq, calib=st)["experts"]["up"]["kernel"]
    b = jq.quantize_params(sp, gptq, calib=st_s)["experts"]["up"]["kernel"]
    assert b.codes.sharding.spec == P("expert")
    np.testing.assert_array_equal(np.asarray(a.dequantize()), np.asarray(b.dequantize()))


def test_the_calibrated_pipeline_quantizes_the_moe_end_to_end(trained):
    params, tokens = trained
    m = LoadedModel(moe.FAMILY, CFG, params, None, "in-memory toy MoE")
    gptq = jq.QuantConfig.simple(jq.Scheme("int3", symmetric=False, group_size=32), pattern=EXPERTS,
                                            method="gptq", name="gptq_w3_experts")
    rtn = jq.QuantConfig.simple(gptq.rules[0].scheme, pattern=EXPERTS)
    qg, log = pipeline.quantize(m, gptq, tokens, progress=False)
    assert [b["block"] for b in log["blocks"]] == ["layers_0", "layers_1"]
    q = qg["layers_1"]["moe"]["experts"]["down"]["kernel"]
    assert q.shape == (E, F, D) and q.layout.axes == (1,) and isinstance(qg["layers_1"]["moe"]["router"]["kernel"],
                                                                           jax.Array)
    fwd = pipeline.quantized_forward(CFG)
    t = jnp.asarray(tokens)

    def nll(p):
        logits = fwd(p, t[:, :-1])
        return float(optax.softmax_cross_entropy_with_integer_labels(logits, t[:, 1:]).mean())

    base, with_gptq, with_rtn = nll(params), nll(qg), nll(jq.quantize_params(params, rtn))
    assert np.isfinite(with_gptq) and abs(with_gptq - base) < abs(with_rtn - base), (base, with_gptq, with_rtn)


def test_the_staged_pipeline_quantizes_all_experts_at_once_as_quantize_params_does(trained):
    """Block by block, the first block's gate / up see the float model's inputs (nothing before them is
    quantized): their per-expert GPTQ equals `quantize_params` on `capture_experts` statistics, experts vmapped."""
    params, tokens = trained
    m = LoadedModel(moe.FAMILY, CFG, params, None, "in-memory toy MoE")
    cfg = jq.QuantConfig.simple(jq.Scheme("int4", symmetric=False, group_size=32), pattern=EXPERTS, method="gptq")
    staged, _ = pipeline.quantize(m, cfg, tokens, progress=False)
    st = capture_experts(MoeLM(CFG), {"params": params}, [jnp.asarray(tokens)])
    first = jq.QuantConfig.simple(cfg.rules[0].scheme, pattern="layers_0/moe/experts/(gate|up)/kernel",
                                  method="gptq")
    ref = jq.quantize_params(params, first, calib=st)
    for k in ("gate", "up"):
        a, b = (np.asarray(q["layers_0"]["moe"]["experts"][k]["kernel"].dequantize()) for q in (staged, ref))
        assert np.mean(~np.isclose(a, b, rtol=1e-4, atol=1e-5)) < 0.01
