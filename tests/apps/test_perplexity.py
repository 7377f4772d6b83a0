"""Perplexity protocol: windows, next-token shift, averaging and errors."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jq.apps.perplexity import perplexity


def uniform_forward(vocab: int):
    return lambda params, ids: jnp.zeros(ids.shape + (vocab,), jnp.float32)


def bigram_forward(table, ids):
    """logits[b, t] = table[ids[b, t]]: position t scores the token at t+1."""
    return table[ids]


def test_uniform_logits_give_vocab_size():
    out = perplexity(uniform_forward(37), None, np.arange(1000) % 37, window=50, windows=5, batch_size=2)
    assert out["windows"] == 5 and out["tokens"] == 5 * 49
    assert out["perplexity"] == pytest.approx(37.0, rel=1e-5)
    assert out["nll"] == pytest.approx(math.log(37.0), rel=1e-6)


def test_matches_numpy_next_token_nll_and_is_batch_invariant():
    rng = np.random.default_rng(0)
    vocab, window, windows = 11, 9, 5
    table = rng.standard_normal((vocab, vocab)).astype(np.float32)
    ids = rng.integers(0, vocab, size=window * windows + 4)
    logp = table - np.log(np.exp(table).sum(-1, keepdims=True))
    w = ids[: window * windows].reshape(windows, window)
    nll = -np.mean(logp[w[:, :-1], w[:, 1:]])
    fwd = jax.jit(bigram_forward)
    runs = [perplexity(fwd, jnp.asarray(table), ids, window=window, windows=windows, batch_size=b) for b in (1, 2, 5)]
    for r in runs:
        assert r["nll"] == pytest.approx(nll, rel=1e-5)
        assert r["perplexity"] == pytest.approx(math.exp(nll), rel=1e-5)


def test_params_are_passed_through_untouched():
    seen = []

    def forward(params, ids):
        seen.append(params)
        return jnp.zeros(ids.shape + (5,))

    marker = {"q": object()}
    perplexity(forward, marker, list(range(20)), window=10, windows=2)
    assert seen and all(p is marker for p in seen)


def test_text_shorter_than_a_window_is_an_error():
    with pytest.raises(ValueError, match=r"100 tokens.*window of 512.*longer text or a smaller --window"):
        perplexity(uniform_forward(5), None, list(range(100)), window=512)


def test_fewer_windows_than_asked_warns_and_uses_all():
    with pytest.warns(UserWarning, match="only 3 windows"):
        out = perplexity(uniform_forward(5), None, list(range(35)), window=10, windows=16)
    assert out["windows"] == 3 and out["tokens"] == 27
