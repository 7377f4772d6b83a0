"""GGUF legacy blocks read natively as QTensors: exactly the values `gguf.quants.dequantize` gives, at the file's own
bits per weight, through the model, the kernels and a checkpoint."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from gguf import GGUFReader, quants

import jq
from jq import checkpoint as ck
from jq.apps.pipeline import quantized_forward
from jq.models.family import TensorMap
from jq.models.io.gguf import load_gguf
from jq.models.io.gguf_native import NATIVE_TYPES, blocks_to_codes, native_qtensor, row_permutation
from jq.models.io.gguf_write import codes_to_blocks, export_gguf
from jq.models.llama.weights import unpermute_qk
from jq.numbers.qtensor import QTensor
from jq.pallas_kernels import force_interpret
from jq.pallas_kernels.w4a16 import w4a16_matmul
from jq.pallas_kernels.w8a16 import w8a16_matmul
from jq.tree.paths import leaf_paths
from jq.tree.recipe import load_recipe

from jqtest.llama import TOKENS_IN, tiny_cfg, tiny_checkpoint, write_gguf

# bits per weight of each block type: codes + f16 scale (+ f16 offset) per 32
BPW = {Q.Q4_0: 4.5, Q.Q4_1: 5.0, Q.Q5_0: 5.5, Q.Q5_1: 6.0, Q.Q8_0: 8.5}


def _raw(kind: Q, shape: tuple[int, int], seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(the GGUF bytes of a random (R, C) tensor, llama.cpp's own dequantization of them, fp32 (R, C))."""
    w = np.random.default_rng(seed).standard_normal(shape).astype(np.float32) * 0.2
    w[0, :32] = 0.0  # an all-zero block
    raw = quants.quantize(w, kind)
    return raw, quants.dequantize(raw, kind).reshape(shape).astype(np.float32)


@pytest.mark.parametrize("kind", list(NATIVE_TYPES))
@pytest.mark.parametrize("transpose", [True, False])
def test_blocks_read_exactly_as_llama_cpp_dequantizes_them(kind, transpose):
    raw, ref = _raw(kind, (24, 96), seed=int(kind))
    q = native_qtensor(raw, kind, (24, 96), TensorMap("a/kernel", transpose=transpose))
    assert isinstance(q, QTensor) and q.layout.group_size == 32
    want = ref.T if transpose else ref
    assert q.shape == want.shape and q.layout.axes == ((0,) if transpose else (1,))
    np.testing.assert_array_equal(np.asarray(q.dequantize(jnp.float32)), want)
    assert q.bits_per_weight == BPW[kind]
    assert q.zero_min == (kind in (Q.Q4_1, Q.Q5_1)) and q.symmetric == (kind not in (Q.Q4_1, Q.Q5_1))


def _kquant_bytes(kind: Q, rows: int, blocks: int, seed: int) -> np.ndarray:
    """Random K-quant blocks (every bit pattern of codes and sub-scales) with finite f16 super-block scales."""
    size = {Q.Q4_K: 144, Q.Q5_K: 176, Q.Q6_K: 210}[kind]
    raw = np.random.default_rng(seed).integers(0, 256, (rows, blocks, size), dtype=np.uint8)
    d = np.random.default_rng(seed + 1).uniform(1e-4, 0.1, (rows, blocks, 2)).astype(np.float16).view(np.uint8)
    if kind == Q.Q6_K:
        raw[..., 208:210] = d[..., :2]  # d sits at the end of a Q6_K block
    else:
        raw[..., 0:4] = d  # d and dmin at the start
    return raw.reshape(rows, -1)


@pytest.mark.parametrize("kind", [Q.Q4_K, Q.Q5_K, Q.Q6_K])
def test_k_quants_read_exactly_with_float32_sub_block_scales(kind):
    raw = _kquant_bytes(kind, 6, 2, seed=int(kind))
    ref = quants.dequantize(raw, kind).reshape(6, 512).astype(np.float32)
    q = native_qtensor(raw, kind, (6, 512), TensorMap("a/kernel", transpose=True))
    np.testing.assert_array_equal(np.asarray(q.dequantize(jnp.float32)), ref.T)
    bits, g = {Q.Q4_K: (4, 32), Q.Q5_K: (5, 32), Q.Q6_K: (6, 16)}[kind]
    assert q.fmt == f"int{bits}" and q.layout.group_size == g and q.scale.dtype == np.float32
    assert q.zero_min == (kind != Q.Q6_K) and q.bits_per_weight == bits + (64 if q.zero_min else 32) / g


