"""Sequential calibration through the traced jaxpr: one model written three ways — unrolled linen blocks (what a
hand-written BlockSpec calibrates block by block, the reference), an `nn.scan` stack and an NNX model with an
`nnx.List` of blocks — gets the same quantized weights, and each weight is calibrated on the quantized model's
activations, not the float ones."""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx

import jq
from jq.calibration.capture import capture
from jq.calibration.model import quantize_model
from jq.calibration.sequential import BlockSpec, quantize_sequential
from jq.calibration.traced_sequential import plan_traced, quantize_traced
from jq.interop.usage import trace_usage
from jq.numbers.qtensor import is_qtensor

D, V, L, T = 32, 50, 3, 12
NAMES = ("q", "k", "v", "o", "up", "down")
STAGES = (("q/kernel", "k/kernel", "v/kernel"), ("o/kernel",), ("up/kernel",), ("down/kernel",))


def _mask(t: int) -> jax.Array:
    return jnp.tril(jnp.ones((t, t), bool))


def _block(x, mask, norm1, norm2, lin):
    """The block's computation given its norms and linear layers (shared by the linen and NNX versions)."""
    h = norm1(x)
    q, k, v = lin["q"](h), lin["k"](h), lin["v"](h)
    a = jax.nn.softmax(jnp.where(mask, q @ jnp.swapaxes(k, -1, -2) / np.sqrt(D), -1e9), -1) @ v
    x = x + lin["o"](a)
    return x + lin["down"](nn.gelu(lin["up"](norm2(x))))


class Block(nn.Module):
    @nn.compact
    def __call__(self, x, mask):
        lin = {n: nn.Dense(4 * D if n == "up" else D, use_bias=False, name=n) for n in NAMES}
        return _block(x, mask, nn.LayerNorm(use_bias=False, name="norm1"), nn.LayerNorm(use_bias=False, name="norm2"),
                      lin)


class Unrolled(nn.Module):
    @nn.compact
    def __call__(self, tokens):
        x = nn.Embed(V, D, name="embed")(tokens)
        for i in range(L):
            x = Block(name=f"blocks_{i}")(x, _mask(tokens.shape[1]))
        return nn.Dense(V, use_bias=False, name="head")(x)


class ScanBody(nn.Module):
    @nn.compact
    def __call__(self, x, mask):
        return Block(name="block")(x, mask), None


class Scanned(nn.Module):
    @nn.compact
    def __call__(self, tokens):
        x = nn.Embed(V, D, name="embed")(tokens)
        stack = nn.scan(ScanBody, variable_axes={"params": 0}, split_rngs={"params": True},
                        in_axes=nn.broadcast, length=L)(name="blocks")
        x, _ = stack(x, _mask(tokens.shape[1]))
        return nn.Dense(V, use_bias=False, name="head")(x)


