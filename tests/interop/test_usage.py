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
    with pytest.warns(UserWarning, match="none of the 10 quantized leaves"):
        out = jq.apply(m, {"params": q}, x)
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


def test_the_routing_report_counts_routed_and_dequantized_leaves(gemma):
    m, v, x = gemma
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = jq.quantize_params(v["params"], _cfg(), usage=trace_usage(m, v, x))
    r = jq.routing_report(m, {"params": q}, x)
    assert r.counts == {"quantized": 10, "routed": 0, "dequantized": 10, "matmul": 10, "no_matmul": 0}
    assert "0 of 10 quantized leaves routed" in str(r)


def test_dense_layers_are_reported_routed():
    from flax import linen as nn

    class Mixed(nn.Module):
        @nn.compact
        def __call__(self, x):
            w = self.param("w", nn.initializers.normal(0.2), (16, 16))
            return nn.Dense(16, name="dense")(x @ w)

    m, x = Mixed(), jnp.ones((2, 16))
    v = m.init(jax.random.key(0), x)
    q = jq.quantize_params(v["params"], jq.QuantConfig.simple(jq.Scheme("int8"), pattern=r".*(kernel|w)"))
    r = jq.routing_report(m, {"params": q}, x)
    assert r.routed == ("dense/kernel",) and r.matmul == ("w",)
    np.testing.assert_allclose(jq.apply(m, {"params": q}, x), m.apply(v, x), rtol=0.05, atol=0.05)


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