def test_a_row_permuting_convert_moves_whole_rows_and_anything_else_falls_back():
    raw, ref = _raw(Q.Q4_1, (16, 64))
    m = TensorMap("q/kernel", transpose=True, convert=lambda w: unpermute_qk(w, n_heads=2))
    assert sorted(row_permutation(m, 16)) == list(range(16))
    q = native_qtensor(raw, Q.Q4_1, (16, 64), m)
    np.testing.assert_array_equal(np.asarray(q.dequantize()), unpermute_qk(ref, 2).T)
    scaled = TensorMap("q/kernel", transpose=True, convert=lambda w: w * 2)
    assert row_permutation(scaled, 16) is None and native_qtensor(raw, Q.Q4_1, (16, 64), scaled) is None
    assert native_qtensor(raw, Q.IQ4_NL, (16, 64), TensorMap("x")) is None  # no exact layout: the caller dequantizes
    assert native_qtensor(raw, Q.Q4_K, (16, 64), TensorMap("x")) is None  # rows shorter than a super-block


@pytest.mark.parametrize("tie", [True, False])
def test_tiny_model_native_is_the_float_model_at_the_files_bits(tmp_path, tie):
    cfg = tiny_cfg(tie)
    write_gguf(tmp_path / "m.gguf", cfg, tiny_checkpoint(cfg, seed=3))
    f, n = load_gguf(tmp_path / "m.gguf"), load_gguf(tmp_path / "m.gguf", native=True)
    assert f.native is None and n.native["Q4_1"]["as"] == "QTensor" and n.native["F16"]["as"] == "float"
    fl, nl = dict(leaf_paths(f.params)), dict(leaf_paths(n.params))
    assert fl.keys() == nl.keys()
    native = {p for p, v in nl.items() if isinstance(v, QTensor)}
    assert "layers_0/attn/q_proj/kernel" in native and "embed/embedding" in native  # q: rows un-interleaved
    for p in native:
        np.testing.assert_array_equal(np.asarray(nl[p].dequantize()), fl[p], err_msg=p)
    assert nl["layers_1/attn/q_proj/kernel"].bits_per_weight == 5.0
    fwd = quantized_forward(cfg)
    ids = jnp.asarray(TOKENS_IN[None])
    want = np.asarray(fwd(f.params, ids))
    np.testing.assert_allclose(np.asarray(fwd(n.params, ids)), want, rtol=1e-5, atol=1e-5)
    with force_interpret():  # the int4 / int8 kernels on the native blocks
        got = np.asarray(quantized_forward(cfg)(n.params, ids))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", [Q.Q4_1, Q.Q8_0, Q.Q4_0])
def test_kernels_take_native_blocks_offsets_included(kind):
    raw, _ = _raw(kind, (128, 64), seed=5)
    q = native_qtensor(raw, kind, (128, 64), TensorMap("k", transpose=True))  # (64, 128) kernel
    x = jnp.asarray(np.random.default_rng(6).standard_normal((8, 64)), jnp.float32)
    want = np.asarray(x @ q.dequantize())
    scale, zero = q.scale, q.zero
    if kind == Q.Q8_0:
        y = w8a16_matmul(x, q.codes, scale, zero, group_size=32, zero_min=q.zero_min)
    else:
        y = w4a16_matmul(x, q.codes, scale, zero, group_size=32, symmetric=q.symmetric, zero_min=q.zero_min)
    np.testing.assert_allclose(np.asarray(y), want, rtol=1e-5, atol=1e-5)


def test_native_model_checkpoint_round_trip_is_format_3(tmp_path):
    cfg = tiny_cfg(True)
    write_gguf(tmp_path / "m.gguf", cfg, tiny_checkpoint(cfg, seed=4))
    n = load_gguf(tmp_path / "m.gguf", native=True)
    d = ck.save(tmp_path / "ck", n.params)
    assert ck.read_meta(d)["format_version"] == "3.0"
    back, _ = ck.load(d)
    for (p, a), (_, b) in zip(leaf_paths(n.params), leaf_paths(back)):
        if isinstance(a, QTensor):
            assert b.zero_min == a.zero_min and b.describe() == a.describe(), p
            np.testing.assert_array_equal(np.asarray(b.dequantize()), np.asarray(a.dequantize()), err_msg=p)
    plain = ck.save(tmp_path / "plain", {"w": np.ones(3, np.float32)})
    assert ck.read_meta(plain)["format_version"] == ck.FORMAT_VERSION


