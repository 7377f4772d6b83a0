"""QAT on microscaling presets: straight-through fake quantization equals the PTQ (RTN) model bit for bit, with the
identity gradient; learned step sizes (LSQ) are refused with the fix."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jq
from jq import qat
from jq.numbers.scheme import Scheme
from jq.tree.recipe import QuantConfig, Rule
from jqtest.checkpoints import _same

SCHEMES = [(Scheme("mxfp4"), (64, 20)), (Scheme("nvfp4"), (48, 20)), (Scheme("mxint8"), (64, 12)),
           (Scheme("mxfp6_e3m2", pad=True), (40, 12)), (Scheme("mxfp8_e4m3", scale_round="ceil"), (32, 8))]


def _zoo(lsq: bool = False):
    rng = np.random.default_rng(3)
    params = {f"l{i}": {"kernel": jnp.asarray(rng.standard_t(5, size=shape).astype(np.float32))}
              for i, (_, shape) in enumerate(SCHEMES)}
    rules = tuple(Rule(f"l{i}/kernel", sch, "qat", options=(("lsq", lsq),)) for i, (sch, _) in enumerate(SCHEMES))
    return params, QuantConfig(rules=rules)


def test_fake_quant_equals_ptq_and_gradient_is_identity():
    params, cfg = _zoo()
    qp = qat.init(params, cfg)
    ptq = jq.quantize_params(params, cfg)
    conv = qat.convert(qp, cfg)
    _same(conv, ptq)
    assert float(conv["l1"]["kernel"].outer_scale) == float(ptq["l1"]["kernel"].outer_scale)
    fq = jax.jit(lambda p: qat.fake_quantize(p, cfg))(qp)
    deq = jq.dequantize_params(ptq)
    for k in params:
        np.testing.assert_array_equal(np.asarray(fq[k]["kernel"]), np.asarray(deq[k]["kernel"]))
    g = jax.grad(lambda p: sum(jnp.sum(x) for x in jax.tree_util.tree_leaves(qat.fake_quantize(p, cfg))))(qp)
    for k in params:
        np.testing.assert_array_equal(np.asarray(g["params"][k]["kernel"]), 1.0)


def test_lsq_on_a_preset_is_refused_with_the_fix():
    params, cfg = _zoo(lsq=True)
    with pytest.raises(ValueError, match=r"'lsq' is true but format 'mxfp4' has fixed power-of-two / e4m3 block "
                                         r"scales .*set lsq: false"):
        qat.init(params, cfg)
