"""Weights used by any matmul (the Gemma 3 report): the traced use gives each weight's contraction axes, recipes
quantize along them (or are refused naming the leaf), embeddings are recognised by use, and the routing report and
the size warning say what happened."""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jq
from jq.interop.usage import trace_usage

WEIGHTS = r".*(/w|gating_einsum|linear)"
EXPECTED = {
    "layer_0/attn/q_einsum/w": (1,), "layer_0/attn/kv_einsum/w": (2,), "layer_0/attn/attn_vec_einsum/w": (0, 1),
    "layer_0/mlp/gating_einsum": (2,), "layer_0/mlp/linear": (0,), "embedder/input_embedding": (1,),
}


def _cfg(**kw):
    return jq.QuantConfig.simple(jq.Scheme("int4", group_size=16, **kw), pattern=WEIGHTS)


def test_the_traced_use_gives_each_weights_contraction_axes(gemma):
    m, v, x = gemma
    u = trace_usage(m, v, x)
    axes = u.axes()
    assert {p: axes[p] for p in EXPECTED} == EXPECTED
    assert u["embedder/input_embedding"].gathered and u["embedder/input_embedding"].kind == "embedding"
    assert u["layer_0/pre_ffw_norm/scale"].kind == "elementwise"
    assert len(u.summary()["matmul"]) == 10


def test_scanned_layers_keep_the_layer_axis_out_of_the_contraction(scanned_gemma):
    m, v, x = scanned_gemma
    u = trace_usage(m, v, x)
    q = u["layers/Block_0/attn/q_einsum/w"]
    assert q.shape == (2, 4, 32, 16) and q.contraction_axes == (2,) and q.matmuls[0].stacked == (0,)
    assert u["layers/Block_0/attn/attn_vec_einsum/w"].contraction_axes == (1, 2)


def test_int4_g16_on_traced_axes_is_about_4_bits_and_close_to_float(gemma):
    m, v, x = gemma
    u = trace_usage(m, v, x)
    # every 2-D+ leaf, no ignore list: the embedding is recognised by its gathered rows, not by its name
    cfg = jq.QuantConfig(rules=(jq.Rule(".*", jq.Scheme("int4", group_size=16)),), ignore=())
    with pytest.warns(UserWarning, match="leaves the model gathers rows of .*: embedder/input_embedding"):
        q = jq.quantize_params(v["params"], cfg, usage=u)
    leaves = jax.tree_util.tree_flatten_with_path(q, is_leaf=lambda t: isinstance(t, jq.QTensor))[0]
    qts = {jax.tree_util.keystr(kp): t for kp, t in leaves if isinstance(t, jq.QTensor)}
    assert len(qts) == 10
    for t in qts.values():
        assert 4.0 < t.bits_per_weight < 5.5, t
    ref = m.apply(v, x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every quantized leaf reaches jq.ops: nothing to warn about
        out = jq.apply(m, {"params": q}, x)
    np.testing.assert_allclose(out, m.apply({"params": jq.dequantize_params(q)}, x), rtol=1e-4, atol=1e-4)
    rel = float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref))
    assert rel < 0.15, rel


def test_guessed_axes_that_pad_a_short_axis_are_warned_about(gemma):
    m, v, x = gemma
    cfg = jq.QuantConfig.simple(jq.Scheme("int4", group_size=64, pad=True), pattern=r".*q_einsum/w")
    with pytest.warns(UserWarning, match=r"q_einsum/w: quantized as .* bits per weight, more than the 32"):
        q = jq.quantize_params(v["params"], cfg)  # no usage: axis 0 (heads, length 4) padded to 64
    assert q["layer_0"]["attn"]["q_einsum"]["w"].bits_per_weight > 32