def test_zero_point_min_grid_quantizes_like_q4_1():
    w = np.random.default_rng(7).standard_normal((64, 16)).astype(np.float32) + 3.0  # a range far from 0
    sch = jq.Scheme(format="int4", symmetric=False, group_size=32, zero_point="min")
    cfg = jq.QuantConfig(rules=[jq.Rule(pattern=".*", scheme=sch)])
    q = jq.quantize_params({"w": {"kernel": w}}, cfg)["w"]["kernel"]
    assert q.zero_min and q.describe() == "int4 asym g32 min" and q.bits_per_weight == 5.0
    codes = np.asarray(q.unpacked_codes()).reshape(2, 32, 16)
    assert codes.min() == 0 and codes.max() == 15  # min and max of each group land on the grid's ends
    lo = w.reshape(2, 32, 16).min(1)
    np.testing.assert_array_equal(np.asarray(q.zero, np.float32), lo.astype(np.float16).astype(np.float32))
    err = np.abs(np.asarray(q.dequantize()) - w).max()
    step = (w.reshape(2, 32, 16).max(1) - lo).max() / 15
    assert err <= step / 2 + 1e-2  # round to nearest (plus the f16 rounding of the offset)
    widened = jq.quantize_params({"w": {"kernel": w}}, jq.QuantConfig(rules=[jq.Rule(
        pattern=".*", scheme=jq.Scheme(format="int4", symmetric=False, group_size=32))]))["w"]["kernel"]
    assert err < np.abs(np.asarray(widened.dequantize()) - w).max()  # code-unit zeros must widen the range to 0


# ------------------------------------------------------------------------------------------------------ export


def test_codes_to_blocks_inverts_the_reader_byte_for_byte():
    for kind in NATIVE_TYPES:
        raw, _ = _raw(kind, (8, 64), seed=11)
        assert np.array_equal(codes_to_blocks(*blocks_to_codes(raw, kind), kind), raw), kind.name


@pytest.mark.parametrize("tie", [True, False])
def test_export_of_a_native_model_is_the_file_it_came_from(tmp_path, tie):
    cfg = tiny_cfg(tie)
    src = tmp_path / "m.gguf"
    write_gguf(src, cfg, tiny_checkpoint(cfg, seed=8))
    n = load_gguf(src, native=True)
    report = export_gguf(n.params, n.cfg, n.family, src, tmp_path / "out.gguf")
    assert all(r["exact"] for r in report)
    a, b = GGUFReader(str(src)), GGUFReader(str(tmp_path / "out.gguf"))
    assert [t.name for t in a.tensors] == [t.name for t in b.tensors]
    for ta, tb in zip(a.tensors, b.tensors):
        want = ta.tensor_type if ta.tensor_type not in (Q.F16, Q.BF16) else Q.F32  # float leaves are written F32
        assert tb.tensor_type == want, ta.name
        if ta.tensor_type in NATIVE_TYPES:
            assert np.array_equal(np.asarray(ta.data), np.asarray(tb.data)), ta.name
    back = load_gguf(tmp_path / "out.gguf", native=True)
    assert back.tokenizer.encode("the cat") == n.tokenizer.encode("the cat")
    for (p, x), (_, y) in zip(leaf_paths(n.params), leaf_paths(back.params)):
        x = x.dequantize() if isinstance(x, QTensor) else x
        y = y.dequantize() if isinstance(y, QTensor) else y
        np.testing.assert_array_equal(np.asarray(y), np.asarray(x), err_msg=p)


