"""Sequential calibration of models nobody wrote a BlockSpec for: blocks found, chained, staged — or a one-shot
fallback that says why."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

import jq
from jq.calibration.discover import discover_blocks
from jq.calibration.model import quantize_model
from jq.calibration.sequential import BlockSpec, quantize_sequential
from jq.numbers.qtensor import is_qtensor

D, V, L = 32, 50, 3


class Block(nn.Module):
    wide: bool = False

    @nn.compact
    def __call__(self, x, mask):
        h = nn.LayerNorm(use_bias=False)(x)
        q, k = nn.Dense(D, use_bias=False, name="q")(h), nn.Dense(D, use_bias=False, name="k")(h)
        v = nn.Dense(D, use_bias=False, name="v")(h)
        a = jax.nn.softmax(jnp.where(mask, q @ jnp.swapaxes(k, -1, -2) / np.sqrt(D), -1e9), -1) @ v
        x = x + nn.Dense(D, use_bias=False, name="o")(a)
        h = nn.LayerNorm(use_bias=False)(x)
        f = 4 * D
        return x + nn.Dense(D, use_bias=False, name="down")(nn.gelu(nn.Dense(f, use_bias=False, name="up")(h)))


class Model(nn.Module):
    between: bool = False

    def setup(self):
        self.embed = nn.Embed(V, D)
        self.blocks = [Block() for _ in range(L)]
        self.head = nn.Dense(V, use_bias=False)

    def __call__(self, tokens):
        t = tokens.shape[1]
        mask = jnp.tril(jnp.ones((t, t), bool))
        x = self.embed(tokens)
        for i, b in enumerate(self.blocks):
            x = b(x, mask)
            if self.between and i == 0:
                x = x * 1.5
        return self.head(x)


RULES = {"rules": [{"pattern": r"blocks_\d+/.*kernel", "format": "int4", "group_size": 16, "method": "gptq"}]}


@pytest.fixture(scope="module")
def setup():
    tokens = np.random.default_rng(0).integers(0, V, (16, 12)).astype(np.int32)
    params = Model().init(jax.random.key(0), tokens[:1])["params"]
    return jax.tree_util.tree_map(np.asarray, params), tokens


def test_blocks_chain_and_stages_are_found(setup):
    params, tokens = setup
    spec, found = discover_blocks(Model(), params, tokens[:4])
    assert spec is not None, found
    assert spec.names == ("blocks_0", "blocks_1", "blocks_2")
    assert spec.stages == (("q/kernel", "k/kernel", "v/kernel"), ("o/kernel",), ("up/kernel",), ("down/kernel",))
    h = spec.embed(params, jnp.asarray(tokens[:4]))
    np.testing.assert_array_equal(h, Model().apply({"params": params}, jnp.asarray(tokens[:4]),
                                                   method=lambda m, t: m.embed(t)))


def test_discovered_sequential_gptq_equals_a_hand_written_block_spec(setup):
    params, tokens = setup
    cfg = jq.tree.recipe.recipe_from_dict(RULES)
    q_auto, log = quantize_model(Model(), params, cfg, tokens, batch_size=8)
    assert log["mode"] == "sequential" and "3 blocks" in log["discovery"]
    t = tokens.shape[1]
    mask = jnp.tril(jnp.ones((t, t), bool))
    hand = BlockSpec(module=Block(), names=("blocks_0", "blocks_1", "blocks_2"),
                     embed=lambda p, tk: jnp.take(p["embed"]["embedding"], tk, axis=0),
                     extra=lambda tk: (mask,),
                     stages=(("q/kernel", "k/kernel", "v/kernel"), ("o/kernel",), ("up/kernel",), ("down/kernel",)))
    q_hand, _ = quantize_sequential(hand, params, cfg, tokens, batch_size=8, progress=False)
    for a, b in zip(jax.tree_util.tree_leaves(q_auto), jax.tree_util.tree_leaves(q_hand)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert is_qtensor(q_auto["blocks_1"]["q"]["kernel"]) and not is_qtensor(q_auto["head"]["kernel"])


def test_no_chain_is_calibrated_through_the_traced_jaxpr_and_says_why(setup):
    params, tokens = setup
    cfg = jq.tree.recipe.recipe_from_dict(RULES)
    q, log = quantize_model(Model(between=True), params, cfg, tokens, batch_size=8)
    assert log["mode"] == "sequential (traced)" and is_qtensor(q["blocks_2"]["down"]["kernel"])
    assert "block blocks_1's input is not block blocks_0's output" in log["discovery"]
    q, log = quantize_model(Model(between=True), params, cfg, tokens, batch_size=8, sequential=False)
    assert log["mode"] == "one-shot" and is_qtensor(q["blocks_2"]["down"]["kernel"])


def test_a_model_without_repeated_blocks_is_said_to_have_none():
    class Flat(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(8, name="out")(nn.relu(nn.Dense(16, name="hidden")(x)))

    x = np.random.default_rng(1).standard_normal((8, 4)).astype(np.float32)
    params = Flat().init(jax.random.key(0), x)["params"]
    spec, why = discover_blocks(Flat(), params, x)
    assert spec is None and "no repeated blocks" in why and "hidden" in why


def test_blocks_whose_matmuls_are_not_standard_layers_are_calibrated_through_the_traced_jaxpr():
    class EinsumBlock(nn.Module):  # a third-party style block: its own weight and jnp.einsum
        @nn.compact
        def __call__(self, x):
            w = self.param("w", nn.initializers.normal(0.3), (4, D, D // 4))    # (heads, d_model, head_dim)
            h = jnp.einsum("btd,hdk->bthk", x, w).reshape(x.shape[:-1] + (D,))
            return x + jnp.tanh(h)

    class EinsumModel(nn.Module):
        @nn.compact
        def __call__(self, tokens):
            x = nn.Embed(V, D, name="embed")(tokens)
            for i in range(2):
                x = EinsumBlock(name=f"layer_{i}")(x)
            return x

    tokens = np.random.default_rng(2).integers(0, V, (8, 12)).astype(np.int32)
    params = jax.tree_util.tree_map(np.asarray, EinsumModel().init(jax.random.key(1), tokens[:1])["params"])
    cfg = jq.tree.recipe.recipe_from_dict(
        {"rules": [{"pattern": r"layer_\d/w", "format": "int4", "group_size": 8, "axes": [1], "method": "gptq"}]})
    q, log = quantize_model(EinsumModel(), params, cfg, tokens, batch_size=8)
    assert "layer_0's calibrated weights ['w'] are not kernels of standard layers" in log["discovery"]
    assert log["mode"] == "sequential (traced)" and log["sequential"] == ["layer_0/w", "layer_1/w"] and is_qtensor(q["layer_1"]["w"]) and q["layer_1"]["w"].layout.axes == (1,)
