"""Whole Hugging Face directories of pre-quantized checkpoints: `load_model` returns QTensors exactly as shipped (a
tiny GPTQ Llama gives the logits of its dequantized reference), and bad directories are refused naming the tensor,
the value found and the fix."""

from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from jq.apps.pipeline import quantized_forward
from jq.models import load_model
from jq.models.io.lazy import materialize
from jq.models.io.safetensors import open_hf
from jq.numbers.qtensor import QTensor
from jq.tree.paths import leaf_paths
from jqtest.hfq import awq_layer, ct_layer, gptq_layer, write_quantized
from jqtest.llama import TOKENS_IN, np_forward, tiny_cfg

GPTQ_QC = {"quant_method": "gptq", "bits": 4, "group_size": 16, "desc_act": True, "sym": False,
           "checkpoint_format": "gptq"}
AWQ_QC = {"quant_method": "awq", "bits": 4, "group_size": 16, "zero_point": True, "version": "GEMM"}


def ct_qc(sym: bool, ignore=(), targets=("Linear",), actorder="group") -> dict:
    return {"quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
            "ignore": list(ignore), "config_groups": {"group_0": {"targets": list(targets), "weights": {
                "num_bits": 4, "type": "int", "symmetric": sym, "strategy": "group", "group_size": 16,
                "actorder": actorder, "dynamic": False}}}}


FORMATS = {
    "gptq": (GPTQ_QC, lambda rng, k, n: gptq_layer(rng, k, n, bits=4, group_size=16, act_order=True)),
    "awq": (AWQ_QC, lambda rng, k, n: awq_layer(rng, k, n, group_size=16)),
    "compressed-tensors": (ct_qc(False), lambda rng, k, n: ct_layer(rng, k, n, sym=False, act_order=True)),
}


def kernels_match(params, ref) -> None:
    """Every linear kernel is a QTensor whose dequantization is the reference bit for bit; the rest is float."""
    n = 0
    for path, leaf in leaf_paths(params):
        if path.endswith("proj/kernel"):
            layer, _, rest = path.partition("/")
            module = {"attn": "self_attn"}.get(rest.split("/")[0], "mlp") + "." + rest.split("/")[1]
            want = ref[f"model.layers.{layer.removeprefix('layers_')}.{module}.weight"].T
            assert isinstance(leaf, QTensor) and leaf.shape == want.shape, path
            assert np.array_equal(np.asarray(leaf.dequantize(np.float32)), want), path
            n += 1
        else:
            assert isinstance(leaf, np.ndarray) and leaf.dtype == np.float32, path
    assert n == 14


def test_a_gptq_llama_loads_as_qtensors_and_gives_the_reference_logits(tmp_path):
    cfg = tiny_cfg(tie=True)
    qc, layer = FORMATS["gptq"]
    ref = write_quantized(tmp_path / "m", cfg, "gptq", qc, layer)
    m = load_model(tmp_path / "m")
    assert m.cfg == cfg and m.family.name == "llama"
    kernels_match(m.params, ref)
    assert m.native == {"gptq": {"tensors": 14, "as": "QTensor int4 asym g16 perm"}}
    logits = np.asarray(quantized_forward(m.cfg)(m.params, TOKENS_IN[None]))[0]
    want = np_forward(cfg, {k: v.astype(np.float64) for k, v in ref.items()}, TOKENS_IN)
    np.testing.assert_allclose(logits, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("method", ["awq", "compressed-tensors"])
def test_awq_and_compressed_llamas_load_as_shipped(tmp_path, method):
    qc, layer = FORMATS[method]
    ref = write_quantized(tmp_path / "m", tiny_cfg(tie=True), method, qc, layer)
    family, cfg, lazy = open_hf(tmp_path / "m")
    params = materialize(lazy)
    kernels_match(params, ref)
    q = params["layers_1"]["mlp"]["down_proj"]["kernel"]
    assert q.layout.shape == (64, 32) and not q.symmetric and (q.perm is not None) == (method != "awq")


def test_compressed_targets_and_ignore_choose_the_scheme(tmp_path):
    cfg = tiny_cfg(tie=True)
    qc = ct_qc(True, ignore=["re:.*mlp\\.down_proj$"], actorder=None)
    ref = write_quantized(tmp_path / "m", cfg, "compressed-tensors", qc, lambda rng, k, n: ct_layer(rng, k, n))
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.down_proj\.weight_packed: is quantized, but no "
                                         r"quantization_config group quantizes module .*ignored.*fix config_groups"):
        open_hf(tmp_path / "m")
    qc = ct_qc(True, targets=["re:.*_proj$"], actorder=None)
    (tmp_path / "m" / "config.json").write_text(json.dumps({**json.loads((tmp_path / "m" / "config.json").read_text()),
                                                            "quantization_config": qc}))
    kernels_match(materialize(open_hf(tmp_path / "m")[2]), ref)


def rewrite(directory, change) -> None:
    """Apply `change(tensors)` to the directory's model.safetensors."""
    f = directory / "model.safetensors"
    tensors = dict(load_file(str(f)))
    change(tensors)
    save_file(tensors, str(f), metadata={"format": "pt"})


def set_config(directory, **qc) -> None:
    cfg = json.loads((directory / "config.json").read_text())
    cfg["quantization_config"] = {**cfg["quantization_config"], **qc}
    (directory / "config.json").write_text(json.dumps(cfg))


@pytest.fixture
def gptq_dir(tmp_path):
    qc, layer = FORMATS["gptq"]
    write_quantized(tmp_path / "m", tiny_cfg(tie=True), "gptq", qc, layer)
    return tmp_path / "m"


def test_bits_the_tensors_contradict_are_named_when_opening(gptq_dir):
    set_config(gptq_dir, bits=8)
    with pytest.raises(ValueError, match=r"tensor model\.layers\.\d\.\S+ has shape \(\d+, \d+\), expected \(\d+, "
                                         r"\d+\) for parameter layers_\d/\S+ .*'bits': 8.*fix config\.json"):
        open_hf(gptq_dir)


def test_a_missing_tensor_is_named(gptq_dir):
    rewrite(gptq_dir, lambda t: t.pop("model.layers.1.mlp.up_proj.scales"))
    with pytest.raises(ValueError, match=r"layer model\.layers\.1\.mlp\.up_proj: tensor "
                                         r"model\.layers\.1\.mlp\.up_proj\.scales is missing.*incomplete"):
        open_hf(gptq_dir)


def test_a_damaged_g_idx_is_named_when_its_layer_loads(gptq_dir):
    def damage(t):
        t["model.layers.0.self_attn.k_proj.g_idx"][:] = 0
    rewrite(gptq_dir, damage)
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.k_proj\.g_idx: g_idx is not "
                                         r"group-consistent: group 0 has 32 rows, expected 16"):
        load_model(gptq_dir)


@pytest.mark.parametrize("qc,match", [
    ({"quant_method": "bitsandbytes"}, r"quant_method 'bitsandbytes'.*jq reads pre-quantized gptq, awq, "
                                       r"compressed-tensors"),
    ({"quant_method": "awq", "version": "exllama"}, r"unknown AWQ version 'exllama'"),
    ({"dynamic": {"-:.*down_proj": {}}}, r"per-module overrides"),
    ({"group_size": 24}, r"group_size 24 does not divide its (32|64) input features"),
])
def test_configs_jq_cannot_read_are_named(gptq_dir, qc, match):
    set_config(gptq_dir, **qc)
    with pytest.raises(ValueError, match=match):
        open_hf(gptq_dir)
