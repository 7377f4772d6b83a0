"""Calibration and GPTQ on weights that user code applies with `jnp.einsum` (the Gemma 3 report): capture records
their inputs by tracing (per layer under `nn.scan`), and GPTQ runs on any contraction / output axis arrangement."""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

import jq
from jq.calibration.capture import capture
from jq.calibration.usage_capture import traced_capture
from jq.interop.usage import trace_usage
from jq.numbers.qtensor import is_qtensor

Q = "layer_0/attn/q_einsum/w"
O = "layer_0/attn/attn_vec_einsum/w"


def _einsum_inputs(m, v, x) -> dict[str, np.ndarray]:
    """The input x of every `Einsum` module call, by its weight path (the NumPy reference)."""
    seen = {}

    def grab(next_fun, args, kwargs, context):
        if type(context.module).__name__ == "Einsum" and context.method_name == "__call__":
            seen["/".join(context.module.scope.path) + "/w"] = np.asarray(args[1])
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(grab):
        m.apply(v, x)
    return seen


def test_capture_records_einsum_weights_like_numpy(gemma, tokens):
    m, v, _ = gemma
    batches = [tokens(3), tokens(4)]
    stats = capture(m, v, batches)  # no standard layer at all: the traced capture does the work
    assert Q in stats and O in stats and "layer_1/mlp/linear" in stats
    xs = [_einsum_inputs(m, v, b) for b in batches]
    xq = np.concatenate([s[Q].reshape(-1, 32) for s in xs])  # 'BTD,NDH': D contracted
    np.testing.assert_allclose(stats[Q].hessian, xq.T @ xq / len(xq), rtol=1e-4, atol=1e-5)
    assert float(stats[Q].count) == len(xq)
    xo = np.concatenate([s[O].reshape(-1, 4 * 16) for s in xs])  # 'BTNH,NHD': (N, H) flattened in order
    np.testing.assert_allclose(stats[O].hessian, xo.T @ xo / len(xo), rtol=1e-4, atol=1e-5)


def test_capture_says_which_weights_it_could_not_record(gemma, tokens):
    m, v, x = gemma
    with pytest.raises(ValueError, match="never called"):
        capture(m, v, [x], paths=["nope/w"])

    class Batched(nn.Module):  # per-expert weights through a batch dim of the dot: one Hessian per expert
        @nn.compact
        def __call__(self, x):
            w = self.param("experts", nn.initializers.normal(0.2), (3, 8, 8))
            return jnp.einsum("etk,ekn->etn", x, w)

    b, xb = Batched(), jnp.ones((3, 4, 8))
    with pytest.warns(UserWarning, match="experts: its matmul has batch dims"):
        assert capture(b, b.init(jax.random.key(0), xb), [xb]) == {}


def test_scanned_layers_get_per_layer_statistics(scanned_gemma, tokens):
    m, v, _ = scanned_gemma
    stats, skipped = traced_capture(m, v, [tokens(3)])
    assert skipped == {}
    s = stats["layers/Block_0/attn/q_einsum/w"]
    assert s.hessian.shape == (2, 32, 32) and s.count.shape == (2,)
    assert not np.allclose(s.hessian[0], s.hessian[1])  # each layer sees its own input


def _layer_err(w, q, x, eq):
    return float(jnp.linalg.norm(jnp.einsum(eq, x, w) - jnp.einsum(eq, x, q.dequantize())))


@pytest.mark.parametrize("path, eq, act_order", [(Q, "td,ndh->tnh", False), (Q, "td,ndh->tnh", True),
                                                 (O, "tnh,nhd->td", False), (O, "tnh,nhd->td", True)])