def test_explicit_axes_that_disagree_with_the_use_are_refused(gemma):
    m, v, x = gemma
    cfg = jq.QuantConfig.simple(jq.Scheme("int4", group_size=16, axes=(0,)), pattern=r".*q_einsum/w")
    with pytest.raises(ValueError, match=r"layer_0/attn/q_einsum/w: the rule's axes \(0,\) disagree .*axes: \[1\]"):
        jq.quantize_params(v["params"], cfg, usage=trace_usage(m, v, x))
    ok = jq.Scheme("int4", group_size=16, axes=(1,))
    q = jq.quantize_params(v["params"], jq.QuantConfig.simple(ok, pattern=r".*q_einsum/w"), usage=trace_usage(m, v, x))
    assert q["layer_1"]["attn"]["q_einsum"]["w"].layout.axes == (1,)


def test_a_llama_recipe_says_which_weights_it_missed(gemma):
    m, v, x = gemma
    with pytest.warns(UserWarning, match=r"matched no parameter.*matmul weights no rule quantized \(10\).*q_einsum/w"):
        jq.quantize_params(v["params"], jq.load_recipe("rtn_w4_g128"), usage=trace_usage(m, v, x))


def test_a_forced_embedding_quantizes_along_its_attend_axis(gemma):
    m, v, x = gemma
    rule = jq.Rule(r".*input_embedding", jq.Scheme("int8", group_size=16), force=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        q = jq.quantize_params(v["params"], jq.QuantConfig(rules=(rule,)), usage=trace_usage(m, v, x))
    assert q["embedder"]["input_embedding"].layout.axes == (1,)


def test_the_routing_report_counts_routed_and_dequantized_leaves(gemma, scanned_gemma):
    """User-code einsums on the weights themselves are routed (traced routing), inside `nn.scan` too: each layer's
    matmul runs on its slice of the stacked QTensor, giving what the dequantized model gives."""
    def report(m, v, x):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            q = jq.quantize_params(v["params"], _cfg(), usage=trace_usage(m, v, x))
        return q, jq.routing_report(m, {"params": q}, x)

    _, r = report(*gemma)
    assert r.counts == {"quantized": 10, "routed": 10, "dequantized": 0, "matmul": 0, "no_matmul": 0}
    assert "10 of 10 quantized leaves routed" in str(r)
    m, v, x = scanned_gemma
    q, r = report(m, v, x)
    assert r.counts == {"quantized": 5, "routed": 5, "dequantized": 0, "matmul": 0, "no_matmul": 0}
    calls = []
    real = jq.ops.qdot_general
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(jq.ops, "qdot_general", lambda *a, **k: calls.append(a[1].shape) or real(*a, **k))
        out = jq.apply(m, {"params": q}, x)
    layer_shapes = [(4, 32, 16), (2, 4, 32, 16), (4, 16, 32), (2, 64, 32), (64, 32)]  # one layer's slices
    assert all(calls.count(s) == 2 for s in layer_shapes), calls  # once per layer each
    ref = m.apply({"params": jq.dequantize_params(q)}, x)
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4)


def test_dense_layers_are_reported_routed():
    from flax import linen as nn

    class Mixed(nn.Module):
        @nn.compact
        def __call__(self, x):
            w = self.param("w", nn.initializers.normal(0.2), (16, 16))
            flat = self.param("flat", nn.initializers.normal(0.2), (4, 4, 16))
            return nn.Dense(16, name="dense")(x @ w) + x @ flat.reshape(16, 16)

    m, x = Mixed(), jnp.ones((2, 16))
    v = m.init(jax.random.key(0), x)
    q = jq.quantize_params(v["params"], jq.QuantConfig.simple(jq.Scheme("int8"), pattern=r".*(kernel|w|flat)"))
    r = jq.routing_report(m, {"params": q}, x)
    # `x @ w` reads the weight itself: routed; `flat` is reshaped first: read dequantized
    assert r.routed == ("dense/kernel", "w") and r.matmul == ("flat",)
    np.testing.assert_allclose(jq.apply(m, {"params": q}, x), m.apply(v, x), rtol=0.05, atol=0.05)


