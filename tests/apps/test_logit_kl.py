"""`jq.apps.logit_kl`: the end-to-end KL of a change against a NumPy reference, and the resumed runs (the calls
before the first reader of the changed leaf replayed) equal to whole runs on llama, Gemma 3 (a tied embedding read
first and last) and a linen model whose block reaches a module shared from the root."""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jq.apps.logit_kl import logit_kl
from jq.models.family import LoadedModel, ModelFamily
from jq.tree.paths import get_path, leaf_paths, replaced


def np_kl(module, params, changed, ids):
    p = jax.nn.log_softmax(np.asarray(module.apply({"params": params}, ids), np.float64), -1)
    q = jax.nn.log_softmax(np.asarray(module.apply({"params": changed}, ids), np.float64), -1)
    return float(np.mean(np.sum(np.exp(p) * (p - q), -1)))


def halved(params, path):
    """params with leaf `path` halved plus noise (a plain scale would vanish under Gemma's q / k norms)."""
    w = np.asarray(get_path(params, path))
    noise = np.random.default_rng(len(path)).standard_normal(w.shape) * np.std(w)
    return replaced(params, path, jnp.asarray(w * 0.5 + noise, w.dtype))


def test_zero_for_the_float_model_and_numpy_s_value_for_a_change(tiny_gguf):
    _, m, _ = tiny_gguf
    ids = np.random.default_rng(4).integers(0, m.cfg.vocab_size, (2, 16))
    kl = logit_kl(m, ids)
    assert kl(m.params) == pytest.approx(0.0, abs=1e-6)
    path = "layers_0/mlp/down_proj/kernel"
    w = np.asarray(get_path(m.params, path))
    changed = halved(m.params, path)
    assert np.array_equal(np.asarray(get_path(m.params, path)), w)  # the float tree is not touched
    want = np_kl(m.family.module(m.cfg), m.params, changed, ids)
    assert want > 0
    assert kl(changed) == pytest.approx(want, rel=1e-3)
    assert kl(changed, changed=path) == pytest.approx(want, rel=1e-3)


def _gemma3():
    from jq.models.gemma3 import FAMILY, Gemma3Config, init_params

    cfg = Gemma3Config.tiny()
    return LoadedModel(FAMILY, cfg, init_params(cfg, jax.random.key(0)), None, "tiny gemma 3")


@pytest.mark.parametrize("model", ["llama", "gemma3"])
def test_a_run_resumed_at_the_changed_leaf_equals_a_whole_run_for_every_leaf(tiny_gguf, model):
    m = tiny_gguf[1] if model == "llama" else _gemma3()
    ids = np.random.default_rng(5).integers(0, m.cfg.vocab_size, (3, 12))
    kl = logit_kl(m, ids)
    paths = [p for p, w in leaf_paths(m.params) if np.ndim(w) == 2]
    assert any(p.startswith("embed") for p in paths) and any(p.startswith("layers_1/") for p in paths)
    for path in paths:
        changed = halved(m.params, path)
        whole = kl(changed)
        assert whole > 0, path
        assert kl(changed, changed=path) == pytest.approx(whole, rel=2e-4, abs=1e-7), path


def test_the_calls_before_the_first_reader_are_replayed_not_run(tiny_gguf):
    _, m, _ = tiny_gguf
    ids = np.random.default_rng(6).integers(0, m.cfg.vocab_size, (2, 16))
    kl = logit_kl(m, ids)
    late = "layers_1/attn/v_proj/kernel"
    both = halved(halved(m.params, late), "layers_0/mlp/up_proj/kernel")
    # claiming only layers_1 changed, layers_0's (also changed) output is the float one replayed
    assert kl(both, changed=late) == pytest.approx(kl(halved(m.params, late)), rel=1e-5)
    assert kl(both) > kl(halved(m.params, late)) * 1.01


