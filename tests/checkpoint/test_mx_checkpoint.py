"""Checkpoints of microscaling QTensors: e8m0 / e4m3 scales and NVFP4's outer scale round-trip bit-exactly as format
3.0, and a model with MX activations keeps its policy."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import jq
from jq import checkpoint as ck
from jqtest.checkpoints import _same


def test_mx_and_nvfp4_round_trip_bit_exact_as_format_3(tmp_path):
    k = jax.random.split(jax.random.key(4), 4)
    params = {"a": {"kernel": jax.random.normal(k[0], (64, 24))}, "b": {"kernel": jax.random.normal(k[1], (48, 16))},
              "c": {"kernel": jax.random.normal(k[2], (64, 8))}, "d": {"kernel": jax.random.normal(k[3], (40, 8))}}
    cfg = jq.QuantConfig(name="mx", rules=(
        jq.Rule("a/kernel", jq.Scheme("mxfp4", act="mxfp8_e4m3")),
        jq.Rule("b/kernel", jq.Scheme("nvfp4", act="nvfp4")),
        jq.Rule("c/kernel", jq.Scheme("mxint8")),
        jq.Rule("d/kernel", jq.Scheme("mxfp6_e2m3", pad=True, scale_round="ceil")),
    ))
    q = jq.quantize_params(params, cfg)
    back, meta = ck.load(ck.save(tmp_path / "q", q, recipe=cfg))
    _same(q, back)
    for p in params:
        a, b = q[p]["kernel"], back[p]["kernel"]
        assert b.scale.dtype == a.scale.dtype
        np.testing.assert_array_equal(np.asarray(a.scale).view(np.uint8), np.asarray(b.scale).view(np.uint8))
        assert (a.outer_scale is None) == (b.outer_scale is None)
        if a.outer_scale is not None:
            assert b.outer_scale.dtype == jnp.float32 and float(a.outer_scale) == float(b.outer_scale)
        np.testing.assert_array_equal(np.asarray(a.dequantize()), np.asarray(b.dequantize()))
    assert meta["format_version"] == "3.0"
    assert back["b"]["kernel"].policy.act == "nvfp4"
