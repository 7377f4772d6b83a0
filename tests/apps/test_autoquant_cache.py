"""The autoquant sensitivity cache: tables from it equal tables measured directly, in any candidate order; only what
is missing (a new candidate, a metric, the KL of a layer) is measured; another key is measured afresh beside the
first; a file that is not a cache is refused and left alone; labels do not matter; a refinement run twice measures
nothing the second time."""

from __future__ import annotations

import dataclasses
import functools
import json

import numpy as np
import pytest

import jq.apps.autoquant_cache as cache_mod
from jq.apps.autoquant import sensitivity_tables
from jq.apps.autoquant_cache import cache_key, cached_tables
from jq.apps.autoquant_refine import refine
from jq.tree.recipe import load_recipe, recipe_from_dict, recipe_to_dict

NAMES = ["rtn_w2_g128", "rtn_w4_g128", "rtn_w8_g128"]
DRAW = {"files": ["b.txt", "a.txt"], "samples": 8, "length": 16, "seed": 0, "sampling": "windows"}


@pytest.fixture(scope="module")
def setup(tiny_gguf):
    _, m, calib = tiny_gguf
    cands = [load_recipe(c) for c in NAMES]
    return m, cands, calib, sensitivity_tables(m, cands, calib, ("kfac", "hessian"))


@pytest.fixture()
def spy(monkeypatch):
    """The (candidate names, metrics, only) of every measurement the cache makes."""
    calls = []

    def measuring(m, cands, calib, metrics, progress=None, **kw):
        calls.append(([c.name for c in cands], tuple(metrics), kw.get("only")))
        return sensitivity_tables(m, cands, calib, metrics, progress, **kw)

    monkeypatch.setattr(cache_mod, "sensitivity_tables", measuring)
    return calls


def _same(got, want):
    assert got["candidates"] == want["candidates"] and got["rules"] == want["rules"]
    assert got["fixed_bytes"] == want["fixed_bytes"] and set(got["layers"]) == set(want["layers"])
    for p, row in want["layers"].items():
        assert got["layers"][p]["bits"] == row["bits"] and got["layers"][p]["weights"] == row["weights"], p
        np.testing.assert_allclose(got["layers"][p]["cost"], row["cost"], rtol=1e-5, err_msg=p)


def test_tables_from_the_cache_equal_measured_ones_in_any_order(setup, spy, tmp_path):
    m, cands, calib, direct = setup
    key, f = cache_key(m, DRAW), tmp_path / "s.json"
    first = cached_tables(m, cands, calib, ("kfac", "hessian"), cache=f, key=key)
    assert first["kfac"]["measured"] == 3 and len(spy) == 1
    for x in ("kfac", "hessian"):
        _same(first[x], direct[x])
    again = cached_tables(m, cands[::-1], calib, ("hessian",), cache=f, key=key)["hessian"]
    assert again["measured"] == 0 and len(spy) == 1
    rev = {**direct["hessian"], "candidates": NAMES[::-1], "rules": direct["hessian"]["rules"][::-1],
           "layers": {p: {**r, "cost": r["cost"][::-1], "bits": r["bits"][::-1]}
                      for p, r in direct["hessian"]["layers"].items()}}
    _same(again, rev)
    assert not list(tmp_path.glob("*.tmp"))  # written whole, then renamed


def test_only_the_new_candidate_or_metric_is_measured(setup, spy, tmp_path):
    m, cands, calib, direct = setup
    key, f = cache_key(m, DRAW), tmp_path / "s.json"
    cached_tables(m, cands[:2], calib, ("kfac",), cache=f, key=key)
    got = cached_tables(m, cands, calib, ("kfac",), cache=f, key=key)["kfac"]
    assert got["measured"] == 1 and spy[-1] == (["rtn_w8_g128"], ("kfac",), None)
    _same(got, direct["kfac"])
    both = cached_tables(m, cands, calib, ("kfac", "hessian"), cache=f, key=key)
    assert spy[-1] == (NAMES, ("kfac", "hessian"), None)  # every column lacked "hessian"
    _same(both["hessian"], direct["hessian"])


def test_kl_of_some_layers_is_kept_and_only_new_layers_are_measured(setup, spy, tmp_path):
    m, cands, calib, _ = setup
    key, f = cache_key(m, DRAW), tmp_path / "s.json"
    layers = sorted(setup[3]["kfac"]["layers"])
    with pytest.raises(ValueError, match=r"candidates \['rtn_w2_g128', 'rtn_w4_g128', 'rtn_w8_g128'\] have no "
                                         r"whole-model measurement in .*s.json; measure all layers first"):
        cached_tables(m, cands, calib, ("kl",), cache=f, key=key, only=layers[:2])
    cached_tables(m, cands, calib, ("kfac",), cache=f, key=key)
    a = cached_tables(m, cands, calib, ("kl",), cache=f, key=key, only=layers[:2])["kl"]
    b = cached_tables(m, cands, calib, ("kl",), cache=f, key=key, only=layers[1:3])["kl"]
    assert [c[2] for c in spy[-2:]] == [layers[:2], layers[2:3]]
    want = sensitivity_tables(m, cands, calib, ("kl",), only=layers[:3])["kl"]
    assert list(a["layers"]) == layers[:2] and list(b["layers"]) == layers[1:3]
    for p in layers[:3]:
        np.testing.assert_allclose((a["layers"].get(p) or b["layers"][p])["cost"], want["layers"][p]["cost"],
                                   rtol=1e-5)


