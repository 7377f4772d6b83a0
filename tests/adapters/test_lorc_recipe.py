"""A recipe's `lowrank:` section (LoRC) through the pipeline on the tiny Llama: parsed and refused by field, applied
after quantization with Hessians from the calibration tokens, counted in the sizes, saved and reloaded."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest

import jq
from jq import checkpoint
from jq.apps import pipeline
from jq.apps.finetune_setup import ByteTokenizer
from jq.models import LoadedModel, get_family
from jq.models.llama.config import LlamaConfig
from jq.models.llama.model import init_params
from jq.numbers.lowrank import LowRank
from jq.tree.recipe import LowRankConfig, recipe_from_dict, recipe_to_dict
from jq.tree.report import size_summary

RULE = {"pattern": ".*kernel", "format": "int3", "symmetric": False, "group_size": 16}


def test_lowrank_section_parses_round_trips_and_refuses_bad_fields():
    r = recipe_from_dict({"rules": [RULE], "lowrank": {"rank": 4, "weighted": False}})
    assert r.lowrank == LowRankConfig(rank=4, weighted=False) and not r.needs_calibration
    assert recipe_from_dict({"rules": [RULE], "lowrank": {"rank": 4}}).needs_calibration  # weighted by default
    assert recipe_from_dict(recipe_to_dict(r)).lowrank == r.lowrank
    with pytest.raises(ValueError, match="lowrank: missing field 'rank'"):
        recipe_from_dict({"rules": [RULE], "lowrank": {}})
    with pytest.raises(ValueError, match="'rank' must be a positive int"):
        recipe_from_dict({"rules": [RULE], "lowrank": {"rank": 0}})
    with pytest.raises(ValueError, match=r"lowrank: unknown field\(s\) \['rnak'\]"):
        recipe_from_dict({"rules": [RULE], "lowrank": {"rank": 2, "rnak": 2}})


@pytest.fixture(scope="module")
def tiny():
    cfg = dataclasses.replace(LlamaConfig.tiny(vocab_size=256), n_layers=1)
    params = jax.jit(init_params, static_argnums=0)(cfg, jax.random.PRNGKey(0))
    return LoadedModel(get_family("llama"), cfg, params, ByteTokenizer(), "tiny")


def test_pipeline_applies_lorc_and_the_checkpoint_keeps_it(tiny, tmp_path):
    calib = np.random.default_rng(0).integers(0, 256, size=(16, 32)).astype(np.int32)
    plain = jq.QuantConfig.simple(jq.Scheme("int3", group_size=16, symmetric=False))
    lorc = dataclasses.replace(plain, lowrank=LowRankConfig(rank=4))
    with pytest.raises(ValueError, match="needs calibration data"):
        pipeline.quantize(tiny, lorc, None)
    q0, _ = pipeline.quantize(tiny, plain)
    q, log = pipeline.quantize(tiny, lorc, calib)
    leaf = q["layers_0"]["mlp"]["down_proj"]["kernel"]
    assert isinstance(leaf, LowRank) and leaf.rank == 4 and log["lowrank"]["leaves"] == 7
    assert size_summary(q)["linear_bits_per_weight"] > size_summary(q0)["linear_bits_per_weight"]
    fwd = pipeline.quantized_forward(tiny.cfg)
    ids = jax.numpy.asarray(calib[:2])
    ref = fwd(tiny.params, ids)
    err = lambda p: float(jax.numpy.abs(fwd(p, ids) - ref).mean())  # noqa: E731
    assert err(q) < err(q0)
    d = checkpoint.save(tmp_path / "lorc", q, recipe=lorc)
    back, meta = checkpoint.load(d)
    assert meta["format_version"] == "2.0" and recipe_from_dict(meta["recipe"]).lowrank == lorc.lowrank
    np.testing.assert_allclose(np.asarray(fwd(back, ids)), np.asarray(fwd(q, ids)), rtol=1e-6, atol=1e-6)


def test_quantize_model_applies_the_lowrank_section_to_any_linen_model():
    import flax.linen as nn

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(8)(nn.gelu(nn.Dense(48)(x)))

    x = np.random.default_rng(1).normal(size=(16, 4, 32)).astype(np.float32)
    params = Net().init(jax.random.PRNGKey(0), x[:1])["params"]
    cfg = recipe_from_dict({"rules": [RULE], "lowrank": {"rank": 4}})
    q, log = jq.quantize_model(Net(), params, cfg, x)
    assert log["mode"] == "data-free" and log["lowrank"]["leaves"] == 2
    assert isinstance(q["Dense_0"]["kernel"], LowRank)
    with pytest.raises(ValueError, match="needs calibration tokens"):
        jq.quantize_model(Net(), params, cfg, None)
