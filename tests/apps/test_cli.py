"""The CLI end to end on a tiny GGUF model: eval, quantize --out, inspect, convert (the checkpoint format itself is
tested in tests/checkpoint/)."""

import json

import jax
import numpy as np
import pytest

import jq
from jq import checkpoint
from jq.checkpoint.format import sealed
from jq.apps.cli import main as cli_main  # the test drives the CLI like a user; nothing in jq imports it
from jqtest.llama import tiny_cfg, tiny_checkpoint, write_gguf

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
    assert f["calibration"] is None and q["calibration"] is None  # data-free: nothing drawn


def test_eval_json_names_the_calibration_draw(tiny_model, tmp_path, capsys):
    model, text, _ = tiny_model
    gptq = tmp_path / "gptq.yaml"
    gptq.write_text("name: g\nrules:\n  - pattern: '.*kernel'\n    method: gptq\n    format: int4\n    group_size: 16\n")
    args = ["eval", "--model", str(model), "--recipe", str(gptq), "--text", str(text), "--window", "32", "--windows",
            "2", "--calib", str(text), "--calib-samples", "3", "--calib-len", "32", "--json"]
    assert cli_main(args + ["--calib-seed", "4", "--calib-sampling", "stream"]) == 0
    r = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert r["calibration"] == {"files": [str(text)], "samples": 3, "length": 32, "seed": 4, "sampling": "stream"}
    assert cli_main(args) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["calibration"]["sampling"] == "windows"


