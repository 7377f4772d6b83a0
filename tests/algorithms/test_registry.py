"""Methods, grid fitters and transforms are records that compose: a new method is one registered function, a new
grid fitter one record that RTN and GPTQ both take, a new transform one registration — each exercised here with a
toy defined in this file, through the recipe (YAML-shaped dict) users write."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

import jq
from jq.algorithms import (GPTQ, METHODS, RTN, TRANSFORMS, HQQFit, LayerStats, LeastSquaresRefit, RangeFit, register,
                           register_transform)
from jq.algorithms.rtn import rtn
from jq.tree.recipe import recipe_from_dict, recipe_to_dict

W = np.random.default_rng(0).standard_normal((64, 16)).astype(np.float32)
INT4 = jq.Scheme("int4", symmetric=False, group_size=32)


def test_a_toy_method_is_one_registered_function_that_recipes_name_with_options():
    @register("_halved")
    def halved(w, scheme, layout, stats=None, *, factor: float = 0.5):
        return rtn(w * factor, scheme, layout)

    try:
        d = {"name": "toy", "rules": [{"pattern": ".*kernel", "method": "_halved", "format": "int8",
                                       "options": {"factor": 0.25}}]}
        cfg = recipe_from_dict(d)
        q = jq.quantize_params({"l": {"kernel": W}}, cfg)["l"]["kernel"]
        np.testing.assert_allclose(np.asarray(q.dequantize()), W * 0.25, atol=0.05)
        assert recipe_from_dict(recipe_to_dict(cfg)) == cfg  # and it round-trips like any recipe
        with pytest.raises(ValueError, match=r"method '_halved': unknown option\(s\) \['factr'\]; allowed: \['factor'\]"):
            recipe_from_dict({"rules": [{"pattern": ".*", "method": "_halved", "options": {"factr": 1}}]})
    finally:
        METHODS.pop("_halved")


@dataclasses.dataclass(frozen=True)
class HalfRange:
    """A toy grid fitter: the min-max range shrunk by half (a crude clip)."""

    def fit(self, xg, scheme, reduce_axes, *, weight=None, valid=None):
        lo, hi = jnp.min(xg, reduce_axes, keepdims=True), jnp.max(xg, reduce_axes, keepdims=True)
        return scheme.grid.scale_zero(lo / 2, hi / 2)


def test_a_grid_fitter_is_one_record_that_rtn_and_gptq_both_take():
    layout = INT4.layout(W.shape, (0,))
    q = RTN(grid=HalfRange()).quantize(jnp.asarray(W), INT4, layout)
    full = RTN().quantize(jnp.asarray(W), INT4, layout)
    assert float(jnp.max(q.scale)) < float(jnp.max(full.scale))  # the fitter decided the grid
    h = np.eye(64, dtype=np.float32)  # no error feedback: GPTQ on this grid is RTN on it
    g = GPTQ(grid=HalfRange()).quantize(jnp.asarray(W), INT4, layout, LayerStats(hessian=jnp.asarray(h)))
    np.testing.assert_array_equal(np.asarray(g.dequantize()), np.asarray(q.dequantize()))


def test_gptq_with_hqq_grids_and_a_refit_is_a_composition_of_records():
    rule = recipe_from_dict({"rules": [{"pattern": ".*", "method": "gptq", "format": "int4", "symmetric": False,
                                        "group_size": 32, "options": {"hqq": {"p": 1.0}, "refit": True}}]}).rules[0]
    assert rule.record == GPTQ(grid=HQQFit(p=1.0), refit=LeastSquaresRefit())
    assert recipe_from_dict({"rules": [{"pattern": ".*", "method": "hqq", "format": "int4", "symmetric": False,
                                        "group_size": 32}]}).rules[0].record == RTN(grid=HQQFit())
    assert RTN().grid == RangeFit()


def test_a_toy_transform_registers_and_runs_before_quantization():
    from jq.calibration.sequential import quantize_sequential
    from jq.models.llama.blocks import block_spec
    from jq.models.llama.config import LlamaConfig
    from jq.models.llama.model import init_params

    @dataclasses.dataclass(frozen=True)
    class Unit:
        """Scales of one: folding them changes nothing."""

        name = "_unit"

        def scales(self, weights, stats, scheme):
            return jnp.ones(weights[0].shape[0], jnp.float32)

    register_transform("_unit", Unit)
    try:
        cfg = LlamaConfig.tiny()
        params = init_params(cfg, __import__("jax").random.key(0))
        tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 16))
        base = {"pattern": ".*(q_proj|k_proj|v_proj)/kernel", "format": "int8"}
        with_t = recipe_from_dict({"rules": [{**base, "transforms": ["_unit"]}]})
        q, log = quantize_sequential(block_spec(cfg), params, with_t, tokens, progress=False)
        plain = jq.quantize_params(params, recipe_from_dict({"rules": [base]}))
        assert log["transforms"] and log["transforms"][0]["transform"] == "_unit"
        for path, x in jq.leaf_paths(q):
            if isinstance(x, jq.QTensor):
                np.testing.assert_array_equal(np.asarray(x.codes), np.asarray(dict(jq.leaf_paths(plain))[path].codes))
    finally:
        TRANSFORMS.pop("_unit")
    with pytest.raises(ValueError, match=r"unknown transform '_unit'; choose from \['awq', 'smoothquant'\]"):
        recipe_from_dict({"rules": [{**base, "transforms": ["_unit"]}]})
