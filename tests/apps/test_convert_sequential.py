"""Streaming sequential calibration (`jq.apps.convert_sequential`): a calibrated recipe over a Hugging Face
directory, block by block from the file, gives the same codes as the in-memory `quantize_sequential`, reads
each block only after the previous one is written, and refuses a calibrated rule outside the blocks up front."""

import numpy as np
import pytest

import jq
from jq import checkpoint
from jq.models import load_model
from jq.apps.convert import convert
from jq.apps.convert_sequential import activation_bytes, convert_sequential
from jq.calibration.sequential import quantize_sequential
from jq.checkpoint.writer import Writer
from jq.models.io.safetensors import open_hf
from jq.tree.paths import leaf_paths
from jqtest.llama import tiny_cfg, tiny_checkpoint, write_hf

BASE = {"format": "int4", "symmetric": False, "group_size": 16}
GPTQ = {"rules": [{"pattern": r"layers_\d+/.*kernel", "method": "gptq", **BASE, "options": {"block_size": 8}},
                  {"pattern": "lm_head/kernel", **BASE}], "ignore": []}  # the LM head by RTN, outside the blocks


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("hf") / "tiny"
    cfg = tiny_cfg(tie=False)
    write_hf(d, cfg, tiny_checkpoint(cfg, seed=3))
    return d


def _tokens(n=6, length=16):
    return np.random.default_rng(0).integers(0, tiny_cfg(False).vocab_size, (n, length)).astype(np.int32)


def _same(ckpt, ref):
    got = dict(leaf_paths(ckpt))
    want = dict(leaf_paths(ref))
    assert sorted(got) == sorted(want)
    for p, w in want.items():
        g = got[p]
        if isinstance(w, jq.QTensor):
            assert isinstance(g, jq.QTensor), p
            np.testing.assert_array_equal(np.asarray(g.codes), np.asarray(w.codes), err_msg=p)
            np.testing.assert_array_equal(np.asarray(g.scale), np.asarray(w.scale), err_msg=p)
            np.testing.assert_array_equal(np.asarray(g.zero), np.asarray(w.zero), err_msg=p)
        else:
            np.testing.assert_array_equal(np.asarray(g), np.asarray(w), err_msg=p)


def test_streamed_codes_equal_in_memory_sequential(hf_dir, tmp_path):
    cfg = jq.recipe_from_dict(GPTQ)
    toks = _tokens()
    m = load_model(str(hf_dir))
    ref, _ = quantize_sequential(m.family.block_spec(m.cfg), m.params, cfg, toks, progress=False)
    out = convert(hf_dir, cfg, tmp_path / "q", calib=toks, progress=False)
    meta = checkpoint.read_meta(out)["meta"]
    assert meta["streamed"] and not meta["activations_offloaded"]
    assert meta["peak_activation_bytes"] == activation_bytes(toks, m.cfg.dim) == 6 * 16 * 32 * 4
    q = checkpoint.load(out)[0]
    assert isinstance(q["lm_head"]["kernel"], jq.QTensor) and isinstance(q["layers_1"]["mlp"]["down_proj"]["kernel"],
                                                                         jq.QTensor)
    _same(q, ref)


def test_offloaded_activations_give_the_same_codes_and_blocks_are_read_one_at_a_time(hf_dir, tmp_path, monkeypatch):
    cfg = jq.recipe_from_dict(GPTQ)
    toks = _tokens()
    m = load_model(str(hf_dir))
    ref, _ = quantize_sequential(m.family.block_spec(m.cfg), m.params, cfg, toks, progress=False)
    family, mcfg, lazy = open_hf(hf_dir)
    events = []
    lazy = [dataclasses_replace_load(leaf, events) for leaf in lazy]
    add = Writer.add
    monkeypatch.setattr(Writer, "add", lambda self, path, v: (events.append(("write", path)), add(self, path, v))[1])
    out = convert_sequential(family.block_spec(mcfg), lazy, cfg, toks, tmp_path / "q", progress=False, act_bytes=0)
    assert checkpoint.read_meta(out)["meta"]["activations_offloaded"]
    assert not list(tmp_path.glob(".jq-acts-*"))  # the memmaps are removed
    _same(checkpoint.load(out)[0], ref)
    # every leaf of layers_0 is written before any leaf of layers_1 is read; the embedding is read before the blocks
    first_read_1 = events.index(next(e for e in events if e[0] == "read" and e[1].startswith("layers_1/")))
    written_0 = [i for i, e in enumerate(events) if e[0] == "write" and e[1].startswith("layers_0/")]
    assert len(written_0) == 9 and max(written_0) < first_read_1
    assert events[0] == ("read", "embed/embedding")
    reads = [p for kind, p in events if kind == "read"]
    assert sorted(set(reads)) == sorted(reads[1:]) and reads.count("embed/embedding") == 2  # each leaf once, + embed


def dataclasses_replace_load(leaf, events):
    import dataclasses

    def load(leaf=leaf):
        events.append(("read", leaf.path))
        return leaf.load()

    return dataclasses.replace(leaf, load=load)


def test_calibrated_rule_outside_the_blocks_is_refused_before_any_work(hf_dir, tmp_path):
    cfg = jq.recipe_from_dict({"rules": [{"pattern": ".*kernel", "method": "gptq", **BASE}], "ignore": []})
    with pytest.raises(ValueError, match=r"lm_head/kernel: calibrated method 'gptq' is only supported inside blocks"):
        convert(hf_dir, cfg, tmp_path / "q", calib=_tokens(2), progress=False)
    assert not (tmp_path / "q").exists()


def test_text_calibration_without_a_tokenizer_is_refused_before_anything_is_written(hf_dir, tmp_path):
    assert not (hf_dir / "tokenizer.json").exists()
    text = tmp_path / "calib.txt"
    text.write_text("some calibration text " * 50)
    with pytest.raises(ValueError, match=r"no tokenizer found \(tokenizer\.json in the directory, or a GGUF "
                                         r"vocabulary\); pass calibration token ids instead of text"):
        convert(hf_dir, jq.recipe_from_dict(GPTQ), tmp_path / "q", calib=[text], progress=False)
    assert not (tmp_path / "q").exists()
