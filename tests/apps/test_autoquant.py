"""`jq autoquant` on a tiny llama: sensitivities per layer and candidate, the budget held with the reports' own
accounting, a recipe that loads and runs, and the same recipe for the same inputs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

import jq
from jq.apps.autoquant import METRICS, choose, parse_budget, sensitivities, sensitivity_tables, uniform
from jq.apps.cli import main as cli_main
from jq.tree.recipe import load_recipe, recipe_from_dict, recipe_to_dict
from jq.tree.report import size_summary

CANDIDATES = ["rtn_w2_g128", "rtn_w4_g128", "rtn_w8_g128"]


@pytest.fixture(scope="module")
def tiny(tiny_gguf):
    d, m, calib = tiny_gguf
    return d, m, sensitivities(m, [load_recipe(c) for c in CANDIDATES], calib, metric="fisher")


def test_budgets_parse_and_bad_ones_are_named():
    assert parse_budget("3.5bpw") == ("bpw", 3.5) and parse_budget("150MB") == ("bytes", 150e6)
    assert parse_budget("2.5ms") == ("seconds", pytest.approx(2.5e-3)) and parse_budget("800us")[1] == pytest.approx(8e-4)
    with pytest.raises(ValueError, match=r"budget '3\.5 bits'.*3\.5bpw"):
        parse_budget("3.5 bits")


@pytest.fixture(scope="module")
def tables(tiny):
    _, m, _ = tiny
    calib = np.random.default_rng(1).integers(0, m.cfg.vocab_size, (4, 16))
    return sensitivity_tables(m, [load_recipe(c) for c in CANDIDATES], calib, METRICS), calib


def test_one_pass_over_several_metrics_gives_each_metrics_own_table(tiny, tables):
    _, m, _ = tiny
    tabs, calib = tables
    one = sensitivities(m, [load_recipe(c) for c in CANDIDATES], calib, metric="kfac")
    assert one["layers"] == tabs["kfac"]["layers"] and one["fixed_bytes"] == tabs["kfac"]["fixed_bytes"]
    only = ["layers_1/attn/q_proj/kernel"]
    part = sensitivity_tables(m, [load_recipe(c) for c in CANDIDATES], calib, ("hessian",), only=only)["hessian"]
    assert list(part["layers"]) == only
    assert part["layers"][only[0]]["cost"] == pytest.approx(tabs["hessian"]["layers"][only[0]]["cost"], rel=1e-5)


@pytest.mark.parametrize("metric", METRICS)
def test_sensitivities_grow_as_bits_shrink(tiny, tables, metric):
    sens = tiny[2] if metric == "fisher" else tables[0][metric]
    assert sens["candidates"] == CANDIDATES and sens["metric"] == metric and len(sens["layers"]) == 14  # 7 x 2
    for path, row in sens["layers"].items():
        assert row["cost"][0] > row["cost"][1] > row["cost"][2] >= 0, path
        assert row["bits"][0] < row["bits"][1] < row["bits"][2], path


def test_fisher_diagonal_is_the_mean_squared_gradient_per_batch(tiny):
    import jax

    from jq.apps.autoquant import fisher_diagonal
    from jq.apps.perplexity import window_nll_sum

    _, m, _ = tiny
    ids = np.random.default_rng(2).integers(0, m.cfg.vocab_size, (4, 16))
    path = "layers_1/mlp/up_proj/kernel"
    f = np.asarray(fisher_diagonal(m, ids, [path], batch=2)[path])
    module = m.family.module(m.cfg)

    def up_grad(b):  # the gradient of batch b's mean NLL for this one kernel
        g = jax.grad(lambda p: window_nll_sum(module.apply({"params": p}, b), b) / (2 * 15))(m.params)
        return np.asarray(g["layers_1"]["mlp"]["up_proj"]["kernel"], np.float64)

    want = (up_grad(ids[:2]) ** 2 + up_grad(ids[2:]) ** 2) / 2
    np.testing.assert_allclose(f, want, rtol=1e-3, atol=1e-9)  # float32 gradients, jitted or not


@pytest.mark.parametrize("budget", ["3bpw", "4.5bpw", "6bpw"])
def test_the_chosen_recipe_holds_its_budget_as_reports_count_it(tiny, budget):
    _, m, sens = tiny
    chosen = choose(sens, budget)
    cfg = recipe_from_dict(chosen["recipe"])
    q = jq.quantize_params(m.params, cfg)
    got = size_summary(q)["linear_bits_per_weight"]
    assert got == pytest.approx(chosen["linear_bits_per_weight"]) and got <= parse_budget(budget)[1]
    assert choose(sens, budget) == chosen  # deterministic


def test_more_budget_never_costs_more_error(tiny):
    _, _, sens = tiny
    errs = [choose(sens, f"{b}bpw")["estimated_error"] for b in (2.6, 3, 4, 5, 8)]
    assert errs == sorted(errs, reverse=True)


def test_cli_writes_a_recipe_that_jq_eval_runs(tiny, tmp_path, capsys):
    d, _, _ = tiny
    text = tmp_path / "t.txt"
    text.write_text("the cat sat on the mat and the hat, " * 80)
    out = tmp_path / "aq.yaml"
    assert cli_main(["autoquant", "--model", str(d / "tiny.gguf"), "--budget", "4bpw", "--candidates", *CANDIDATES,
                     "--calib", str(text), "--calib-samples", "4", "--calib-len", "16", "--out", str(out),
                     "--json"]) == 0
    info = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert info["linear_bits_per_weight"] <= 4 and yaml.safe_load(out.read_text())["rules"]
    assert cli_main(["eval", "--model", str(d / "tiny.gguf"), "--recipe", str(out), "--text", str(text), "--window",
                     "32", "--windows", "2", "--json"]) == 0
    r = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert r["linear_bits_per_weight"] == pytest.approx(info["linear_bits_per_weight"])
    assert cli_main(["autoquant", "--model", str(d / "tiny.gguf"), "--budget", "4bpw", "--out", str(out)]) == 2
    assert "exists" in capsys.readouterr().err
    assert cli_main(["autoquant", "--model", str(d / "tiny.gguf"), "--budget", "4bpw", "--candidates", *CANDIDATES,
                     "--calib", str(text), "--calib-samples", "4", "--calib-len", "16", "--out", str(out),
                     "--overwrite"]) == 0
    err = capsys.readouterr().err
    assert "scoring layers_0/attn/k_proj/kernel (1/14) under 3 candidates" in err and "(14/14)" in err
    assert cli_main(["autoquant", "--model", str(d / "tiny.gguf"), "--budget", "1bpw", "--candidates", *CANDIDATES,
                     "--calib", str(text), "--calib-samples", "4", "--calib-len", "16", "--out",
                     str(tmp_path / "x.yaml")]) == 2
    assert "below the smallest choice" in capsys.readouterr().err


def test_cli_caches_sensitivities_for_other_budgets(tiny, tmp_path, capsys):
    d, _, _ = tiny
    text = tmp_path / "t.txt"
    text.write_text("the cat sat on the mat and the hat, " * 80)
    common = ["--model", str(d / "tiny.gguf"), "--candidates", *CANDIDATES, "--calib", str(text), "--calib-samples",
              "4", "--calib-len", "16", "--cache", str(tmp_path / "s.json"), "--json"]
    got = []
    for budget, seed in (("4bpw", "0"), ("3bpw", "0"), ("3bpw", "1")):
        out = tmp_path / f"{budget}{seed}.yaml"
        assert cli_main(["autoquant", *common, "--budget", budget, "--calib-seed", seed, "--out", str(out)]) == 0
        got.append(json.loads(capsys.readouterr().out.strip().splitlines()[-1]))
    assert [g["sensitivities_cached"] for g in got] == [False, True, False]  # another calibration draw: measured
    assert [g["candidates_measured"] for g in got] == [3, 0, 3]
    assert got[1]["linear_bits_per_weight"] <= 3 < got[0]["linear_bits_per_weight"] <= 4
    more = [*common[:3], "rtn_w3_g128", *common[3:]]  # one more candidate: only it is scored
    assert cli_main(["autoquant", *more, "--budget", "3bpw", "--calib-seed", "1", "--out",
                     str(tmp_path / "m.yaml")]) == 0
    info = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert info["candidates_measured"] == 1 and not info["sensitivities_cached"]


def test_whole_model_candidates_and_unknown_metrics_are_refused(tiny):
    _, m, _ = tiny
    calib = np.zeros((2, 8), np.int64)
    with pytest.raises(ValueError, match=r"candidate recipe 'awq_w4_g128': autoquant takes single-rule recipes that "
                                         r"quantize each layer on its own.*transform"):
        sensitivities(m, [load_recipe("awq_w4_g128")], calib)
    with pytest.raises(ValueError, match=r"candidate recipe 'mixed_w8_attn_w4_mlp'.*it has 2 quantizing rules"):
        sensitivities(m, [load_recipe("mixed_w8_attn_w4_mlp")], calib)
    with pytest.raises(ValueError, match=r"metric 'mse'; choose one of 'fisher', 'kfac', 'hessian', 'kl'"):
        sensitivities(m, [load_recipe("rtn_w4_g128")], calib, metric="mse")


def test_gptq_candidates_are_scored_on_the_float_models_hessians_and_kfac_prefers_them(tiny):
    """GPTQ minimises the layer's output error, so under the Hessian and the Kronecker Fisher it costs less than RTN on
    the same grid at the same size; the diagonal Fisher, blind to input correlations, need not see that."""
    _, m, _ = tiny
    calib = np.random.default_rng(3).integers(0, m.cfg.vocab_size, (8, 16))
    grid = {"pattern": ".*kernel", "format": "int4", "symmetric": False, "group_size": 32}
    cands = [recipe_from_dict({"name": "rtn4", "rules": [grid]}),
             recipe_from_dict({"name": "gptq4", "rules": [{**grid, "method": "gptq", "options": {"damp": 0.01}}]})]
    for metric in ("kfac", "hessian"):
        sens = sensitivities(m, cands, calib, metric=metric)
        for path, row in sens["layers"].items():
            assert row["bits"][0] == row["bits"][1], path
            assert row["cost"][1] <= row["cost"][0] * 1.0001, (metric, path)
    chosen = choose(sens, "6bpw")
    assert chosen["layers_per_candidate"] == {"gptq4": len(sens["layers"])}  # equal sizes: the cheaper everywhere
    assert recipe_from_dict(chosen["recipe"]).needs_calibration


def test_a_time_budget_chooses_by_measured_matmul_latency_and_holds_it(tiny):
    _, m, _ = tiny
    calib = np.random.default_rng(3).integers(0, m.cfg.vocab_size, (4, 16))
    sens = sensitivities(m, [load_recipe(c) for c in CANDIDATES], calib, metric="hessian", latency_tokens=1)
    assert sens["latency_tokens"] == 1 and sens["device"]
    rows = sens["layers"]
    for path, row in rows.items():
        assert len(row["latency"]) == len(CANDIDATES) and all(0 < t < 1 for t in row["latency"]), path
    # timed once per shape and candidate: same-shaped layers share their figures
    assert rows["layers_0/attn/q_proj/kernel"]["latency"] == rows["layers_1/attn/q_proj/kernel"]["latency"]
    fastest = sum(min(r["latency"]) for r in rows.values())
    slowest = sum(max(r["latency"]) for r in rows.values())
    errs = []
    for frac in (0.0, 0.5, 1.0):  # (+ 1 us: each layer's time is rounded up to whole nanoseconds)
        budget = fastest + frac * (slowest - fastest) + 1e-6
        chosen = choose(sens, f"{budget * 1e6:.3f}us")
        assert chosen["latency_seconds"] <= budget * (1 + 1e-6)
        assert chosen["latency_seconds"] == pytest.approx(sum(rows[p]["latency"][c] for p, c in chosen["choice"].items()))
        errs.append(chosen["estimated_error"])
    assert errs == sorted(errs, reverse=True)  # more time never costs more error
    with pytest.raises(ValueError, match=r"below the smallest choice"):
        choose(sens, f"{fastest * 0.5e6:.3f}us")
    no_latency = sensitivities(m, [load_recipe(c) for c in CANDIDATES[:1]], calib, metric="hessian")
    with pytest.raises(ValueError, match=r"budget 2ms is a time.*--latency-tokens"):
        choose(no_latency, "2ms")


def test_matmul_seconds_times_floats_and_qtensors_and_refuses_bad_counts():
    from jq.apps.latency import matmul_seconds

    w = np.random.default_rng(4).standard_normal((64, 32)).astype(np.float32)
    q = jq.quantize_params({"d": {"kernel": w}}, jq.QuantConfig.simple(jq.Scheme("int4", group_size=32)))
    assert 0 < matmul_seconds(w, 4, repeats=3) < 1 and 0 < matmul_seconds(q["d"]["kernel"], 4, repeats=3) < 1
    with pytest.raises(ValueError, match="tokens 0 and repeats 3 must be positive"):
        matmul_seconds(w, 0, repeats=3)


def test_cli_time_budget_measures_latencies_at_one_token_by_default(tiny, tmp_path, capsys):
    d, _, _ = tiny
    text = tmp_path / "t.txt"
    text.write_text("the cat sat on the mat and the hat, " * 80)
    assert cli_main(["autoquant", "--model", str(d / "tiny.gguf"), "--budget", "1s", "--candidates", *CANDIDATES,
                     "--metric", "hessian", "--calib", str(text), "--calib-samples", "4", "--calib-len", "16",
                     "--out", str(tmp_path / "t.yaml"), "--json"]) == 0
    got = capsys.readouterr()
    info = json.loads(got.out.strip().splitlines()[-1])
    assert "scoring" not in got.err  # --json: no progress lines
    assert 0 < info["latency_seconds"] <= 1.0 and info["layers_per_candidate"] == {"rtn_w8_g128": 14}  # ample time


def test_autoquant_needs_nothing_llama_specific_gemma3_and_a_time_budget():
    import jax

    from jq.models.family import LoadedModel
    from jq.models.gemma3 import FAMILY, Gemma3Config, init_params

    cfg = Gemma3Config.tiny()
    m = LoadedModel(FAMILY, cfg, init_params(cfg, jax.random.key(0)), None, "tiny gemma 3")
    cands = [recipe_from_dict({"name": f"w{b}", "rules": [{"pattern": ".*kernel", "format": f"int{b}",
                                                            "symmetric": False, "group_size": 16}]}) for b in (2, 4, 8)]
    calib = np.random.default_rng(6).integers(0, cfg.vocab_size, (4, 16))
    sens = sensitivities(m, cands, calib, metric="kfac", latency_tokens=1)
    assert len(sens["layers"]) == 7 * cfg.n_layers  # q k v o gate up down in local and global blocks alike
    for budget in ("4bpw", f"{sum(np.median(r['latency']) for r in sens['layers'].values()) * 1e6:.3f}us"):
        chosen = choose(sens, budget)
        q = jq.quantize_params(m.params, recipe_from_dict(chosen["recipe"]))
        assert size_summary(q)["linear_bits_per_weight"] == pytest.approx(chosen["linear_bits_per_weight"])
    assert choose(sens, "4bpw")["linear_bits_per_weight"] <= 4


def test_a_rotated_base_is_applied_first_and_its_online_rotations_carried_into_the_recipe(tiny):
    """`base`: the candidates are scored on the QuaRot-rotated model, down_proj takes the base's online Hadamard, and
    the chosen recipe (rotation + per-layer rules) quantizes exactly what was scored: with one candidate it equals the
    hand-written uniform recipe."""
    from jq.apps import pipeline

    _, m, _ = tiny
    rot = {"residual": True, "heads": True, "seed": 0}
    base = recipe_from_dict({"name": "b", "rotation": rot, "rules": [
        {"pattern": ".*down_proj/kernel", "format": "int4", "rotate": "hadamard"},
        {"pattern": ".*kernel", "format": "int4"}]})
    calib = np.random.default_rng(0).integers(0, m.cfg.vocab_size, (8, 16))
    sens = sensitivities(m, [load_recipe("rtn_w4_g128")], calib, metric="hessian", base=base)
    assert sens["base"]["rotation"] == rot and set(sens["base"]["online"]) == {
        p for p in sens["layers"] if p.endswith("down_proj/kernel")} != set()
    chosen = choose(sens, "8bpw")
    r = chosen["recipe"]
    assert r["rotation"] == rot and "on b's rotation" in r["description"]
    assert all((rule.get("rotate") == "hadamard") == ("down_proj" in rule["pattern"]) for rule in r["rules"])
    # one candidate: the allocation is the uniform recipe
    assert uniform(sens, "rtn_w4_g128")["recipe"]["rules"] == r["rules"]
    rtn = recipe_to_dict(load_recipe("rtn_w4_g128"))["rules"][0]
    by_hand = recipe_from_dict({"name": "u", "rotation": rot, "rules": [
        {**rtn, "pattern": ".*down_proj/kernel", "rotate": "hadamard"}, {**rtn, "pattern": ".*kernel"}]})
    got, _ = pipeline.quantize(m, recipe_from_dict(r), progress=False)
    want, _ = pipeline.quantize(m, by_hand, progress=False)
    for (p, a), (_, b) in zip(jq.tree.paths.leaf_paths(jq.dequantize_params(got)),
                              jq.tree.paths.leaf_paths(jq.dequantize_params(want))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=p)


def test_microscaling_normal_float_and_lattice_candidates_hold_the_budget_as_reports_count_them(tiny):
    """Candidates whose scales are not plain group floats — MX (e8m0 per 32), NVFP4 (e4m3 per 16 and a tensor scale),
    NF4, the E8P lattice (a code per 8 weights, calibrated) — are scored and sized with the reports' own accounting,
    and the chosen mix quantizes (sequentially, as `jq eval` would) to exactly that size."""
    from jq.apps import pipeline

    _, m, _ = tiny
    names = ["mxfp4", "nvfp4", "nf4_g32", "mxfp8_e4m3", "e8p_w2", "e8p_w4"]
    calib = np.random.default_rng(5).integers(0, m.cfg.vocab_size, (8, 16))
    sens = sensitivities(m, [load_recipe(n) for n in names], calib, metric="kfac")
    shapes = {p: np.shape(w) for p, w in jq.tree.paths.leaf_paths(m.params)}
    for path, row in sens["layers"].items():
        k = shapes[path][0]  # the contraction axis: one float16 scale per output channel over k weights
        per_weight = np.asarray(row["bits"]) / row["weights"]
        assert per_weight[0] == pytest.approx(4 + 8 / 32) and per_weight[3] == pytest.approx(8 + 8 / 32), path
        assert per_weight[1] == pytest.approx(4 + 8 / 16 + 32 / row["weights"]), path  # + one float32 per tensor
        assert per_weight[4:].tolist() == pytest.approx([2 + 16 / k, 4 + 16 / k]), path
        assert np.all(np.isfinite(row["cost"])) and row["cost"][4] > row["cost"][5] > 0, path
    for budget in ("3bpw", "4.3bpw"):
        assert choose(sens, budget)["linear_bits_per_weight"] <= parse_budget(budget)[1]
    chosen = choose(sens, "3bpw")
    assert "e8p_w2" in chosen["layers_per_candidate"]  # the only candidate under 4 bits: calibrated, sequentially
    got = size_summary(pipeline.quantize(m, recipe_from_dict(chosen["recipe"]), calib=calib, progress=False)[0])
    assert got["linear_bits_per_weight"] == pytest.approx(chosen["linear_bits_per_weight"])
