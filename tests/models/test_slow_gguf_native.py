"""The real GGUF files read natively: SmolLM2-135M (Q4_1 + a Q8_0 embedding) is the float model at 5.0 bits per
linear weight and exports back to the same tensor bytes; Gemma 3 270M's Q5_0 / Q8_0 tensors arrive as QTensors, its
K-quants as QTensors with float32 sub-block scales, every value llama.cpp's."""

import jax.numpy as jnp
import numpy as np
import pytest
from gguf import GGUFReader

from jq.models.io.gguf import load_gguf
from jq.models.io.gguf_write import export_gguf
from jq.models.io.hub import resolve_model
from jq.numbers.qtensor import QTensor
from jq.tree.paths import leaf_paths


@pytest.mark.slow
def test_smollm2_native_is_the_shipped_model_and_exports_to_its_own_bytes(tmp_path):
    src = resolve_model("smollm2-135m")
    n = load_gguf(src, native=True)
    assert n.native == {"Q8_0": {"tensors": 1, "as": "QTensor"}, "F32": {"tensors": 61, "as": "float"},
                        "Q4_1": {"tensors": 210, "as": "QTensor"}}
    q = n.params["layers_0"]["mlp"]["down_proj"]["kernel"]
    assert q.describe() == "int4 asym g32 min" and q.bits_per_weight == 5.0
    report = export_gguf(n.params, n.cfg, n.family, src, tmp_path / "out.gguf")
    assert all(r["exact"] for r in report) and len(report) == 272
    a, b = GGUFReader(str(src)), GGUFReader(str(tmp_path / "out.gguf"))
    for ta, tb in zip(a.tensors, b.tensors, strict=True):
        assert (ta.name, ta.tensor_type) == (tb.name, tb.tensor_type)
        assert np.array_equal(np.asarray(ta.data), np.asarray(tb.data)), ta.name


@pytest.mark.slow
def test_gemma3_legacy_blocks_and_k_quants_native():
    src = resolve_model("gemma3-270m")
    f, n = load_gguf(src), load_gguf(src, native=True)
    assert n.native["Q5_0"]["as"] == n.native["Q8_0"]["as"] == "QTensor"
    assert n.native["Q4_K"]["as"].startswith("QTensor, float32") and n.native["Q6_K"]["as"].startswith("QTensor")
    kinds = set()
    for (p, x), (_, y) in zip(leaf_paths(f.params), leaf_paths(n.params), strict=True):
        if isinstance(y, QTensor):
            kinds.add(y.describe())
            np.testing.assert_array_equal(np.asarray(y.dequantize(jnp.float32)), x, err_msg=p)
    assert {"int5 sym g32", "int8 sym g32", "int4 asym g32 min", "int6 sym g16"} <= kinds
