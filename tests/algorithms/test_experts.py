"""Stacked expert weights (`jq.algorithms.experts`) with codebook methods: each expert of [E, K, N] quantized on its
own Hessian equals quantizing it alone, an expert no token reached gets the method on H = I (warned), the stacked
QTensor round-trips a checkpoint; and the refusal of an online rotation there."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jq
from jq.algorithms.stats import LayerStats
from jq.tree.quantize import quantize_leaf
from jq.tree.recipe import recipe_from_dict


def _experts(E=3, K=64, N=8, seed=0):
    keys = jax.random.split(jax.random.key(seed), 2 * E)
    xs = [jax.random.normal(keys[e], (512, K)) * (1 + jnp.arange(K) / K) for e in range(E)]
    w = jnp.stack([0.05 * jax.random.normal(keys[E + e], (K, N)) for e in range(E)])
    return w, LayerStats(hessian=jnp.stack([x.T @ x / 512 for x in xs]), count=jnp.full((E,), 512.0))


@pytest.mark.parametrize("rule", [{"method": "gptvq", "format": "cb4x2", "group_size": 32, "options": {"iters": 8}},
                                  {"method": "quip", "format": "e8p", "granularity": "channel"},
                                  {"method": "kmeans", "format": "cb3", "granularity": "channel",
                                   "options": {"iters": 6, "feedback": True, "outliers": 0.02}}])
def test_codebooks_on_stacked_experts_equal_each_expert_alone(tmp_path, rule):
    w, st = _experts()
    cfg = recipe_from_dict({"name": "x", "rules": [{"pattern": ".*kernel", "axes": [1], **rule}]})
    q = quantize_leaf("e/kernel", w, cfg.rules[0], st)
    assert q.shape == (3, 64, 8) and q.fmt == rule["format"]
    one = recipe_from_dict({"name": "x", "rules": [{"pattern": ".*kernel", **rule}]}).rules[0]
    for e in range(3):
        alone = quantize_leaf("a/kernel", w[e], one, LayerStats(hessian=st.hessian[e]))
        np.testing.assert_allclose(np.asarray(q.dequantize())[e], np.asarray(alone.dequantize()), rtol=1e-5,
                                   atol=1e-6)
    x = jax.random.normal(jax.random.key(1), (2, 5, 64))  # the MoE layer's contraction runs on the codebook leaf
    np.testing.assert_allclose(np.asarray(jq.ops.qeinsum("btd,edf->btef", x, q)),
                               np.einsum("btd,edf->btef", np.asarray(x), np.asarray(q.dequantize())), rtol=1e-4,
                               atol=1e-5)
    from jq import checkpoint as ck

    ck.save(tmp_path / "ck", {"e": {"kernel": q}})
    back = ck.load(tmp_path / "ck")[0]["e"]["kernel"]
    np.testing.assert_array_equal(np.asarray(back.dequantize()), np.asarray(q.dequantize()))

    dead = LayerStats(hessian=st.hessian.at[1].set(0.0), count=st.count.at[1].set(0.0))
    with pytest.warns(UserWarning, match=rf"e/kernel: .* expert\(s\) \[1\] of 3; quantized them with unweighted "
                                         rf"{rule['method']}"):
        qd = quantize_leaf("e/kernel", w, cfg.rules[0], dead)
    plain = quantize_leaf("a/kernel", w[1], one, LayerStats(hessian=jnp.eye(64)))
    np.testing.assert_allclose(np.asarray(qd.dequantize())[1], np.asarray(plain.dequantize()), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(qd.dequantize())[0], np.asarray(q.dequantize())[0])


def test_stacked_expert_weights_refuse_an_online_rotation_naming_the_leaf():
    st = LayerStats(hessian=jnp.stack([jnp.eye(64)] * 2), count=jnp.ones(2))
    cfg = recipe_from_dict({"name": "x", "rules": [{"pattern": ".*kernel", "axes": [1], "format": "int4",
                                                    "method": "gptq", "rotate": "hadamard"}]})
    with pytest.raises(ValueError, match=r"e/kernel: rotate: hadamard is not supported on stacked expert weights; "
                                         "drop rotate"):
        quantize_leaf("e/kernel", jnp.ones((2, 64, 8)), cfg.rules[0], st)
