"""`jq.apps.export.export_hf`: jq-quantized Llama params → a Hugging Face GPTQ / AWQ / compressed-tensors directory
that reads back to the very same QTensors; what a target cannot hold is refused by leaf path before anything is
written, and the directory appears only when complete. Plus the Llama family's inverse name map and config."""

from __future__ import annotations

import dataclasses
import json

import jax
import numpy as np
import pytest

import jq
from jq import QuantConfig, Rule, Scheme
from jq.apps.export import export_hf
from jq.models.io.lazy import materialize
from jq.models.io.safetensors import open_hf
from jq.models.llama import FAMILY, LlamaConfig, init_params
from jq.models.llama.config import hf_config
from jq.models.llama.weights import expected_shapes, hf_name, hf_tensor
from jq.numbers.qtensor import ExecPolicy, QTensor
from jq.tree.paths import leaf_paths

CFG = LlamaConfig.tiny(tie_embeddings=False)
ASYM, SYM, INT8 = (Scheme("int4", symmetric=False, group_size=16), Scheme("int4", group_size=16), Scheme("int8"))


@pytest.fixture(scope="module")
def params():
    return init_params(CFG, jax.random.PRNGKey(0))


def quantized(params, *rules: tuple[str, Scheme]):
    return jq.quantize_params(params, QuantConfig(rules=tuple(Rule(p, s) for p, s in rules), name="t"))


def same_tree(a, b) -> None:
    """Identical trees: QTensors field by field (arrays, dtypes, layout, symmetry), floats value by value."""
    la, lb = leaf_paths(a), leaf_paths(b)
    assert [p for p, _ in la] == [p for p, _ in lb]
    for (path, x), (_, y) in zip(la, lb):
        assert type(x) is type(y) or not isinstance(x, QTensor), path
        if isinstance(x, QTensor):
            assert (x.fmt, x.layout, x.symmetric, x.restricted) == (y.fmt, y.layout, y.symmetric, y.restricted), path
            for f in ("codes", "scale", "zero", "perm"):
                u, v = getattr(x, f), getattr(y, f)
                assert (u is None) == (v is None), (path, f)
                if u is not None:
                    assert np.asarray(u).dtype == np.asarray(v).dtype and np.array_equal(u, v), (path, f)
        else:
            assert np.array_equal(np.asarray(x), np.asarray(y)), path


def round_trip(q, to, tmp_path, **kw):
    out = export_hf(q, CFG, FAMILY, tmp_path / to, to, float_dtype="float32", **kw)
    family, cfg, lazy = open_hf(out)
    assert family is FAMILY and cfg == CFG
    return materialize(lazy), json.loads((out / "config.json").read_text())


@pytest.mark.parametrize("to,rules", [
    ("gptq", [(r".*proj/kernel", SYM)]),
    ("gptq_v2", [(r".*proj/kernel", ASYM)]),
    ("gptq", [(r".*proj/kernel", INT8)]),
    ("awq", [(r".*proj/kernel", ASYM)]),
    ("compressed-tensors", [(r".*proj/kernel", ASYM)]),
    ("compressed-tensors", [(r".*attn/.*kernel", INT8), (r".*mlp/.*kernel", SYM)]),
])
def test_import_of_export_is_the_same_params(params, tmp_path, to, rules):
    q = quantized(params, *rules)
    back, config = round_trip(q, to, tmp_path)
    same_tree(q, back)
    assert config["architectures"] == ["LlamaForCausalLM"] and config["torch_dtype"] == "float32"
    qc = config["quantization_config"]
    if to.startswith("gptq"):
        scheme = rules[0][1]
        assert qc == {"quant_method": "gptq", "bits": scheme.grid.bits, "group_size": scheme.group_size or -1,
                      "desc_act": False, "sym": scheme.symmetric, "checkpoint_format": to}
    elif to == "compressed-tensors":
        assert qc["format"] == "pack-quantized" and qc["ignore"] == ["lm_head"]
        groups = [g["targets"] for g in qc["config_groups"].values()]
        assert groups == [["Linear"]] if len(rules) == 1 else sorted(map(len, groups)) == [6, 8]


def act_order(q: QTensor, seed: int, canonical: bool) -> QTensor:
    """`q` with a random act-order perm (the dequantized weight changes; the QTensor stays valid). `canonical`: rows
    inside each group in ascending order, the order g_idx implies."""
    k, g = q.shape[0], q.layout.group_size
    perm = np.random.default_rng(seed).permutation(k)
    if canonical:
        perm = np.sort(perm.reshape(-1, g), axis=1).reshape(-1)
    return dataclasses.replace(q, perm=perm.astype(np.int32))


