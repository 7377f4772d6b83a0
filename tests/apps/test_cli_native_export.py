"""`jq eval / generate --native` (the GGUF model as shipped) and `jq export` on a tiny llama GGUF."""

from __future__ import annotations

import json

import numpy as np
import pytest

from jq.apps.cli import main as cli_main
from jq.numbers.qtensor import QTensor

from jqtest.llama import tiny_cfg, tiny_checkpoint, write_gguf

TEXT = ("the cat sat on the mat and the hat, " * 60) + "12 cats at the hat. "


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("model")
    cfg = tiny_cfg(tie=True)
    write_gguf(d / "tiny.gguf", cfg, tiny_checkpoint(cfg))
    (d / "text.txt").write_text(TEXT)
    (d / "w4.yaml").write_text("name: w4\nrules:\n  - pattern: '.*kernel'\n    format: int4\n    symmetric: false\n"
                               "    group_size: 16\n")
    return d


def _json(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def _eval(model, tiny, *extra) -> list[str]:
    return ["eval", "--model", str(model), "--text", str(tiny / "text.txt"), "--window", "32", "--windows", "4",
            "--json", *extra]


def test_native_eval_is_the_float_model_at_the_files_bits(tiny, capsys):
    assert cli_main(_eval(tiny / "tiny.gguf", tiny)) == 0
    f = _json(capsys)
    assert cli_main(_eval(tiny / "tiny.gguf", tiny, "--native")) == 0
    n = _json(capsys)
    assert n["recipe"] == "native" and n["native"]["Q4_1"] == {"tensors": 2, "as": "QTensor"}
    assert n["perplexity"] == pytest.approx(f["perplexity"], rel=1e-6)
    assert n["linear_bits_per_weight"] < 32 and n["model_bytes"] < f["model_bytes"]
    assert cli_main(_eval(tiny / "tiny.gguf", tiny, "--native", "--recipe", str(tiny / "w4.yaml"))) == 2
    assert "--native" in capsys.readouterr().err


def test_export_gguf_round_trips_and_reports_what_changed(tiny, tmp_path, capsys):
    out = tmp_path / "native.gguf"
    assert cli_main(["export", "--model", str(tiny / "tiny.gguf"), "--native", "--to", "gguf", "--out", str(out),
                     "--json"]) == 0
    r = _json(capsys)
    assert r["exact"] == len(r["tensors"]) and out.is_file()
    assert cli_main(_eval(tiny / "tiny.gguf", tiny, "--native")) == 0
    a = _json(capsys)
    assert cli_main(_eval(out, tiny, "--native")) == 0
    assert _json(capsys)["perplexity"] == a["perplexity"]
    assert cli_main(["export", "--model", str(tiny / "tiny.gguf"), "--native", "--to", "gguf", "--out", str(out)]) == 2
    assert "exists" in capsys.readouterr().err
    assert cli_main(["export", "--model", str(tiny / "tiny.gguf"), "--recipe", str(tiny / "w4.yaml"), "--to", "gguf",
                     "--out", str(tmp_path / "w4.gguf"), "--json"]) == 0
    rows = {t["path"]: t for t in _json(capsys)["tensors"]}
    q = rows["layers_0/attn/q_proj/kernel"]
    assert q["gguf"] == "Q4_1" and not q["exact"] and "re-quantized" in q["note"]
    assert cli_main(["export", "--model", str(tiny / "tiny.gguf"), "--native", "--quantized", "x", "--to", "gguf",
                     "--out", str(tmp_path / "x.gguf")]) == 2
    assert "cannot be combined" in capsys.readouterr().err


def test_native_generate_names_its_weights(tiny, capsys):
    assert cli_main(["generate", "--model", str(tiny / "tiny.gguf"), "--native", "--prompt", "the cat",
                     "--max-new", "3", "--json"]) == 0
    assert _json(capsys)["recipe"] == "native"


@pytest.mark.parametrize("to", ["gptq", "compressed-tensors"])
def test_export_to_a_hugging_face_format_loads_back_as_the_same_model(tiny, tmp_path, capsys, to):
    out = tmp_path / to
    assert cli_main(["export", "--model", str(tiny / "tiny.gguf"), "--recipe", str(tiny / "w4.yaml"), "--to", to,
                     "--out", str(out), "--float-dtype", "float32"]) == 0
    assert f"wrote {out} ({to})" in capsys.readouterr().out
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == to and (out / "tokenizer.json").is_file()
    assert cli_main(_eval(tiny / "tiny.gguf", tiny, "--recipe", str(tiny / "w4.yaml"))) == 0
    want = _json(capsys)
    assert cli_main(_eval(out, tiny)) == 0  # the directory loads natively: its QTensors are the recipe's
    got = _json(capsys)
    assert got["recipe"] == "native" and got["perplexity"] == pytest.approx(want["perplexity"], rel=1e-5)
    assert got["linear_bits_per_weight"] == pytest.approx(want["linear_bits_per_weight"], rel=0.05)


def test_convert_stores_a_native_gguf_as_it_is(tiny, tmp_path, capsys):
    from jq import checkpoint
    from jq.models.io.gguf import load_gguf
    from jq.tree.paths import leaf_paths

    out = tmp_path / "ck"
    assert cli_main(["convert", "--in", str(tiny / "tiny.gguf"), "--native", "--out", str(out)]) == 0
    want = dict(leaf_paths(load_gguf(tiny / "tiny.gguf", native=True).params))
    got = dict(leaf_paths(checkpoint.load(out)[0]))
    assert got.keys() == want.keys() and checkpoint.read_meta(out)["format_version"] == "3.0"
    for p, q in want.items():
        assert isinstance(got[p], QTensor) == isinstance(q, QTensor), p
        if isinstance(q, QTensor):
            assert got[p].describe() == q.describe()
            np.testing.assert_array_equal(np.asarray(got[p].codes), np.asarray(q.codes), err_msg=p)
    assert cli_main(["convert", "--in", str(tiny / "tiny.gguf"), "--native", "--dequantize", "--out",
                     str(tmp_path / "f")]) == 0
    assert all(not isinstance(v, QTensor) for _, v in leaf_paths(checkpoint.load(tmp_path / "f")[0]))


def test_export_to_gguf_needs_a_gguf_source(tiny, tmp_path, capsys):
    hf = tmp_path / "hf"
    assert cli_main(["export", "--model", str(tiny / "tiny.gguf"), "--recipe", str(tiny / "w4.yaml"), "--to", "gptq",
                     "--out", str(hf), "--float-dtype", "float32"]) == 0
    capsys.readouterr()
    assert cli_main(["export", "--model", str(hf), "--to", "gguf", "--out", str(tmp_path / "x.gguf")]) == 2
    assert "--to gguf copies the tokenizer and metadata of the GGUF file" in capsys.readouterr().err