def test_user_code_matmuls_run_the_qtensor_through_jq_ops_whatever_their_layout(monkeypatch):
    """`x @ w`, `x @ w.T`, the weight as the einsum's first operand and a bf16 compute: the same result as the
    dequantized model, and the QTensor's policy (int8 activations) applied exactly as `jq.ops` applies it."""
    from flax import linen as nn

    from jq import ops

    class User(nn.Module):
        @nn.compact
        def __call__(self, x):
            a = self.param("a", nn.initializers.normal(0.3), (16, 24))
            b = self.param("b", nn.initializers.normal(0.3), (8, 24))        # used transposed
            c = self.param("c", nn.initializers.normal(0.3), (4, 8, 2))      # weight first in the einsum
            h = x @ a                                                          # [B, T, 24]
            h = jax.nn.relu(h @ b.T)                                           # [B, T, 8]
            return jnp.einsum("nkm,btk->bnmt", c, h.astype(jnp.bfloat16)).astype(jnp.float32)

    m, x = User(), jax.random.normal(jax.random.key(1), (2, 3, 16))
    v = m.init(jax.random.key(0), x)
    u = trace_usage(m, v, x)
    q = jq.quantize_params(v["params"], jq.QuantConfig.simple(jq.Scheme("int8", act="int8"), pattern=".*"), usage=u)
    from jq.interop import traced_routing

    seen = []
    real = traced_routing._route
    monkeypatch.setattr(traced_routing, "_route", lambda site, invals, w, i: seen.append(w.shape) or real(site, invals, w, i))
    out = jax.jit(lambda p, x: jq.apply(m, {"params": p}, x))(q, x)
    assert sorted(seen) == [(4, 8, 2), (8, 24), (16, 24)] and out.shape == (2, 4, 2, 3)
    # the reference: the model's own maths with each matmul done by jq.ops on the QTensor
    qa, qb, qc = q["a"], q["b"], q["c"]
    h = jax.nn.relu(ops.qdot_general(ops.qdot_general(x, qa, (((2,), (0,)), ((), ()))), qb, (((2,), (1,)), ((), ()))))
    y = ops.qdot_general(h.astype(jnp.bfloat16), qc, (((2,), (1,)), ((), ())))              # [B, T, n, m]
    np.testing.assert_allclose(out, jnp.transpose(y, (0, 2, 3, 1)).astype(jnp.float32), rtol=2e-2, atol=2e-2)
    dense = m.apply({"params": jq.dequantize_params(q)}, x)
    assert float(jnp.max(jnp.abs(out - dense))) > 1e-4  # the int8 activations made a difference


def test_nnx_models_are_traced_too():
    from flax import nnx

    from jq.interop.usage import trace_nnx_usage

    class M(nnx.Module):
        def __init__(self, rngs):
            self.emb = nnx.Embed(16, 8, rngs=rngs)
            self.w = nnx.Param(jax.random.normal(rngs.params(), (4, 8, 2)))
            self.lin = nnx.Linear(8, 8, rngs=rngs)

        def __call__(self, t):
            return jnp.einsum("btd,ndh->btnh", self.lin(self.emb(t)), self.w[...])

    graphdef, state = nnx.split(M(nnx.Rngs(0)))
    t = jnp.zeros((2, 3), jnp.int32)
    u = trace_nnx_usage(graphdef, state, t)
    assert u.axes() == {"lin/kernel": (0,), "w": (1,)} and u["emb/embedding"].kind == "embedding"
    q = jq.quantize_params(state, jq.QuantConfig.simple(jq.Scheme("int8", group_size=8), pattern=r"(w|lin/kernel)"),
                           usage=u)
    y = jax.jit(lambda s, t: jq.nnx_merge(graphdef, s)(t))(q, t)
    np.testing.assert_allclose(y, nnx.merge(graphdef, state)(t), rtol=0.05, atol=0.05)
