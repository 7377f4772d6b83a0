"""QoQ's SmoothAttention: λ equal on RoPE pairs and GQA-shared, the fold leaves a tiny Llama's logits unchanged
(also with a quantized KV cache's rotation off), key outliers shrink, and the recipe section parses and round-trips."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jq
from jq.algorithms.smoothattention import SmoothAttentionConfig, fold_smooth_attention, smooth_attention_scales
from jq.models.llama.model import init_params, make_forward
from jq.models.llama.smooth import key_absmax, smooth_attention
from jq.tree.recipe import recipe_from_dict, recipe_to_dict
from jqtest.llama import tiny_cfg


def test_scales_pair_channels_and_fold_shares_them_across_query_heads():
    a = np.array([4.0, 1.0, 0.0, 9.0, 1.0, 16.0, 2.0, np.inf])  # 2 kv heads of head_dim 4
    lam = np.asarray(smooth_attention_scales(jnp.asarray(a), 4, 0.5, "half"))
    np.testing.assert_allclose(lam, [2.0, 3.0, 2.0, 3.0, 1.4142135, 4.0, 1.4142135, 4.0], rtol=1e-6)
    lam_i = np.asarray(smooth_attention_scales(jnp.asarray(a), 4, 1.0, "interleaved"))
    np.testing.assert_allclose(lam_i, [4.0, 4.0, 9.0, 9.0, 16.0, 16.0, 2.0, 2.0])
    assert np.all(np.asarray(smooth_attention_scales(jnp.zeros(8), 4)) == 1.0)
    wq, wk = np.ones((3, 16), np.float32), np.ones((3, 8), np.float32)  # 4 query heads on 2 kv heads
    fq, fk = fold_smooth_attention(jnp.asarray(wq), jnp.asarray(wk), jnp.asarray(lam), 4, 2)
    np.testing.assert_allclose(np.asarray(fk)[0], 1.0 / lam, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(fq)[0], np.concatenate([lam[:4], lam[:4], lam[4:], lam[4:]]), rtol=1e-6)
    with pytest.raises(ValueError, match="alpha"):
        SmoothAttentionConfig(alpha=0.0)
    with pytest.raises(ValueError, match="heads"):
        smooth_attention_scales(jnp.ones(6), 4)


def test_fold_leaves_the_float_llama_unchanged_and_shrinks_key_outliers():
    cfg = dataclasses.replace(tiny_cfg(False), n_layers=1)  # one block: compiles in half the time
    params = init_params(cfg, jax.random.key(0))
    wk = params["layers_0"]["attn"]["k_proj"]["kernel"]
    params["layers_0"]["attn"]["k_proj"]["kernel"] = wk.at[:, 1].mul(30.0).at[:, 9].mul(0.01)  # an outlier channel
    tokens = jax.random.randint(jax.random.key(1), (4, 12), 0, cfg.vocab_size)
    sp, info = smooth_attention(params, cfg, SmoothAttentionConfig(0.5), np.asarray(tokens), batch_size=2)
    assert info["layers"] == cfg.n_layers and info["key_absmax_max_after"] < info["key_absmax_max"] / 3
    fwd = jax.jit(make_forward(cfg))
    ref, out = np.asarray(fwd(params, tokens)), np.asarray(fwd(sp, tokens))
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
    # keys after the fold: a channel pair's max |K| is now max^(1 − α) of the larger one
    halves = [tokens[:2], tokens[2:]]  # the batch shape smooth_attention compiled for
    before, after = key_absmax(params, cfg, halves), key_absmax(sp, cfg, halves)
    b0, a0 = np.asarray(before["layers_0"]).reshape(-1, 8), np.asarray(after["layers_0"]).reshape(-1, 8)
    pair = np.maximum(b0[:, :4], b0[:, 4:])
    np.testing.assert_allclose(np.maximum(a0[:, :4], a0[:, 4:]), np.sqrt(pair), rtol=1e-4)
    assert params["layers_0"]["attn"]["k_proj"]["kernel"] is not sp["layers_0"]["attn"]["k_proj"]["kernel"]


def test_recipe_section_parses_round_trips_and_needs_calibration():
    d = {"name": "q", "rules": [{"pattern": ".*kernel", "format": "int4", "symmetric": False, "group_size": 32,
                                 "progressive": True, "act": "int8"}],
         "smooth_attention": {"alpha": 0.5}, "kv_cache": {"format": "int4", "group_size": 8}}
    cfg = recipe_from_dict(d)
    assert cfg.smooth_attention == SmoothAttentionConfig(0.5) and cfg.needs_calibration
    assert recipe_from_dict(recipe_to_dict(cfg)) == cfg
    with pytest.raises(ValueError, match="smooth_attention: unknown field"):
        recipe_from_dict({**d, "smooth_attention": {"beta": 1}})
    shipped = jq.load_recipe("qoq_w4a8kv4")
    assert shipped.smooth_attention is not None and shipped.kv_cache.format == "int4"
    assert all(r.scheme.progressive and r.scheme.act == "int8" for r in shipped.rules)
    assert dataclasses.replace(cfg, smooth_attention=None).needs_calibration is False


def test_smoothattention_bad_inputs_are_named():
    with pytest.raises(ValueError, match=r"'alpha' must be a number in \(0, 1\] \(the paper uses 0\.5\), got 1\.5"):
        SmoothAttentionConfig(alpha=1.5)
    with pytest.raises(ValueError, match=r"pairing 'odd'; allowed values are \['half', 'interleaved', 'none'\]"):
        smooth_attention_scales(np.ones(8), 4, pairing="odd")
    with pytest.raises(ValueError, match=r"key statistics of shape \(10,\) do not split into heads of 4 channels"):
        smooth_attention_scales(np.ones(10), 4)
    with pytest.raises(ValueError, match=r"3 query heads do not divide into 2 kv heads"):
        fold_smooth_attention(np.ones((4, 12)), np.ones((4, 8)), np.ones(8), 3, 2)
    with pytest.raises(ValueError, match=r"λ of 8 channels does not fit k_proj \(4, 6\) / q_proj \(4, 16\)"):
        fold_smooth_attention(np.ones((4, 16)), np.ones((4, 6)), np.ones(8), 4, 2)
    cfg = tiny_cfg(tie=True)
    with pytest.raises(ValueError, match=r"no calibration batch reached a k_proj layer; pass calibration tokens"):
        key_absmax(init_params(cfg, jax.random.key(0)), cfg, [])


def test_int8_weights_refuses_a_plain_qtensor():
    from jq.numbers import progressive

    q = jq.quantize_params({"k": {"kernel": jnp.ones((32, 4))}},
                           jq.QuantConfig.simple(jq.Scheme("int4", symmetric=False, group_size=16)))["k"]["kernel"]
    with pytest.raises(ValueError, match=r"is not a progressive QTensor \(uint8 group scales under a per-channel "
                                         r"outer scale: scheme progressive: true\)"):
        progressive.int8_weights(q)