@pytest.mark.parametrize("to", ["gptq", "compressed-tensors"])
def test_act_order_survives(params, tmp_path, to):
    q = quantized(params, (r".*proj/kernel", SYM))
    q["layers_0"]["mlp"]["up_proj"]["kernel"] = act_order(q["layers_0"]["mlp"]["up_proj"]["kernel"], 0, True)
    loose = act_order(q["layers_1"]["attn"]["q_proj"]["kernel"], 1, False)
    q["layers_1"]["attn"]["q_proj"]["kernel"] = loose
    back, config = round_trip(q, to, tmp_path)
    assert config["quantization_config"].get("desc_act", True)
    got = back["layers_1"]["attn"]["q_proj"]["kernel"]  # g_idx keeps group membership, not the order inside a group
    assert np.array_equal(np.asarray(got.dequantize()), np.asarray(loose.dequantize()))
    back["layers_1"]["attn"]["q_proj"]["kernel"] = loose
    same_tree(q, back)


def test_floats_are_written_in_float_dtype(params, tmp_path):
    q = quantized(params, (r".*proj/kernel", SYM))
    extra = tmp_path / "tokenizer.json"
    extra.write_text("{}")
    out = export_hf(q, CFG, FAMILY, tmp_path / "o", "gptq", extra_files=[extra], config_extra={"eos_token_id": 2})
    config = json.loads((out / "config.json").read_text())
    assert config["torch_dtype"] == "float16" and config["eos_token_id"] == 2
    assert (out / "tokenizer.json").read_text() == "{}"
    back = materialize(open_hf(out)[2])
    want = np.asarray(params["lm_head"]["kernel"]).astype(np.float16).astype(np.float32)
    assert np.array_equal(back["lm_head"]["kernel"], want)


@pytest.mark.parametrize("to,change,match", [
    ("gptq", lambda q: dataclasses.replace(q, policy=ExecPolicy(rotation="hadamard")), "stored rotated"),
    ("awq", lambda q: q, "format int8 cannot be stored in AWQ"),
    ("compressed-tensors", lambda q: dataclasses.replace(q, policy=ExecPolicy(act="int8")), "activation"),
])
def test_what_the_target_cannot_hold_is_refused_by_path_and_nothing_is_written(params, tmp_path, to, change, match):
    q = quantized(params, (r".*proj/kernel", INT8))
    q["layers_1"]["mlp"]["down_proj"]["kernel"] = change(q["layers_1"]["mlp"]["down_proj"]["kernel"])
    path = "layers_0/attn/k_proj/kernel" if to == "awq" else "layers_1/mlp/down_proj/kernel"
    with pytest.raises(ValueError, match=f"{path} .*{match}"):
        export_hf(q, CFG, FAMILY, tmp_path / "o", to)
    assert list(tmp_path.iterdir()) == []


def test_gptq_needs_one_scheme_and_existing_directories_are_kept(params, tmp_path):
    q = quantized(params, (r".*attn/.*kernel", INT8), (r".*mlp/.*kernel", SYM))
    with pytest.raises(ValueError, match=r"different bits / group_size.*export compressed-tensors"):
        export_hf(q, CFG, FAMILY, tmp_path / "o", "gptq")
    q = quantized(params, (r".*proj/kernel", SYM))
    (tmp_path / "o").mkdir()
    with pytest.raises(FileExistsError, match="overwrite=True"):
        export_hf(q, CFG, FAMILY, tmp_path / "o", "gptq")
    export_hf(q, CFG, FAMILY, tmp_path / "o", "gptq", overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o"]
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["config.json", "model.safetensors"]


def test_llama_hf_names_and_config_invert_the_readers():
    for cfg in (CFG, LlamaConfig.tiny()):
        assert LlamaConfig.from_hf_config(hf_config(cfg)) == cfg
        for path in expected_shapes(cfg):
            assert hf_tensor(hf_name(path, cfg), cfg).path == path
    with pytest.raises(ValueError, match="'layers_2/attn/q_proj/kernel' is not one of a LlamaForCausalLM"):
        hf_name("layers_2/attn/q_proj/kernel", CFG)


def test_flat_groups_are_refused_naming_the_group_size_and_the_fix(params, tmp_path):
    flat = Scheme("int4", symmetric=False, group_size=64, flat_groups=True)  # 64 does not divide q_proj's K = 32
    q = quantized(params, (r".*q_proj/kernel", flat), (r".*proj/kernel", ASYM))
    with pytest.raises(ValueError, match=r"layers_0/attn/q_proj/kernel.*flat groups of 64 .*does not divide K = 32.*"
                                         r"use a group size that divides 32"):
        export_hf(q, CFG, FAMILY, tmp_path / "o", "compressed-tensors")
    assert list(tmp_path.iterdir()) == []
