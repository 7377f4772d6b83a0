"""`jq autoquant --refine`: the layers an allocation lowers are re-scored by their measured KL (in the estimate's
units by a ratio fitted on a random sample) and the budget is solved again."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

from jq.apps.autoquant import choose, sensitivities, sensitivity_tables
from jq.apps.autoquant_refine import refine
from jq.apps.cli import main as cli_main
from jq.tree.recipe import load_recipe

NAMES = ["rtn_w2_g128", "rtn_w4_g128", "rtn_w8_g128"]


@pytest.fixture(scope="module")
def tiny(tiny_gguf):
    d, m, calib = tiny_gguf
    cands = [load_recipe(c) for c in NAMES]
    sens = sensitivities(m, cands, calib, metric="kfac")
    kl = sensitivity_tables(m, cands, calib, ("kl",))["kl"]  # every layer measured: the reference
    return d, m, cands, calib, sens, {p: row["cost"] for p, row in kl["layers"].items()}


def test_sampled_and_lowered_layers_take_their_measured_cost_and_the_budget_holds(tiny):
    _, m, cands, calib, sens, kl = tiny
    chosen, refined = refine(m, cands, calib, sens, "4bpw", rounds=20, sample=3)
    probe = sorted(refined["measured"][:3])
    ratio = sum(sum(kl[p]) for p in probe) / sum(sum(sens["layers"][p]["cost"]) for p in probe)
    assert refined["kl_ratio"] == pytest.approx(ratio, rel=1e-6)
    for p, row in refined["layers"].items():
        want = np.asarray(kl[p]) / ratio if p in refined["measured"] else sens["layers"][p]["cost"]
        np.testing.assert_allclose(row["cost"], want, rtol=1e-5, err_msg=p)
    for p, c in chosen["choice"].items():  # nothing left lowered on an estimate alone
        row = refined["layers"][p]
        assert p in refined["measured"] or row["bits"][c] / row["weights"] >= 4, p
    assert chosen == choose(refined, "4bpw") and chosen["linear_bits_per_weight"] <= 4
    lines = []
    assert refine(m, cands, calib, sens, "4bpw", rounds=20, sample=3, progress=lines.append)[0] == chosen  # determin.
    assert len(lines) == len(refined["measured"]) and lines[0].startswith("by the measured KL: layers_")


def test_a_margin_also_measures_the_layers_chosen_near_the_average(tiny):
    """margin=m measures every layer the choice puts below 4 + m bits: with m past the widest candidate (int8 g128,
    8.25 bits) every layer is measured, so the refined table is the measured KL throughout."""
    _, m, cands, calib, sens, kl = tiny
    plain = refine(m, cands, calib, sens, "4bpw", rounds=20, sample=3)[1]
    chosen, refined = refine(m, cands, calib, sens, "4bpw", rounds=20, margin=4.5, sample=3)
    assert set(refined["measured"]) == set(sens["layers"]) > set(plain["measured"])
    assert len(refined["measured"]) == len(set(refined["measured"]))  # no layer measured twice
    for p, row in refined["layers"].items():
        np.testing.assert_allclose(row["cost"], np.asarray(kl[p]) / refined["kl_ratio"], rtol=1e-5, err_msg=p)
    assert chosen == choose(refined, "4bpw") and chosen["linear_bits_per_weight"] <= 4
    with pytest.raises(ValueError, match=r"refine\(margin=-0.5\): the margin is bits above the budget's average"):
        refine(m, cands, calib, sens, "4bpw", margin=-0.5)


def test_a_planted_underestimate_is_measured_and_corrected(tiny):
    """A layer whose 2-bit cost the estimate puts at zero is lowered by the plain solver; refinement measures it and
    charges it what it costs."""
    _, m, cands, calib, sens, kl = tiny
    planted = json.loads(json.dumps(sens))
    victim = max(planted["layers"], key=lambda p: kl[p][0])  # the layer 2 bits hurt most
    planted["layers"][victim]["cost"][0] = 0.0
    assert choose(planted, "4bpw")["choice"][victim] == 0
    chosen, refined = refine(m, cands, calib, planted, "4bpw", rounds=20, sample=2, seed=1)
    assert victim in refined["measured"]
    got = refined["layers"][victim]["cost"][0]
    assert got > 0 and got == pytest.approx(kl[victim][0] / refined["kl_ratio"], rel=1e-5)


def test_bad_rounds_and_time_budgets_are_refused(tiny, tmp_path, capsys):
    d, m, cands, calib, sens, _ = tiny
    with pytest.raises(ValueError, match=r"refine\(rounds=0, sample=8\): both must be at least 1"):
        refine(m, cands, calib, sens, "4bpw", rounds=0)
    with pytest.raises(ValueError, match=r"budget 2ms: refinement .* needs a size budget"):
        refine(m, cands, calib, sens, "2ms")
    zero = json.loads(json.dumps(sens))
    for row in zero["layers"].values():
        row["cost"] = [0.0] * len(row["cost"])
    with pytest.raises(ValueError, match=r"refine: the 2 sampled layers have no finite positive estimates to fit the "
                                         r"KL / estimate ratio to; sample more layers"):
        refine(m, cands, calib, zero, "4bpw", sample=2)
    text = tmp_path / "t.txt"
    text.write_text("the cat sat on the mat and the hat, " * 80)
    assert cli_main(["autoquant", "--model", str(d / "tiny.gguf"), "--budget", "2ms", "--refine", "1", "--out",
                     str(tmp_path / "a.yaml"), "--calib", str(text)]) == 2
    assert "--refine 1: refinement re-scores" in capsys.readouterr().err
    assert cli_main(["autoquant", "--model", str(d / "tiny.gguf"), "--budget", "4bpw", "--refine", "1",
                     "--kl-stride", "0", "--out", str(tmp_path / "a.yaml"), "--calib", str(text)]) == 2
    assert "--kl-stride 0: must be at least 1" in capsys.readouterr().err
    assert cli_main(["autoquant", "--model", str(d / "tiny.gguf"), "--budget", "4bpw", "--refine-margin", "0.3",
                     "--out", str(tmp_path / "a.yaml"), "--calib", str(text)]) == 2
    assert "--refine-margin 0.3: bits above the budget's average" in capsys.readouterr().err
    assert cli_main(["autoquant", "--model", str(d / "tiny.gguf"), "--budget", "4bpw", "--refine", "1",
                     "--refine-margin", "-0.5", "--out", str(tmp_path / "a.yaml"), "--calib", str(text)]) == 2
    assert "--refine-margin -0.5: bits above the budget's average (0 or more)" in capsys.readouterr().err


def test_cli_refine_reports_the_measured_layers(tiny, tmp_path, capsys):
    d, *_ = tiny
    text = tmp_path / "t.txt"
    text.write_text("the cat sat on the mat and the hat, " * 80)
    out = tmp_path / "r.yaml"
    cache = tmp_path / "c.json"
    assert cli_main(["autoquant", "--model", str(d / "tiny.gguf"), "--budget", "4bpw", "--candidates", *NAMES,
                     "--refine", "2", "--calib", str(text), "--calib-samples", "4", "--calib-len", "16", "--out",
                     str(out), "--json", "--cache", str(cache), "--kl-samples", "2", "--kl-stride", "3",
                     "--refine-margin", "4.5"]) == 0
    info = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert info["kl_ratio"] > 0 and info["linear_bits_per_weight"] <= 4
    column = next(iter(json.loads(cache.read_text())["stores"][0]["columns"].values()))
    assert info["measured_layers"] == len(column["layers"])  # the margin past int8's 8.25 bits: every layer
    kept = [p for p, e in column["layers"].items() if "kl[kl_samples=2,kl_stride=3]" in e["cost"]]
    assert len(kept) == info["measured_layers"]  # the KL on the tokens asked for, kept under that name
    assert "lowered layers measured (kl) cost" in yaml.safe_load(out.read_text())["description"]