def test_eval_also_scores_other_texts_with_the_same_quantized_model(tiny_model, tmp_path, capsys):
    model, text, recipe = tiny_model
    other = tmp_path / "other.txt"
    other.write_text("a dog ran in the fog by the log. " * 30)
    args = ["eval", "--model", str(model), "--recipe", str(recipe), "--text", str(text), "--window", "32",
            "--windows", "4", "--json"]
    assert cli_main(args + ["--also-text", str(other)]) == 0
    r = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    o = r["also"][str(other)]
    assert o["windows"] == 4 and np.isfinite(o["perplexity"]) and o["perplexity"] != r["perplexity"]
    # scoring the other text as the main text gives the same number (same quantized model, same windows)
    assert cli_main(args[:6] + [str(other)] + args[7:]) == 0
    alone = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert alone["perplexity"] == pytest.approx(o["perplexity"], rel=1e-6)
    assert cli_main(args + ["--also-text", str(tmp_path / "missing.txt")]) == 2
    assert "--also-text" in capsys.readouterr().err


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
    tree, meta = checkpoint.load(out)
    assert meta["recipe"]["name"] == "w4" and meta["format_version"] == checkpoint.FORMAT_VERSION
    assert meta["meta"]["model_config"]["n_layers"] == 2
    from jq.models import load_model

    params = load_model(model).params
    expect = jq.quantize_params(params, jq.load_recipe(recipe))
    a = jq.dequantize_params(tree)
    b = jq.dequantize_params(expect)
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)
    assert cli_main(["inspect", str(out)]) == 0
    assert "int4 asym g16" in capsys.readouterr().out
    # a second write to the same place needs --overwrite
    assert cli_main(["quantize", "--model", str(model), "--recipe", str(recipe), "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err



def test_convert_then_inspect_and_inspect_refuses_a_damaged_checkpoint(tiny_model, tmp_path, capsys):
    model, _, recipe = tiny_model
    out = tmp_path / "c"
    assert cli_main(["convert", "--in", str(model), "--recipe", str(recipe), "--out", str(out)]) == 0
    cap = capsys.readouterr()
    assert "layers_1/mlp/down_proj/kernel" in cap.err and f"wrote {out}" in cap.out
    assert cli_main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert "int4 asym g16" in text and "float (float32)" in text and "integrity OK" in text
    meta = out / checkpoint.META_FILE
    m = json.loads(meta.read_text())
    m["leaves"]["layers_0/attn/q_proj/kernel"]["arrays"]["codes"]["crc32"] ^= 1
    meta.write_text(json.dumps(sealed(m)))  # the recorded CRC no longer fits the stored codes
    assert cli_main(["inspect", str(out)]) == 2
    err = capsys.readouterr().err
    assert "jq inspect: error:" in err and "layers_0/attn/q_proj/kernel" in err and "CRC-32" in err
    assert cli_main(["inspect", str(tmp_path / "none")]) == 2
    assert "no such checkpoint directory" in capsys.readouterr().err
    assert cli_main(["convert", "--in", str(model), "--out", str(tmp_path / "d")]) == 2
    assert "holds float weights: converting it needs a recipe" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()


def test_qat_subcommand_hands_its_arguments_to_the_finetune_parser(capsys):
    with pytest.raises(SystemExit) as e:
        cli_main(["qat", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: jq qat") and "--grad-accum" in out and "--float" in out


def test_quantize_with_a_rotating_recipe_stores_the_untied_config(tiny_model, tmp_path, capsys):
    model, _, _ = tiny_model
    rot = tmp_path / "rot.yaml"
    rot.write_text("name: rot\nrotation: {seed: 1}\nrules:\n  - pattern: '.*kernel'\n    format: int8\n")
    out = tmp_path / "q"
    assert cli_main(["quantize", "--model", str(model), "--recipe", str(rot), "--out", str(out)]) == 0
    tree, info = checkpoint.load(out)
    assert "lm_head" in tree and info["meta"]["model_config"]["tie_embeddings"] is False
    assert info["recipe"]["rotation"] == {"residual": True, "heads": True, "seed": 1}


def test_eval_of_a_quantized_checkpoint_equals_eval_of_its_recipe(tiny_model, tmp_path, capsys):
    model, text, _ = tiny_model
    rot = tmp_path / "rot.yaml"  # a rotation: the checkpoint's stored (untied) config must be the one used
    rot.write_text("name: rot\nrotation: {seed: 1}\nrules:\n  - pattern: '.*kernel'\n    format: int4\n"
                   "    group_size: 16\n")
    out = tmp_path / "q"
    assert cli_main(["quantize", "--model", str(model), "--recipe", str(rot), "--out", str(out)]) == 0
    capsys.readouterr()
    common = ["eval", "--model", str(model), "--text", str(text), "--window", "32", "--windows", "3", "--json"]
    assert cli_main(common + ["--recipe", str(rot)]) == 0
    want = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert cli_main(common + ["--quantized", str(out), "--also-text", str(text)]) == 0
    got = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert got["recipe"] == f"quantized:{out}" and got["perplexity"] == pytest.approx(want["perplexity"], rel=1e-5)
    assert got["also"][str(text)]["perplexity"] == pytest.approx(want["perplexity"], rel=1e-5)
    assert got["model_bytes"] == want["model_bytes"]
    assert cli_main(common + ["--quantized", str(out), "--recipe", str(rot)]) == 2
    assert "--recipe and --quantized cannot be combined" in capsys.readouterr().err
    from jq.apps import pipeline

    with pytest.raises(ValueError, match=r"a recipe \(rot\) and a quantized checkpoint \(.*q\) cannot both be "
                                         r"evaluated: .*pass one of them"):
        pipeline.evaluate(pipeline.load(str(model)), TEXT, jq.load_recipe(str(rot)), window=32, windows=1,
                          quantized=out)


# -- bad inputs, caught before the work and named ------------------------------------------------------------


def test_non_utf8_texts_are_named_before_the_model_loads(tiny_model, tmp_path, capsys):
    _, text, _ = tiny_model
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("Persuasion — caf\xe9".encode("latin-1", "replace") + b"\xff more")
    missing_model = str(tmp_path / "never-loaded.gguf")  # the text error comes first, in a second
    for argv, flag in ((["eval", "--model", missing_model, "--text", str(latin)], "--text"),
                       (["eval", "--model", missing_model, "--text", str(text), "--also-text", str(latin)],
                        "--also-text"),
                       (["eval", "--model", missing_model, "--text", str(text), "--recipe", "gptq_w4_g128", "--calib",
                         str(latin)], "--calib"),
                       (["quantize", "--model", missing_model, "--recipe", "gptq_w4_g128", "--calib", str(latin),
                         "--out", str(tmp_path / "q")], "--calib")):
        assert cli_main(argv) == 2
        err = capsys.readouterr().err
        assert f"{flag} {latin}: not UTF-8 text (byte 0x" in err and "iconv" in err, err
        assert "never-loaded" not in err
    from jq.apps import data

    with pytest.raises(ValueError, match=r"calibration file .*latin1.txt: not UTF-8 text"):
        data.calibration_tokens(type("T", (), {"encode": staticmethod(list)}), [latin])


def test_window_beyond_the_context_is_refused(tiny_model, capsys):
    model, text, _ = tiny_model  # the tiny model's context is 64 tokens
    assert cli_main(["eval", "--model", str(model), "--text", str(text), "--window", "128"]) == 2
    assert "--window 128 is longer than the model's context of 64 tokens" in capsys.readouterr().err
    from jq.apps import pipeline

    with pytest.raises(ValueError, match="window 128 is longer than the model's context of 64 tokens"):
        pipeline.evaluate(pipeline.load(str(model)), TEXT, window=128)
    assert cli_main(["qat", "--model", "tiny", "--seq-len", "4096", "--steps", "0"]) == 2
    assert "--seq-len 4096 is longer than the model's context of 128 tokens" in capsys.readouterr().err


def test_every_model_command_takes_the_known_names(tiny_model, tmp_path, monkeypatch, capsys):
    """`jq convert --in NAME` resolves a known model name like eval / quantize / generate do."""
    from jq.models.io import hub

    model, _, recipe = tiny_model
    monkeypatch.setitem(hub.KNOWN_MODELS, "tiny-test", hub.PypiModel("none", "0", "m.gguf", "m.gguf", "test"))
    monkeypatch.setattr(hub, "_fetch", lambda m: model)
    assert cli_main(["convert", "--in", "tiny-test", "--recipe", str(recipe), "--out", str(tmp_path / "c")]) == 0
    assert checkpoint.read_meta(tmp_path / "c")["meta"]["source"] == str(model)
    assert cli_main(["quantize", "--model", "tiny-test", "--recipe", str(recipe), "--out", str(tmp_path / "q")]) == 0
    capsys.readouterr()
    assert cli_main(["convert", "--in", "no-such-model", "--recipe", str(recipe), "--out", str(tmp_path / "d")]) == 2
    assert "no-such-model: no such file or directory" in capsys.readouterr().err


def test_the_readme_workflow_with_relative_paths(tiny_model, tmp_path, monkeypatch, capsys):
    model, _, _ = tiny_model
    monkeypatch.chdir(tmp_path)  # outside the repository: `configs/...` resolves to the shipped recipe
    assert cli_main(["quantize", "--model", str(model), "--recipe", "configs/rtn_w4_g128.yaml", "--out", "out/w4"]) == 0
    assert cli_main(["inspect", "out/w4"]) == 0
    assert "integrity OK" in capsys.readouterr().out
    assert cli_main(["generate", "--model", str(model), "--quantized", "out/w4", "--prompt", "the cat", "--max-new",
                     "3", "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["recipe"] == "out/w4"
