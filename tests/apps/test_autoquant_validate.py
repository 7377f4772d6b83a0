"""`jq autoquant --validate N`: the allocation, the estimates' allocation, the largest uniform candidate that fits and
the smallest that does not, lowered on its cheapest layers, are each quantized whole and scored by their next-token
KL from the float model on held-out windows; the least is written."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
import yaml

from jq.apps import data
from jq.apps.autoquant import choose, fits, sensitivities, uniform
from jq.apps.autoquant_validate import contenders, held_out_windows, joint_kl, lowered, validate
from jq.apps.cli import main as cli_main
from jq.apps.pipeline import quantize, quantized_forward
from jq.tree.recipe import load_recipe, recipe_from_dict

NAMES = ["rtn_w2_g128", "rtn_w4_g128", "rtn_w8_g128"]


@pytest.fixture(scope="module")
def tiny(tiny_gguf, tmp_path_factory):
    d, m, calib = tiny_gguf
    words = "the cat sat on a mat and hat with red blue dog ran far".split()
    text = tmp_path_factory.mktemp("text") / "t.txt"
    text.write_text(" ".join(np.random.default_rng(3).choice(words, 3000)))
    return d, m, calib, sensitivities(m, [load_recipe(c) for c in NAMES], calib), text


def np_kl(p_logits: np.ndarray, q_logits: np.ndarray) -> float:
    """NumPy reference: mean over positions of KL(softmax p ‖ softmax q), float64."""
    def log_softmax(x):
        x = x.astype(np.float64)
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))
    lp, lq = log_softmax(p_logits), log_softmax(q_logits)
    return float(np.mean(np.sum(np.exp(lp) * (lp - lq), -1)))


def test_held_out_windows_are_new_windows_of_the_calibration_text(tiny):
    _, m, _, _, text = tiny
    calib = data.calibration_tokens(m.tokenizer, [text], 8, 16, seed=0)
    held = held_out_windows(m.tokenizer, [text], calib, 5, seed=0)
    assert held.shape == (5, 16) and held.dtype == np.int32
    seen = {r.tobytes() for r in calib}
    assert not any(r.tobytes() in seen for r in held)
    np.testing.assert_array_equal(held, held_out_windows(m.tokenizer, [text], calib, 5, seed=0))  # deterministic
    with pytest.raises(ValueError, match=r"--validate 10000: .*calibration text too short"):
        held_out_windows(m.tokenizer, [text], calib, 10_000, seed=0)
    with pytest.raises(ValueError, match=r"--validate 0: the held-out windows must be at least 1"):
        held_out_windows(m.tokenizer, [text], calib, 0, seed=0)


def test_joint_kl_is_the_numpy_kl_of_the_quantized_models_logits(tiny):
    _, m, calib, sens, _ = tiny
    ids = np.asarray(calib[:3])
    got = {}
    for name in ("rtn_w2_g128", "rtn_w8_g128"):
        recipe = uniform(sens, name)["recipe"]
        got[name] = joint_kl(m, recipe, calib, ids)
        params, _ = quantize(m, recipe_from_dict(recipe), calib, progress=False)
        p = np.asarray(quantized_forward(m.cfg)(m.params, jax.numpy.asarray(ids)))
        q = np.asarray(quantized_forward(m.cfg)(params, jax.numpy.asarray(ids)))
        assert got[name] == pytest.approx(np.mean([np_kl(p[i], q[i]) for i in range(3)]), rel=1e-3, abs=1e-7)
    assert 0 < got["rtn_w8_g128"] < 0.01 * got["rtn_w2_g128"]
    lines = []
    kls = validate(m, {"a": uniform(sens, "rtn_w8_g128")["recipe"]}, calib, ids, lines.append)
    assert kls == {"a": pytest.approx(got["rtn_w8_g128"], rel=1e-6)} and lines == ["a (1/1), whole"]


def test_contenders_are_the_allocations_and_the_uniform_candidates_either_side_of_the_budget(tiny):
    *_, sens, _ = tiny
    n = len(sens["layers"])
    chosen = choose(sens, "4bpw")
    out = contenders(sens, "4bpw", chosen, chosen)  # the same choice twice: named once
    assert list(out)[:2] == ["allocation", "uniform rtn_w2_g128"]  # rtn_w4_g128 stores 4.25 bits: over 4
    assert fits(sens, "4bpw", [0] * n) and not fits(sens, "4bpw", [1] * n)
    assert out["uniform rtn_w2_g128"]["layers_per_candidate"] == {"rtn_w2_g128": n}
    name, low = lowered(sens, "4bpw")
    assert name == "uniform rtn_w4_g128 lowered" and out.get(name, chosen)["choice"] == low["choice"]
    other = choose(sens, "3bpw")
    out = contenders(sens, "8.3bpw", chosen, other)
    assert list(out) == ["allocation", "allocation by the estimates", "uniform rtn_w8_g128"]  # every uniform fits
    assert out["allocation by the estimates"] is other and lowered(sens, "8.3bpw") is None


def test_the_lowered_uniform_lowers_the_cheapest_layers_and_raises_none(tiny):
    *_, sens, _ = tiny
    n = len(sens["layers"])
    name, low = lowered(sens, "4bpw")
    picks = list(low["choice"].values())
    assert set(picks) == {0, 1} and fits(sens, "4bpw", picks) and low["linear_bits_per_weight"] <= 4
    assert low["recipe"]["name"] == "rtn_w4_g128_lowered_4bpw" and "lowered" in low["recipe"]["description"]
    recipe_from_dict(low["recipe"])
    # NumPy reference: the least summed cost over every way to lower layers from rtn_w4_g128 to rtn_w2_g128
    rows = list(sens["layers"].values())
    best = min((sum(r["cost"][c] for r, c in zip(rows, pick)), pick)
               for pick in np.ndindex(*(2,) * n) if fits(sens, "4bpw", pick))
    assert picks == list(best[1]) and low["estimated_error"] == pytest.approx(best[0], rel=1e-9)
    assert low["estimated_error"] >= choose(sens, "4bpw")["estimated_error"] * (1 - 1e-9)  # a narrower search


def test_cli_validate_writes_the_contender_with_the_least_joint_kl(tiny, tmp_path, capsys):
    d, _, _, _, text = tiny
    out = tmp_path / "v.yaml"
    common = ["autoquant", "--model", str(d / "tiny.gguf"), "--candidates", *NAMES, "--calib", str(text),
              "--calib-samples", "6", "--calib-len", "16"]
    assert cli_main([*common, "--budget", "4bpw", "--refine", "1", "--validate", "3", "--out", str(out),
                     "--json"]) == 0
    info = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    v = info["validation"]
    assert v["windows"] == 3 and "allocation" in v["kl"] and "uniform rtn_w2_g128" in v["kl"]
    assert v["written"] == min(v["kl"], key=v["kl"].get) and all(k > 0 for k in v["kl"].values())
    written = yaml.safe_load(out.read_text())
    assert info["linear_bits_per_weight"] <= 4
    assert written["name"] == {"uniform rtn_w2_g128": "rtn_w2_g128", "uniform rtn_w4_g128 lowered":
                               "rtn_w4_g128_lowered_4bpw"}.get(v["written"], "autoquant_4bpw")
    if v["written"] == "uniform rtn_w2_g128":
        assert {r["format"] for r in written["rules"]} == {"int2"}
    assert cli_main([*common, "--budget", "4bpw", "--validate", "-1", "--out", str(tmp_path / "x.yaml")]) == 2
    assert "--validate -1: the number of held-out windows, 0 (no check) or more" in capsys.readouterr().err
    assert cli_main([*common, "--budget", "4bpw", "--validate", "100000", "--out", str(tmp_path / "x.yaml")]) == 2
    assert "--validate 100000: " in capsys.readouterr().err and not (tmp_path / "x.yaml").exists()