def test_a_kl_on_other_tokens_is_kept_beside_the_default_one_and_the_estimates_serve_both(setup, spy, tmp_path):
    m, cands, calib, _ = setup
    key, f = cache_key(m, DRAW), tmp_path / "s.json"
    layers = sorted(setup[3]["kfac"]["layers"])[:2]
    cached_tables(m, cands, calib, ("kfac",), cache=f, key=key)
    assert cached_tables(m, cands, calib, ("kfac",), cache=f, key=key, kl_stride=2, kl_samples=2)["kfac"][
        "measured"] == 0
    strided = cached_tables(m, cands, calib, ("kl",), cache=f, key=key, only=layers, kl_stride=2, kl_samples=2)["kl"]
    plain = cached_tables(m, cands, calib, ("kl",), cache=f, key=key, only=layers)["kl"]
    assert [c[1:] for c in spy[1:]] == [(("kl",), layers)] * 2  # each KL measured once, the estimates never again
    assert cached_tables(m, cands, calib, ("kl",), cache=f, key=key, only=layers, kl_stride=2, kl_samples=2)["kl"][
        "measured"] == 0 and len(spy) == 3
    want = sensitivity_tables(m, cands, calib, ("kl",), only=layers, kl_stride=2, kl_samples=2)["kl"]
    for p in layers:
        np.testing.assert_allclose(strided["layers"][p]["cost"], want["layers"][p]["cost"], rtol=1e-5)
        assert not np.allclose(strided["layers"][p]["cost"], plain["layers"][p]["cost"], rtol=1e-3)
    stored = json.loads(f.read_text())["stores"][0]["columns"]
    assert set(next(iter(stored.values()))["layers"][layers[0]]["cost"]) == {"kfac", "kl", "kl[kl_samples=2,kl_stride=2]"}


def test_another_key_is_a_store_beside_the_first_and_a_file_not_a_cache_is_refused(setup, spy, tmp_path):
    m, cands, calib, _ = setup
    f = tmp_path / "s.json"
    cached_tables(m, cands, calib, ("kfac",), cache=f, key=cache_key(m, DRAW))
    assert cached_tables(m, cands, calib, ("kfac",), cache=f, key=cache_key(m, {**DRAW, "seed": 1}))["kfac"][
        "measured"] == 3
    stored = json.loads(f.read_text())
    assert stored["format"] == "jq-autoquant-cache" and [s["key"]["calibration"]["seed"] for s in stored["stores"]] \
        == [0, 1]  # kept beside, not replaced
    assert cached_tables(m, cands, calib, ("kfac",), cache=f, key=cache_key(m, DRAW))["kfac"]["measured"] == 0
    assert cache_key(m, DRAW) == cache_key(m, {**DRAW, "files": DRAW["files"][::-1]})  # the file order is free
    assert cached_tables(m, cands, calib, ("kfac",), cache=f, key=cache_key(m, DRAW), hessian_samples=4)["kfac"][
        "measured"] == 3
    for text, why in (('{"key": ', "not a readable autoquant cache"), ("name: w4\nrules: []\n", "not a readable"),
                      ('{"rules": []}', "a JSON file but not an autoquant cache")):
        f.write_text(text)
        with pytest.raises(ValueError, match=rf"--cache .*s.json: {why}.*left as it is: give another file name"):
            cached_tables(m, cands, calib, ("kfac",), cache=f, key=cache_key(m, DRAW))
        assert f.read_text() == text  # a damaged write or a recipe passed by mistake is never overwritten
    newer = '{"format": "jq-autoquant-cache", "version": 99, "stores": []}'
    f.write_text(newer)
    with pytest.raises(ValueError, match=r"--cache .*s.json: written by a newer jq \(cache version 99, this one reads "
                                         r"up to 3\); upgrade jq or give another file"):
        cached_tables(m, cands, calib, ("kfac",), cache=f, key=cache_key(m, DRAW))
    assert f.read_text() == newer
    with pytest.raises(ValueError, match=r"needs the cache's key: cache_key\(model, draw, base, latency\)"):
        cached_tables(m, cands, calib, ("kfac",), cache=tmp_path / "t.json")


def test_a_reworded_name_or_description_keeps_the_measurements(setup, spy, tmp_path):
    m, cands, calib, _ = setup
    base = load_recipe("quarot_gptq_refit_w4_g128")
    relabel = lambda c: dataclasses.replace(c, name=c.name + "_v2", description="reworded")  # noqa: E731
    f = tmp_path / "s.json"
    first = cached_tables(m, cands, calib, ("hessian",), cache=f, key=cache_key(m, DRAW, base), base=base)["hessian"]
    again = cached_tables(m, [relabel(c) for c in cands], calib, ("hessian",), cache=f,
                          key=cache_key(m, DRAW, relabel(base)), base=relabel(base))["hessian"]
    assert again["measured"] == 0 and len(spy) == 1 and again["candidates"] == [c.name + "_v2" for c in cands]
    _same({**again, "candidates": first["candidates"]}, first)