def test_export_of_other_grids_names_the_nearest_type_and_refuses_what_gguf_cannot_hold(tmp_path):
    cfg = tiny_cfg(True)
    src = tmp_path / "m.gguf"
    write_gguf(src, cfg, tiny_checkpoint(cfg, seed=9))
    f = load_gguf(src)
    q = jq.quantize_params(f.params, load_recipe("rtn_w4_g128_pad"))
    report = {r["path"]: r for r in export_gguf(q, f.cfg, f.family, src, tmp_path / "o.gguf")}
    r = report["layers_0/mlp/up_proj/kernel"]
    assert not r["exact"] and r["gguf"] == "Q4_1" and "re-quantized" in r["note"]
    assert report["final_norm/scale"]["exact"]
    rot = jq.quantize_params(f.params, jq.QuantConfig(rules=[jq.Rule(pattern=".*mlp.*kernel", scheme=jq.Scheme(
        format="int8", rotate="hadamard"))]))
    with pytest.raises(ValueError, match=r"layers_0/mlp/\w+_proj/kernel.*online rotation"):
        export_gguf(rot, f.cfg, f.family, src, tmp_path / "r.gguf")
    assert not (tmp_path / "r.gguf").exists() and not list(tmp_path.glob(".r.gguf*"))  # nothing half-written


@pytest.mark.parametrize("name, kind", [("gguf_q4_0", "Q4_0"), ("gguf_q8_0", "Q8_0"), ("gguf_q4_1", "Q4_1"),
                                        ("gguf_q5_1", "Q5_1")])
def test_the_gguf_grid_recipes_export_exactly(tmp_path, name, kind):
    cfg = tiny_cfg(True)
    src = tmp_path / "m.gguf"
    write_gguf(src, cfg, tiny_checkpoint(cfg, seed=10))
    f = load_gguf(src)
    q = jq.quantize_params(f.params, load_recipe(name))
    rows = [r for r in export_gguf(q, f.cfg, f.family, src, tmp_path / "o.gguf") if r["path"].endswith("kernel")]
    assert rows and all(r["exact"] and r["gguf"] == kind for r in rows)
    back = load_gguf(tmp_path / "o.gguf", native=True)
    for p, x in leaf_paths(q):
        if isinstance(x, QTensor):
            y = dict(leaf_paths(back.params))[p]
            np.testing.assert_array_equal(np.asarray(y.dequantize()), np.asarray(x.dequantize()), err_msg=p)


def test_export_refuses_adapters_and_a_model_that_is_not_the_sources(tmp_path):
    from jq.numbers.lowrank import LowRank

    cfg = tiny_cfg(True)
    src = tmp_path / "m.gguf"
    write_gguf(src, cfg, tiny_checkpoint(cfg, seed=13))
    f = load_gguf(src)
    w = f.params["layers_0"]["mlp"]["up_proj"]["kernel"]
    lr = {**f.params, "layers_0": {**f.params["layers_0"], "mlp": {**f.params["layers_0"]["mlp"], "up_proj": {
        "kernel": LowRank(w, np.zeros((w.shape[0], 2), np.float32), np.zeros((2, w.shape[1]), np.float32))}}}}
    with pytest.raises(ValueError, match=r"layers_0/mlp/up_proj/kernel: a LowRank leaf .* merge it first"):
        export_gguf(lr, f.cfg, f.family, src, tmp_path / "a.gguf")
    from jq.algorithms.rtn import rtn
    from jq.numbers import sparse
    from jq.numbers.scheme import Scheme

    s = Scheme("int4", group_size=32)
    q = rtn(jnp.asarray(w), s, s.layout(w.shape, (0,)))
    q = sparse.with_sparse(q, jnp.asarray(w), sparse.top_positions(jnp.abs(jnp.asarray(w)), 4))
    ds = {**f.params, "layers_0": {**f.params["layers_0"], "mlp": {**f.params["layers_0"]["mlp"], "up_proj": {
        "kernel": q}}}}
    with pytest.raises(ValueError, match=r"layers_0/mlp/up_proj/kernel: .* carries float16 outliers beside its codes "
                                         r"\(dense-and-sparse\).*quantize without `outliers`"):
        export_gguf(ds, f.cfg, f.family, src, tmp_path / "s.gguf")
    from jq.models.io.hfq.common import unsigned_view

    with pytest.raises(ValueError, match=r"a/kernel.*dense-and-sparse weight .* cannot be stored in gptq.*quantize "
                                         r"without `outliers`"):
        unsigned_view(q, "a/kernel", "gptq", (4, 8))
    import dataclasses

    with pytest.raises(ValueError, match=r"config differs from the one of .*m\.gguf"):
        export_gguf(f.params, dataclasses.replace(f.cfg, norm_eps=1e-3), f.family, src, tmp_path / "b.gguf")
    assert [p.name for p in tmp_path.iterdir()] == ["m.gguf"]  # only the source: nothing half-written