class NBlock(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.norm1 = nnx.LayerNorm(D, use_bias=False, rngs=rngs)
        self.norm2 = nnx.LayerNorm(D, use_bias=False, rngs=rngs)
        for n in NAMES:
            setattr(self, n, nnx.Linear(4 * D if n == "down" else D, 4 * D if n == "up" else D, use_bias=False,
                                        rngs=rngs))

    def __call__(self, x, mask):
        return _block(x, mask, self.norm1, self.norm2, {n: getattr(self, n) for n in NAMES})


class NModel(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.embed = nnx.Embed(V, D, rngs=rngs)
        self.blocks = nnx.List([NBlock(rngs) for _ in range(L)])
        self.head = nnx.Linear(D, V, use_bias=False, rngs=rngs)

    def __call__(self, tokens):
        x = self.embed(tokens)
        for b in self.blocks:
            x = b(x, _mask(tokens.shape[1]))
        return self.head(x)


class NScanned(nnx.Module):
    """The NNX model with its blocks stacked by `nnx.vmap` and run by `nnx.scan`."""

    def __init__(self, rngs: nnx.Rngs):
        self.embed = nnx.Embed(V, D, rngs=rngs)

        @nnx.split_rngs(splits=L)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make(r):
            return NBlock(r)

        self.blocks = make(rngs)
        self.head = nnx.Linear(D, V, use_bias=False, rngs=rngs)

    def __call__(self, tokens):
        mask = _mask(tokens.shape[1])

        @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
        def step(x, block):
            return block(x, mask)

        return self.head(step(self.embed(tokens), self.blocks))


CFG = {"rules": [{"pattern": r"blocks.*/(q|k|v|o|up|down)/kernel", "format": "int4", "group_size": 16,
                  "method": "gptq"}]}


@pytest.fixture(scope="module")
def models():
    """(unrolled params, scanned params, (graphdef, NNX state)) holding the same weights, and calibration tokens."""
    tokens = np.random.default_rng(0).integers(0, V, (16, T)).astype(np.int32)
    p = jax.tree.map(np.asarray, Unrolled().init(jax.random.key(0), tokens[:1])["params"])
    blocks = [p[f"blocks_{i}"] for i in range(L)]
    scanned = {"embed": p["embed"], "head": p["head"],
               "blocks": {"block": jax.tree.map(lambda *a: np.stack(a), *blocks)}}
    graphdef, state = nnx.split(NModel(nnx.Rngs(0)))
    pure = nnx.to_pure_dict(state)
    pure["embed"]["embedding"], pure["head"]["kernel"] = p["embed"]["embedding"], p["head"]["kernel"]
    for i, b in enumerate(blocks):
        for n in NAMES:
            pure["blocks"][i][n]["kernel"] = b[n]["kernel"]
        for n in ("norm1", "norm2"):
            pure["blocks"][i][n]["scale"] = b[n]["scale"]
    nnx.replace_by_pure_dict(state, pure)
    sgraph, sstate = nnx.split(NScanned(nnx.Rngs(0)))
    spure = nnx.to_pure_dict(sstate)
    spure["embed"]["embedding"], spure["head"]["kernel"] = p["embed"]["embedding"], p["head"]["kernel"]
    spure["blocks"] = {n: {k: np.asarray(v) for k, v in d.items()} for n, d in scanned["blocks"]["block"].items()}
    nnx.replace_by_pure_dict(sstate, spure)
    return p, scanned, (graphdef, state), tokens, (sgraph, sstate)


def _reference(params, tokens, cfg=CFG):
    """Block by block with a hand-written BlockSpec (`jq.calibration.sequential`)."""
    spec = BlockSpec(module=Block(), names=tuple(f"blocks_{i}" for i in range(L)),
                     embed=lambda p, tk: jnp.take(p["embed"]["embedding"], tk, axis=0),
                     extra=lambda tk: (_mask(tk.shape[1]),), stages=STAGES)
    return quantize_sequential(spec, params, jq.recipe_from_dict(cfg), tokens, batch_size=8, progress=False)[0]


def _close(a, b):
    """Equal quantized weights up to float summation order: dequantized values agree but for rare codes one step
    apart."""
    a, b = (np.asarray(t.dequantize() if is_qtensor(t) else t) for t in (a, b))
    assert a.shape == b.shape
    assert np.mean(~np.isclose(a, b, rtol=1e-4, atol=1e-5)) < 0.01


@pytest.mark.parametrize("act", [None, "int8"])
def test_unrolled_blocks_traced_equal_the_block_spec(models, act):
    """Also with int8 activations: later weights see the quantized model as it runs, activations quantized."""
    p, _, _, tokens, _ = models
    cfg = {"rules": [{**CFG["rules"][0], **({"act": act} if act else {})}]}
    ref = _reference(p, tokens, cfg)
    usage = trace_usage(Unrolled(), {"params": p}, jnp.asarray(tokens[:8]))
    q, log = quantize_traced(usage, p, jq.recipe_from_dict(cfg), [(tokens[:8],), (tokens[8:],)])
    assert len(log["sequential"]) == L * len(NAMES) and log["after"] == {}
    for i in range(L):
        for n in NAMES:
            _close(q[f"blocks_{i}"][n]["kernel"], ref[f"blocks_{i}"][n]["kernel"])
    assert not is_qtensor(q["head"]["kernel"])


def test_an_nn_scan_stack_is_calibrated_layer_by_layer(models):
    p, scanned, _, tokens, _ = models
    ref = _reference(p, tokens)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback warning: the stack is followed
        q, log = quantize_model(Scanned(), scanned, jq.recipe_from_dict(CFG), tokens, batch_size=8)
    assert log["mode"] == "sequential (traced)" and "no repeated blocks" in log["discovery"]
    for n in NAMES:
        stacked = q["blocks"]["block"][n]["kernel"]
        assert stacked.shape == (L,) + p["blocks_0"][n]["kernel"].shape and stacked.layout.axes == (1,)
        for i in range(L):
            _close(stacked.dequantize()[i], ref[f"blocks_{i}"][n]["kernel"])
    x = jnp.asarray(tokens[:2])
    assert jq.routing_report(Scanned(), {"params": q}, x).counts["routed"] == 6  # each layer's slice to jq.ops
    out = jq.apply(Scanned(), {"params": q}, x)
    np.testing.assert_allclose(out, jq.apply(Unrolled(), {"params": ref}, x), rtol=2e-3, atol=2e-3)


def test_an_nnx_model_with_a_list_of_blocks_is_calibrated_sequentially(models):
    p, _, (graphdef, state), tokens, _ = models
    ref = _reference(p, tokens)
    q, log = jq.quantize_model(graphdef, state, jq.recipe_from_dict(CFG), tokens, batch_size=8)
    assert log["mode"] == "sequential (traced)" and "NNX" in log["discovery"]
    with pytest.raises(TypeError, match=r"NNX module NModel itself.*nnx.split\(model\)"):
        jq.quantize_model(nnx.merge(graphdef, state), None, jq.recipe_from_dict(CFG), tokens)
    for i in range(L):
        for n in NAMES:
            _close(q["blocks"][i][n]["kernel"].get_value(), ref[f"blocks_{i}"][n]["kernel"])
    x = jnp.asarray(tokens[:2])
    out = jax.jit(lambda s, t: jq.nnx_merge(graphdef, s)(t))(q, x)
    np.testing.assert_allclose(out, jq.apply(Unrolled(), {"params": ref}, x), rtol=2e-3, atol=2e-3)


def test_an_nnx_scan_over_vmapped_blocks_is_calibrated_layer_by_layer(models):
    p, _, _, tokens, (graphdef, state) = models
    ref = _reference(p, tokens)
    q, log = jq.quantize_model(graphdef, state, jq.recipe_from_dict(CFG), tokens, batch_size=8)
    assert log["mode"] == "sequential (traced)" and log["after"] == {}
    for n in NAMES:
        stacked = q["blocks"][n]["kernel"].get_value()
        assert stacked.shape[0] == L and stacked.layout.axes == (1,)
        for i in range(L):
            _close(stacked.dequantize()[i], ref[f"blocks_{i}"][n]["kernel"])
    x = jnp.asarray(tokens[:2])
    out = jax.jit(lambda s, t: jq.nnx_merge(graphdef, s)(t))(q, x)  # stacked Linears read dequantized kernels
    np.testing.assert_allclose(out, jq.apply(Unrolled(), {"params": ref}, x), rtol=2e-3, atol=2e-3)


def test_later_weights_see_the_quantized_model_not_the_float_one(models, monkeypatch):
    """The statistics each weight is quantized with are its inputs in the model whose earlier weights are
    quantized already (the last down projection: blocks 0-1 and its own block's q/k/v/o/up): equal to a capture
    on that model, not to one on the float model; the first block's q/k/v see the same input either way."""
    import jq.calibration.traced_sequential as ts

    p, _, _, tokens, _ = models
    seen, quantize_at = {}, ts._quantize_at

    def spy(path, w, rule, axes, sums, index):
        seen[path] = sums.finalize()
        return quantize_at(path, w, rule, axes, sums, index)

    monkeypatch.setattr(ts, "_quantize_at", spy)
    usage = trace_usage(Unrolled(), {"params": p}, jnp.asarray(tokens[:8]))
    seq, _ = quantize_traced(usage, p, jq.recipe_from_dict(CFG), [(tokens[:8],), (tokens[8:],)])
    down = "blocks_2/down/kernel"
    own = {**seq, "blocks_2": {**seq["blocks_2"], "down": p["blocks_2"]["down"]}}
    h_own, h_float = (capture(Unrolled(), {"params": v}, [jnp.asarray(tokens)], paths=[down])[down].hessian
                      for v in (own, p))
    np.testing.assert_allclose(seen[down].hessian, h_own, rtol=1e-4, atol=1e-5)
    assert np.abs(np.asarray(h_float) - np.asarray(h_own)).max() > 0.01
    q_float = capture(Unrolled(), {"params": p}, [jnp.asarray(tokens)], paths=["blocks_0/q/kernel"])
    np.testing.assert_allclose(seen["blocks_0/q/kernel"].hessian, q_float["blocks_0/q/kernel"].hessian,
                               rtol=1e-4, atol=1e-5)


def test_weights_that_cannot_be_swapped_at_their_matmul_are_quantized_after_the_pass():
    class Twice(nn.Module):  # one weight read by two matmuls: statistics merged, quantized after the pass
        @nn.compact
        def __call__(self, x):
            w = self.param("w", nn.initializers.normal(0.3), (D, D))
            h = jnp.tanh(x @ w)
            return nn.Dense(D, use_bias=False, name="out")(h @ w)

    x = np.random.default_rng(1).standard_normal((16, D)).astype(np.float32)
    params = jax.tree.map(np.asarray, Twice().init(jax.random.key(0), x)["params"])
    cfg = jq.recipe_from_dict({"rules": [{"pattern": "w|out/kernel", "format": "int4", "group_size": 16,
                                          "method": "gptq"}]})
    usage = trace_usage(Twice(), {"params": params}, jnp.asarray(x[:8]))
    at, after, skipped = plan_traced(usage, params, cfg)
    assert set(at) == {"out/kernel"} and "2 matmuls" in after["w"] and skipped == {}
    q, log = quantize_model(Twice(), params, cfg, x, batch_size=8)
    assert log["mode"] == "sequential (traced)" and is_qtensor(q["w"]) and is_qtensor(q["out"]["kernel"])
    ref = Twice().apply({"params": params}, x)
    out = jq.apply(Twice(), {"params": q}, x)
    assert float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref)) < 0.2