class _Block(nn.Module):
    shared: nn.Module | None = None

    @nn.compact
    def __call__(self, x):
        h = nn.Dense(x.shape[-1], name="inner")(jnp.tanh(x))
        return x + (h if self.shared is None else self.shared(h))


class _Toy(nn.Module):
    """embed → a → × gain → b (which reaches the root's `shared` Dense) → head: `shared` has no call of its own at
    the root, `gain` is the root's own parameter."""

    vocab: int = 11

    def setup(self):
        self.embed = nn.Embed(self.vocab, 8)
        self.shared = nn.Dense(8)
        self.a = _Block()
        self.b = _Block(shared=self.shared)
        self.head = nn.Dense(self.vocab)
        self.gain = self.param("gain", nn.initializers.ones, (8,))  # read by the root itself, between two calls

    def __call__(self, tokens):
        return self.head(self.b(self.a(self.embed(tokens)) * self.gain))


@dataclasses.dataclass(frozen=True)
class _ToyConfig:
    vocab_size: int = 11


def test_a_module_reached_through_another_block_resumes_at_that_block():
    module = _Toy()
    params = module.init(jax.random.key(1), jnp.zeros((1, 4), jnp.int32))["params"]
    family = ModelFamily(name="toy", config_type=_ToyConfig, module=lambda cfg: module, expected_shapes=lambda cfg: {})
    m = LoadedModel(family, _ToyConfig(), params, None, "toy")
    ids = np.random.default_rng(7).integers(0, 11, (2, 6))
    kl = logit_kl(m, ids)
    for path in ("shared/kernel", "a/inner/kernel", "b/inner/kernel", "embed/embedding", "head/kernel", "gain"):
        changed = halved(params, path)
        want = np_kl(module, params, changed, ids)
        assert want > 0, path
        assert kl(changed, changed=path) == pytest.approx(want, rel=1e-3), path


def test_a_stride_scores_every_stride_th_position_and_a_head_that_mixes_positions_is_refused(tiny_gguf):
    _, m, _ = tiny_gguf
    ids = np.random.default_rng(8).integers(0, m.cfg.vocab_size, (2, 16))
    module = m.family.module(m.cfg)
    for path in ("layers_1/mlp/gate_proj/kernel", "embed/embedding"):
        changed = halved(m.params, path)
        p = jax.nn.log_softmax(np.asarray(module.apply({"params": m.params}, ids), np.float64)[:, ::3], -1)
        q = jax.nn.log_softmax(np.asarray(module.apply({"params": changed}, ids), np.float64)[:, ::3], -1)
        want = float(np.mean(np.sum(np.exp(p) * (p - q), -1)))
        kl = logit_kl(m, ids, stride=3)
        assert kl(changed, changed=path) == pytest.approx(want, rel=1e-3), path
        assert kl(changed) == pytest.approx(want, rel=1e-3), path

    class Mixing(nn.Module):  # a head that reads the running sum over positions
        @nn.compact
        def __call__(self, x):
            return nn.Dense(11)(jnp.cumsum(x, axis=1))

    class Toy(nn.Module):
        def setup(self):
            self.embed, self.head = nn.Embed(11, 8), Mixing()

        def __call__(self, tokens):
            return self.head(self.embed(tokens))

    toy = Toy()
    params = toy.init(jax.random.key(2), jnp.zeros((1, 4), jnp.int32))["params"]
    family = ModelFamily(name="toy", config_type=_ToyConfig, module=lambda cfg: toy, expected_shapes=lambda cfg: {})
    mixing = LoadedModel(family, _ToyConfig(), params, None, "toy")
    ids = np.random.default_rng(9).integers(0, 11, (2, 8))
    assert logit_kl(mixing, ids)(halved(params, "head/Dense_0/kernel")) > 0
    with pytest.raises(ValueError, match=r"stride=2.*not position-wise.*use stride=1"):
        logit_kl(mixing, ids, stride=2)
    with pytest.raises(ValueError, match=r"stride=0"):
        logit_kl(mixing, ids, stride=0)
