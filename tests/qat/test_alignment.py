"""jq.qat.gradient_alignment: the cosine between a recipe's QAT gradient and the float gradient, against NumPy."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jq import qat
from jq.tree.recipe import recipe_from_dict

CENTRED = {"symmetric": False, "zero_point": "float", "scale_dtype": "float32"}


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(8, name="Dense_1")(nn.tanh(nn.Dense(32, name="Dense_0")(x)))


def _setup(rule: dict):
    cfg = recipe_from_dict({"rules": [{"pattern": ".*kernel", "method": "qat", **rule}]})
    x = jax.random.normal(jax.random.PRNGKey(1), (4, 6, 64))
    y = jax.random.normal(jax.random.PRNGKey(2), (4, 6, 8))
    model = MLP()
    params = model.init(jax.random.PRNGKey(0), x[0])["params"]

    def loss(p, batch, act_cfg):
        xb, yb = batch
        return jnp.mean((qat.apply(model, {"params": p}, xb, cfg=act_cfg) - yb) ** 2)

    return cfg, params, loss, list(zip(x[:2], y[:2]))


def _flat(tree) -> dict[str, np.ndarray]:
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(k): np.asarray(v, np.float64) for k, v in leaves}


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / np.sqrt((a @ a) * (b @ b)))


def test_alignment_matches_numpy_over_batches_and_groups():
    rule = {"format": "int3", **CENTRED, "group_size": 16, "range": "gaussian", "rotate": "hadamard", "act": "int4",
            "act_clip": "gaussian", "options": {"ste": "trust"}}
    cfg, params, loss, batches = _setup(rule)
    got = qat.gradient_alignment(loss, params, cfg, batches)

    gf = [_flat(jax.grad(lambda p: loss(p, b, None))(params)) for b in batches]
    gq = [_flat(jax.grad(lambda p: loss(qat.fake_quantize({"params": p, "quant": {}}, cfg), b, cfg))(params))
          for b in batches]
    kernels = [k for k in gf[0] if k.endswith("['kernel']")]
    assert got["leaves"] == len(kernels) == 2

    def joined(gs, keys):
        return np.concatenate([sum(g[k] for g in gs).ravel() for k in keys])

    a, b = joined(gq, kernels), joined(gf, kernels)
    assert got["cosine"] == pytest.approx(_cos(a, b), rel=1e-6)
    assert got["norm_ratio"] == pytest.approx(np.linalg.norm(a) / np.linalg.norm(b), rel=1e-6)
    # rotated leaves: the trust mask's zeros live in the codes' basis (Qᵀ g), not in the masters' one
    assert np.mean(a == 0) == 0.0 and 0.0 < got["zero_fraction"] < 0.2
    for i in range(2):
        assert got["cosine_per_batch"][i] == pytest.approx(_cos(joined(gq[i:i + 1], kernels),
                                                                joined(gf[i:i + 1], kernels)), rel=1e-6)
    for name in ("Dense_0", "Dense_1"):
        key = [k for k in kernels if name in k]
        assert got["groups"][name] == pytest.approx(_cos(joined(gq, key), joined(gf, key)), rel=1e-6)
    assert got["loss_float"] == pytest.approx(np.mean([float(loss(params, b, None)) for b in batches]), rel=1e-6)
    assert 0.0 < got["cosine"] < 1.0 and got["loss_qat"] != got["loss_float"]


def test_int8_identity_ste_is_aligned_and_the_trust_mask_zeroes_exactly_the_far_weights():
    cfg8, params, loss, batches = _setup({"format": "int8", "symmetric": True, "group_size": 16})
    fine = qat.gradient_alignment(loss, params, cfg8, batches)
    assert fine["cosine"] > 0.999 and fine["zero_fraction"] == 0.0

    # int2 with a Gaussian clip and the trust mask, weights only: the QAT gradient is the float one through the
    # fake-quantized weights with the entries whose rounding error exceeds half a step zeroed
    cfg2, _, _, _ = _setup({"format": "int2", **CENTRED, "group_size": 16, "range": "gaussian",
                            "options": {"ste": "trust"}})
    got = qat.gradient_alignment(loss, params, cfg2, batches)
    w = np.asarray(params["Dense_1"]["kernel"], np.float64)
    fq = np.asarray(qat.fake_quantize({"params": params, "quant": {}}, cfg2)["Dense_1"]["kernel"], np.float64)
    groups_w, groups_fq = w.reshape(2, 16, 8), fq.reshape(2, 16, 8)  # kernel [32, 8], groups of 16 along axis 0
    step = np.array([[np.diff(np.unique(groups_fq[g, :, n].round(6))).min() for n in range(8)] for g in range(2)])
    far = np.abs(groups_fq - groups_w) > step[:, None, :] / 2 * (1 + 1e-5)
    gq = np.asarray(jax.grad(lambda p: sum(loss(qat.fake_quantize({"params": p, "quant": {}}, cfg2), b, None)
                                           for b in batches))(params)["Dense_1"]["kernel"]).reshape(2, 16, 8)
    assert far.any() and np.all(gq[far] == 0) and np.all(gq[~far] != 0)
    assert 0 < got["zero_fraction"] < 0.5 and got["cosine"] < fine["cosine"]


def test_learned_step_sizes_start_from_their_init():
    cfg, params, loss, batches = _setup({"format": "int4", "group_size": 16, "options": {"lsq": True}})
    got = qat.gradient_alignment(loss, params, cfg, batches)
    qp = qat.init(params, cfg)
    assert jax.tree_util.tree_leaves(qp["quant"])  # step sizes exist: the QAT forward needs them
    gq = jax.grad(lambda p: loss(qat.fake_quantize({"params": p, "quant": qp["quant"]}, cfg), batches[0], cfg))(params)
    gf = jax.grad(lambda p: loss(p, batches[0], None))(params)
    a, b = (np.concatenate([np.asarray(g[n]["kernel"]).ravel() for n in ("Dense_0", "Dense_1")]) for g in (gq, gf))
    assert got["cosine_per_batch"][0] == pytest.approx(_cos(a, b), rel=1e-6) and got["cosine"] > 0.9


def test_a_recipe_that_quantizes_nothing_is_refused():
    cfg, params, loss, batches = _setup({"format": "int4"})
    none = recipe_from_dict({"name": "nothing", "rules": [{"pattern": ".*no_such", "method": "qat", "format": "int4"}]})
    with pytest.raises(ValueError, match="recipe 'nothing' quantizes no leaf"):
        qat.gradient_alignment(loss, params, none, batches)
    with pytest.raises(ValueError, match="no batches"):
        qat.gradient_alignment(loss, params, cfg, [])
