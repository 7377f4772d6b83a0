"""Microscaling presets under the methods: GPTQ on the MX / NVFP4 grids (block scales chosen as GPTQ reaches each
block) beats RTN on a problem with a Hessian; MSE search over power-of-two scales; quantize / dequantize_params."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jq
from jq.algorithms.stats import LayerStats
from jq.tree.quantize import quantize_leaf
from jq.tree.recipe import recipe_from_dict


def _problem():
    rng = np.random.default_rng(0)
    z = rng.standard_normal((1024, 24))  # correlated inputs (low rank + noise): GPTQ has something to use
    x = (z @ rng.standard_normal((24, 128)) + 0.1 * rng.standard_normal((1024, 128))).astype(np.float32)
    w = (rng.standard_normal((128, 48)) * 0.05).astype(np.float32)
    return jnp.asarray(x), jnp.asarray(w), LayerStats(hessian=jnp.asarray(x.T @ x / 1024), count=jnp.float32(1024))


def _rule(fmt, method, **kw):
    opts = {"options": {"act_order": True}} if method == "gptq" else {}
    return recipe_from_dict({"rules": [{"pattern": ".*kernel", "format": fmt, "method": method, **kw, **opts}]}).rules[0]


@pytest.mark.parametrize("fmt", ["mxfp4", "nvfp4", "mxfp6_e2m3"])
def test_gptq_on_the_mx_grid_beats_rtn(fmt):
    x, w, stats = _problem()
    err = {}
    for method in ("rtn", "gptq"):
        q = quantize_leaf("d/kernel", w, _rule(fmt, method), stats)
        assert q.scale.dtype == (jnp.float8_e4m3fn if fmt == "nvfp4" else jnp.float8_e8m0fnu)
        assert (q.outer_scale is not None) == (fmt == "nvfp4")
        if fmt != "nvfp4":  # every stored scale a power of two
            s = np.asarray(q.scale, np.float32)
            np.testing.assert_array_equal(s, np.exp2(np.round(np.log2(s))))
        err[method] = float(jnp.mean((x @ (q.dequantize() - w)) ** 2))
    assert err["gptq"] < 0.7 * err["rtn"], err


def test_mse_search_over_power_of_two_scales_is_no_worse_than_the_spec_rule():
    _, w, _ = _problem()
    e = {r: float(jnp.sum((quantize_leaf("d/kernel", w, _rule("mxfp4", "rtn", range=r)).dequantize() - w) ** 2))
         for r in ("minmax", "mse")}
    assert e["mse"] <= e["minmax"]


def test_quantize_params_round_trip_and_bf16_weights():
    w = jax.random.normal(jax.random.key(0), (64, 16), jnp.bfloat16)
    cfg = recipe_from_dict({"rules": [{"pattern": ".*kernel", "format": "nvfp4"}]})
    q = jq.quantize_params({"a": {"kernel": w, "bias": jnp.ones(16)}}, cfg)
    k = q["a"]["kernel"]
    assert k.dtype == "bfloat16" and k.outer_scale.shape == () and k.outer_scale.dtype == jnp.float32
    d = jq.dequantize_params(q)["a"]["kernel"]
    assert d.dtype == jnp.bfloat16
    rel = float(jnp.linalg.norm((d - w).astype(jnp.float32)) / jnp.linalg.norm(w.astype(jnp.float32)))
    assert rel < 0.15