def test_gptq_on_einsum_weights_beats_rtn(gemma, tokens, path, eq, act_order):
    m, v, _ = gemma
    batches = [tokens(s, 4, 16) for s in range(3)]
    stats = capture(m, v, batches)
    u = trace_usage(m, v, batches[0])
    w = v["params"]
    for k in path.split("/"):
        w = w[k]
    scheme = jq.Scheme("int4", group_size=16)
    rules = lambda method, **o: jq.QuantConfig(rules=(jq.Rule(path, scheme, method, options=tuple(o.items())),))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        g = jq.quantize_params(v["params"], rules("gptq", act_order=act_order), calib=stats, usage=u)
        r = jq.quantize_params(v["params"], rules("rtn"), usage=u)
    pick = lambda t: t[path.split("/")[0]][path.split("/")[1]][path.split("/")[2]][path.split("/")[3]]
    qg, qr = pick(g), pick(r)
    assert qg.layout == qr.layout and qg.shape == w.shape
    assert (qg.perm is not None) == act_order
    x = np.concatenate([_einsum_inputs(m, v, b)[path].reshape((-1,) + _einsum_inputs(m, v, b)[path].shape[2:])
                        for b in batches])
    assert _layer_err(w, qg, x, eq) < 0.95 * _layer_err(w, qr, x, eq)


def test_gptq_on_scanned_einsum_weights_runs_per_layer(scanned_gemma, tokens):
    m, v, x = scanned_gemma
    stats, _ = traced_capture(m, v, [tokens(5, 4, 16)])
    cfg = jq.QuantConfig.simple(jq.Scheme("int4", group_size=16), pattern=r".*(/w|gating_einsum|linear)",
                                method="gptq")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = jq.quantize_params(v["params"], cfg, calib=stats, usage=trace_usage(m, v, x))
        out = jq.apply(m, {"params": q}, x)
    t = q["layers"]["Block_0"]["attn"]["q_einsum"]["w"]
    assert t.layout.axes == (2,) and 4 < t.bits_per_weight < 5.5
    ref = m.apply(v, x)
    assert float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref)) < 0.15


def test_quantize_model_on_third_party_code_uses_the_traced_axes_and_says_what_a_llama_recipe_missed(gemma, tokens):
    """`jq.quantize_model` as a new user calls it: a Llama recipe names the einsum weights it missed; the same
    recipe with a pattern for this model calibrates weight by weight through the traced jaxpr (the blocks'
    layers are not standard ones), each weight grouped along the axes the model contracts — act-order included
    on o's two contraction axes."""
    m, v, x = gemma
    data = np.concatenate([np.asarray(tokens(s, 4, 16)) for s in range(2)])
    scheme = jq.Scheme("int4", group_size=16)
    llama = jq.QuantConfig.simple(scheme, pattern=".*kernel", method="gptq")
    with pytest.warns(UserWarning, match=r"'\.\*kernel' matched no parameter.*q_einsum/w \(4, 32, 16\) axes \(1,\)"):
        q, log = jq.quantize_model(m, v["params"], llama, data)
    assert not any(is_qtensor(leaf) for leaf in jax.tree.leaves(q, is_leaf=is_qtensor))
    own = jq.QuantConfig(rules=(jq.Rule(r".*(/w|gating_einsum|linear)", scheme, "gptq",
                                        options=(("act_order", True),)),))
    q, log = jq.quantize_model(m, v["params"], own, data)
    assert log["mode"] == "sequential (traced)" and len(log["sequential"]) == 10 and log["after"] == {}
    axes = {k: q["layer_0"]["attn"][k]["w"].layout.axes for k in ("q_einsum", "kv_einsum", "attn_vec_einsum")}
    assert axes == {"q_einsum": (1,), "kv_einsum": (2,), "attn_vec_einsum": (0, 1)}
    assert q["layer_0"]["attn"]["attn_vec_einsum"]["w"].perm is not None
    assert all(4 < leaf.bits_per_weight < 6.5 for leaf in jax.tree.leaves(q, is_leaf=is_qtensor)
               if is_qtensor(leaf))
    ref = m.apply(v, x)
    assert float(jnp.linalg.norm(jq.apply(m, {"params": q}, x) - ref) / jnp.linalg.norm(ref)) < 0.15
