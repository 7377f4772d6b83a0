"""The CLI end to end on a tiny GGUF model, and the on-disk tree format (round trip, atomicity, refusals)."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jq
from jq import serialize
from jq.cli import main as cli_main  # the test drives the CLI like a user; nothing in jq imports it
from test_models_llama import tiny_cfg, tiny_checkpoint, write_gguf

TEXT = ("the cat sat on the mat and the hat, " * 60) + "12 cats at the hat. "


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    d = tmp_path_factory.mktemp("model")
    cfg = tiny_cfg(tie=True)
    path = d / "tiny.gguf"
    write_gguf(path, cfg, tiny_checkpoint(cfg))
    text = d / "text.txt"
    text.write_text(TEXT)
    recipe = d / "w4.yaml"
    recipe.write_text("name: w4\nrules:\n  - pattern: '.*kernel'\n    format: int4\n    symmetric: false\n    group_size: 16\n")
    return path, text, recipe


def test_eval_json_float_and_quantized(tiny_model, capsys):
    model, text, recipe = tiny_model
    assert cli_main(["eval", "--model", str(model), "--text", str(text), "--window", "32", "--windows", "4", "--json"]) == 0
    f = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert cli_main(["eval", "--model", str(model), "--recipe", str(recipe), "--text", str(text), "--window", "32",
                     "--windows", "4", "--json"]) == 0
    q = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for r in (f, q):
        assert {"perplexity", "bits_per_weight", "model_bytes", "seconds"} <= set(r)
        assert np.isfinite(r["perplexity"]) and r["perplexity"] > 1 and r["windows"] == 4
    assert f["linear_bits_per_weight"] == 32.0
    # int4 codes + f16 scale + u8 zero per 16 weights: 4 + 24/16 = 5.5 bits on the linear layers
    assert q["linear_bits_per_weight"] == pytest.approx(5.5)
    assert q["model_bytes"] < f["model_bytes"]
    assert q["perplexity"] != f["perplexity"]


def test_eval_text_shorter_than_window_is_a_clear_error(tiny_model, tmp_path, capsys):
    model, _, _ = tiny_model
    short = tmp_path / "short.txt"
    short.write_text("the cat")
    assert cli_main(["eval", "--model", str(model), "--text", str(short), "--window", "32"]) == 2
    err = capsys.readouterr().err
    assert "fewer than one window of 32" in err and "--window" in err


def test_eval_bad_recipe_field_is_a_clear_error(tiny_model, tmp_path, capsys):
    model, text, _ = tiny_model
    bad = tmp_path / "bad.yaml"
    bad.write_text("rules:\n  - pattern: '.*kernel'\n    format: int5x\n")
    assert cli_main(["eval", "--model", str(model), "--recipe", str(bad), "--text", str(text)]) == 2
    err = capsys.readouterr().err
    assert "rules[0]" in err and "'format'" in err and "int5x" in err and "int4" in err


def test_quantize_writes_a_tree_that_inspect_reads_and_that_dequantizes_equal(tiny_model, tmp_path, capsys):
    model, _, recipe = tiny_model
    out = tmp_path / "q"
    assert cli_main(["quantize", "--model", str(model), "--recipe", str(recipe), "--out", str(out)]) == 0
    assert "layers_0/attn/q_proj/kernel" in capsys.readouterr().out
    tree, manifest = serialize.load(out)
    assert manifest["meta"]["recipe"] == "w4" and manifest["format_version"] == serialize.FORMAT_VERSION
    from jq.models import load_model

    _, params, _ = load_model(model)
    expect = jq.quantize_params(params, jq.load_recipe(recipe))
    a = jq.dequantize_params(tree)
    b = jq.dequantize_params(expect)
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)
    assert cli_main(["inspect", str(out)]) == 0
    assert "int4 asym g16" in capsys.readouterr().out
    # a second write to the same place needs --overwrite
    assert cli_main(["quantize", "--model", str(model), "--recipe", str(recipe), "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err


def _tree():
    k = jax.random.key(1)
    w = jax.random.normal(k, (64, 24), jnp.float32)
    params = {"a": {"kernel": w, "bias": jnp.arange(24, dtype=jnp.bfloat16)},
              "b": {"kernel": w[:32] * 3}, "c": {"kernel": w.T}}
    cfg = jq.QuantConfig(rules=(jq.Rule("a/kernel", jq.Scheme("int3", symmetric=False, group_size=16)),
                                jq.Rule("b/kernel", jq.Scheme("fp8_e4m3", scale_dtype="bfloat16")),
                                jq.Rule("c/kernel", jq.Scheme("nf4", group_size=16, pad=True, restricted=False))))
    return params, jq.quantize_params(params, cfg)


def test_save_load_round_trip_is_exact_for_every_array_kind(tmp_path):
    params, q = _tree()
    serialize.save(tmp_path / "t", q, {"note": "x"})
    back, m = serialize.load(tmp_path / "t")
    assert m["meta"] == {"note": "x"}
    for (p1, x), (p2, y) in zip(jq.leaf_paths(q), jq.leaf_paths(back)):
        assert p1 == p2
        if isinstance(x, jq.QTensor):
            assert isinstance(y, jq.QTensor) and y.layout == x.layout and y.fmt == x.fmt
            np.testing.assert_array_equal(np.asarray(y.dequantize()), np.asarray(x.dequantize()))
            assert y.nbytes == x.nbytes
        else:
            assert y.dtype == x.dtype
            np.testing.assert_array_equal(np.asarray(y), np.asarray(x))


def test_interrupted_save_leaves_nothing_that_loads(tmp_path, monkeypatch):
    params, q = _tree()

    def boom(*a, **k):
        raise OSError("No space left on device")

    monkeypatch.setattr(serialize, "save_file", boom)
    with pytest.raises(OSError, match="No space"):
        serialize.save(tmp_path / "t", q)
    assert not (tmp_path / "t").exists()
    assert [p for p in os.listdir(tmp_path)] == []  # the temporary directory is gone too


def test_load_refuses_missing_foreign_and_newer(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a directory"):
        serialize.load(tmp_path / "nope")
    (tmp_path / "foreign").mkdir()
    with pytest.raises(ValueError, match="manifest.json or tensors.safetensors is missing"):
        serialize.load(tmp_path / "foreign")
    _, q = _tree()
    d = serialize.save(tmp_path / "t", q)
    m = json.loads((d / "manifest.json").read_text())
    m["format_version"] = serialize.FORMAT_VERSION + 1
    (d / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ValueError, match="newer than this jq reads"):
        serialize.load(d)


def test_load_rejects_arrays_that_do_not_fit_the_layout(tmp_path):
    _, q = _tree()
    d = serialize.save(tmp_path / "t", q)
    m = json.loads((d / "manifest.json").read_text())
    leaf = next(e for e in m["leaves"] if e["path"] == "a/kernel")
    leaf["layout"]["group_size"] = 8  # the stored scales are for groups of 16
    (d / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ValueError, match=r"a/kernel.*scale shape \(4, 24\) != \(8, 24\)"):
        serialize.load(d)
