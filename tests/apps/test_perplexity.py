"""Perplexity protocol: windows, next-token shift, averaging and errors."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jq.apps.perplexity import perplexity, window_nll_sum


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


def test_the_nll_keeps_no_copy_of_the_logits():
    # a large-vocabulary model's logits are GBs (Gemma 3: 2 GB per 4 windows): the NLL reduces them in place
    logits = jax.ShapeDtypeStruct((4, 64, 32768), jnp.float32)
    mem = window_nll_sum.lower(logits, jax.ShapeDtypeStruct((4, 64), jnp.int32)).compile().memory_analysis()
    assert mem.temp_size_in_bytes < 0.05 * 4 * 64 * 32768 * 4


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


class _Tok:
    """A tokenizer that puts BOS (id 1) before every text when asked to add special tokens, like Gemma's."""

    bos_id = 1

    def encode(self, text, add_special_tokens=True):
        return ([1] if add_special_tokens else []) + [2 + (ord(c) % 50) for c in text]


def test_a_bos_model_gets_bos_plus_window_minus_one_text_tokens_per_window():
    from jq.apps.data import bos_of, text_ids
    from jq.apps.perplexity import make_windows

    ids, bos = text_ids(_Tok(), "abcdefghij" * 3)
    assert bos == 1 and len(ids) == 30 and 1 not in ids.tolist()  # no BOS inside the text stream
    w = make_windows(ids, 8, 3, bos)
    np.testing.assert_array_equal(w[:, 0], 1)
    np.testing.assert_array_equal(w[:, 1:].reshape(-1), ids[:21])  # 7 text tokens each, consecutive
    out = perplexity(uniform_forward(37), None, ids, window=8, windows=3, bos=bos)
    assert out["tokens"] == 3 * 7  # the loss covers the 7 text tokens of each window, BOS is never a target
    no_bos = type("T", (), {"bos_id": 1, "encode": lambda self, t, add_special_tokens=True: [5, 6]})()
    assert bos_of(no_bos) is None  # a tokenizer that does not add BOS keeps the plain windows


def test_calibration_windows_of_a_bos_model_start_with_bos(tmp_path):
    from jq.apps.data import calibration_tokens

    for i in range(2):
        (tmp_path / f"b{i}.txt").write_text("the quick brown fox jumps " * 20)
    for sampling in ("windows", "stream"):
        toks = calibration_tokens(_Tok(), [tmp_path / "b0.txt", tmp_path / "b1.txt"], samples=6, length=16,
                                  sampling=sampling)
        assert toks.shape == (6, 16)
        np.testing.assert_array_equal(toks[:, 0], 1)
        assert (toks[:, 1:] != 1).all()
