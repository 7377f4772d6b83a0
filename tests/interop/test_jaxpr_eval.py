"""The jaxpr interpreter: one batch at a time (`evaluate`, what traced routing and capture run under jit) and all
batches in lockstep (`evaluate_batches`, what traced sequential calibration runs) see the same matmul inputs and
give the model's own outputs; a hook's output replaces the equation's downstream."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jq.interop.jaxpr_eval import Batched, evaluate, evaluate_batches
from jq.interop.usage import trace_usage


def _leaves(usage, variables):
    """The parameter leaves in the order the trace takes them."""
    flat = jax.tree_util.tree_flatten_with_path(variables["params"])[0]
    assert jax.tree_util.tree_structure(variables["params"]) == usage.treedef
    return [x for _, x in flat]


def test_lockstep_batches_see_what_each_batch_sees_alone(scanned_gemma, tokens):
    m, v, _ = scanned_gemma
    batches = [tokens(s, 2, 8) for s in range(3)]
    usage = trace_usage(m, v, batches[0])
    leaves = _leaves(usage, v)
    alone: dict = {}
    for b, x in enumerate(batches):
        def record(site, invals, index, b=b):
            alone[(site.path, index, b)] = np.asarray(invals[1 - site.side])

        out = evaluate(usage, leaves, (x,), record)
        np.testing.assert_allclose(out, m.apply(v, x), rtol=1e-5, atol=1e-5)  # the interpreter is the model
    seen: dict = {}

    def lockstep(site, invals, index):
        xs = invals[1 - site.side]
        assert isinstance(xs, Batched) and len(xs) == 3
        for b, x in enumerate(xs):
            seen[(site.path, index, b)] = np.asarray(x)

    q = "layers/Block_0/attn/q_einsum/w"
    evaluate_batches(usage, leaves, [(x,) for x in batches], lockstep, wanted=lambda s: s.path == q)
    assert {k for k in seen if k[0] == q} == {k for k in alone if k[0] == q}  # both layers, every batch
    for k, x in seen.items():
        np.testing.assert_allclose(x, alone[k], rtol=1e-5, atol=1e-6)
    assert not any(k[0].endswith("mlp/linear") and k[1] == (1,) for k in seen)  # stopped after the last wanted site


def test_a_hook_output_replaces_the_matmul_for_everything_after_it(scanned_gemma, tokens):
    m, v, _ = scanned_gemma
    batches = [tokens(s, 2, 8) for s in range(2)]
    usage = trace_usage(m, v, batches[0])
    leaves = _leaves(usage, v)
    q, o = "layers/Block_0/attn/q_einsum/w", "layers/Block_0/attn/attn_vec_einsum/w"
    seen: dict = {}

    def zero_q_of_layer_0(site, invals, index):
        xs = invals[1 - site.side]
        if site.path == o:
            seen[index] = [np.asarray(x) for x in xs]
        if site.path == q and index == (0,):
            return Batched(jnp.zeros(a.shape[:2] + (4, 16), jnp.float32) for a in xs)  # [B, T, heads, head_dim]
        return None

    evaluate_batches(usage, leaves, [(x,) for x in batches], zero_q_of_layer_0,
                     wanted=lambda s: s.path in (q, o))
    # with q = 0 every key gets the same score, so layer 0's attention averages the values of the causal prefix
    for b, x in enumerate(batches):
        emb = v["params"]["embedder"]["input_embedding"][x] * np.sqrt(32)
        scale = v["params"]["layers"]["Block_0"]["pre_attention_norm"]["scale"][0]
        h = emb * jax.lax.rsqrt(jnp.mean(emb * emb, -1, keepdims=True) + 1e-6) * (1 + scale)
        wv = v["params"]["layers"]["Block_0"]["attn"]["kv_einsum"]["w"][0, 1]                  # [heads, D, head_dim]
        vals = jnp.einsum("btd,ndh->btnh", h, wv)
        causal_mean = jnp.cumsum(vals, axis=1) / jnp.arange(1, 9)[None, :, None, None]
        np.testing.assert_allclose(seen[(0,)][b], causal_mean, rtol=1e-4, atol=1e-5)