def test_a_file_of_the_first_layout_reads_as_the_current_one(setup, spy, tmp_path):
    m, cands, calib, _ = setup
    f, old = tmp_path / "s.json", tmp_path / "old.json"
    key = cache_key(m, DRAW)
    want = cached_tables(m, cands, calib, ("hessian",), cache=f, key=key)["hessian"]
    store = json.loads(f.read_text())["stores"][0]
    labelled = {json.dumps(recipe_to_dict(c), sort_keys=True): store["columns"][json.dumps(
        {k: v for k, v in recipe_to_dict(c).items() if k not in ("name", "description")}, sort_keys=True)]
        for c in cands}  # the first layout: columns keyed by the whole recipe, the key versioned inside
    old.write_text(json.dumps({"key": {"version": 2, **key}, "columns": labelled, "extras": store["extras"]}))
    got = cached_tables(m, cands, calib, ("hessian",), cache=old, key=key)["hessian"]
    assert got["measured"] == 0 and len(spy) == 1
    _same(got, want)


def test_candidates_covering_different_layers_assemble_as_one_measurement(setup, spy, tmp_path):
    m, cands, calib, _ = setup
    q_only = recipe_from_dict({"name": "q_w4", "rules": [{"pattern": ".*q_proj/kernel", "format": "int4",
                                                           "group_size": 16}]})
    mixed = [q_only, *cands[:2]]
    want = sensitivity_tables(m, mixed, calib, ("hessian",))["hessian"]
    key, f = cache_key(m, DRAW), tmp_path / "s.json"
    cached_tables(m, [q_only], calib, ("hessian",), cache=f, key=key)
    cached_tables(m, cands[:2], calib, ("hessian",), cache=f, key=key)
    got = cached_tables(m, mixed, calib, ("hessian",), cache=f, key=key)["hessian"]
    assert got["measured"] == 0 and len(spy) == 2
    _same(got, want)
    assert sum(np.isinf(r["cost"][0]) for r in got["layers"].values()) == len(got["layers"]) - 2  # 2 q_proj


def test_a_refinement_through_the_cache_resumes_without_measuring(setup, spy, tmp_path):
    m, cands, calib, _ = setup
    key, f = cache_key(m, DRAW), tmp_path / "s.json"
    tables = functools.partial(cached_tables, cache=f, key=key)
    sens = tables(m, cands, calib, ("kfac",))["kfac"]
    plain = refine(m, cands, calib, sens, "4bpw", rounds=20, sample=3)
    first = refine(m, cands, calib, sens, "4bpw", rounds=20, sample=3, tables=tables)
    n = len(spy)
    second = refine(m, cands, calib, sens, "4bpw", rounds=20, sample=3, tables=tables)
    assert len(spy) == n and first[0]["choice"] == second[0]["choice"] == plain[0]["choice"]
    assert first[1]["measured"] == plain[1]["measured"] and first[1]["kl_ratio"] == pytest.approx(plain[1]["kl_ratio"])


def test_a_stopped_measurement_of_some_layers_keeps_the_layers_it_finished(setup, spy, tmp_path):
    m, cands, calib, _ = setup
    key, f = cache_key(m, DRAW), tmp_path / "s.json"
    cached_tables(m, cands, calib, ("kfac",), cache=f, key=key)
    layers = sorted(setup[3]["kfac"]["layers"])[:3]

    class Stop(Exception):
        pass

    def stop_at_the_third(what):
        if what.endswith("(3/3)"):
            raise Stop
    with pytest.raises(Stop):
        cached_tables(m, cands, calib, ("kl",), stop_at_the_third, cache=f, key=key, only=layers)
    got = cached_tables(m, cands, calib, ("kl",), cache=f, key=key, only=layers)["kl"]
    assert len(spy[-1][2]) == 1 and set(got["layers"]) == set(layers)  # the two finished layers came from the file


def test_two_runs_sharing_a_file_keep_both_runs_measurements(setup, spy, tmp_path):
    m, cands, calib, _ = setup
    key, f = cache_key(m, DRAW), tmp_path / "s.json"
    cached_tables(m, cands, calib, ("kfac",), cache=f, key=key)
    layers = sorted(setup[3]["kfac"]["layers"])[:3]
    other = []

    def meanwhile(what):  # another run on the same file measures layer 3 while this one measures layers 1-2
        if not other:
            other.append(cached_tables(m, cands, calib, ("kl",), cache=f, key=key, only=layers[2:]))
    cached_tables(m, cands, calib, ("kl",), meanwhile, cache=f, key=key, only=layers[:2])
    n = len(spy)
    got = cached_tables(m, cands, calib, ("kl",), cache=f, key=key, only=layers)["kl"]
    assert got["measured"] == 0 and len(spy) == n and list(got["layers"]) == layers
    assert cached_tables(m, cands, calib, ("kfac",), cache=f, key=key)["kfac"]["measured"] == 0