def test_what_the_traced_mode_cannot_calibrate_is_refused_by_name(models):
    """A calibrated weight whose matmul has batch dims on it (one Hessian per batch index) is named with the reason
    and the fix; an NNX model with a recipe's lowrank section (LoRC is linen-only) is refused naming the section."""

    class PerExpert(nn.Module):
        @nn.compact
        def __call__(self, x):  # x [B, E, K]: the expert axis is a batch dim of the dot
            w = self.param("experts", nn.initializers.normal(0.2), (3, D, D))
            return jnp.einsum("bek,ekn->ben", x, w)

    x = np.random.default_rng(3).standard_normal((8, 3, D)).astype(np.float32)
    params = PerExpert().init(jax.random.key(0), x[:1])["params"]
    cfg = jq.recipe_from_dict({"rules": [{"pattern": "experts", "format": "int4", "group_size": 16, "axes": [1],
                                          "method": "gptq"}]})
    with pytest.raises(ValueError, match=r"no calibration statistics can be recorded for experts: its matmul has batch "
                                         r"dims on the weight.*method: rtn"):
        quantize_model(PerExpert(), params, cfg, x, batch_size=4)
    _, _, (graphdef, state), tokens, _ = models
    lorc = jq.recipe_from_dict({**CFG, "lowrank": {"rank": 4}})
    with pytest.raises(ValueError, match="lowrank section .*linen models only; drop it for this NNX model"):
        jq.quantize_model(graphdef, state, lorc, tokens)
