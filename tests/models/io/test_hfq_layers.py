"""One layer of GPTQ / AWQ / compressed-tensors ↔ jq QTensor: import equals the NumPy reference dequantization bit
for bit, export(import(x)) gives back the stored bytes, pack / unpack round trips (hypothesis), and every bad
input or unstorable QTensor is refused naming the tensor and the fix."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jq.models.io.hfq import awq, compressed, gptq
from jq.models.io.hfq.common import pack_words, perm_from_g_idx, unpack_words
from jq.numbers import formats
from jq.numbers.qtensor import ExecPolicy
from jqtest.hfq import BF16, awq_layer, ct_layer, gptq_layer


def same_bytes(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        x, y = np.asarray(a[k]), np.asarray(b[k])
        assert (x.dtype, x.shape) == (y.dtype, y.shape), k
        assert np.ascontiguousarray(x).tobytes() == np.ascontiguousarray(y).tobytes(), k


def dense(q) -> np.ndarray:
    return np.asarray(q.dequantize(np.float32))


GPTQ_CASES = [  # bits, group_size, sym, act_order, checkpoint format
    (4, 16, True, False, "gptq"), (4, 16, False, True, "gptq"), (4, -1, False, False, "gptq_v2"),
    (2, 32, False, True, "gptq_v2"), (3, 32, True, True, "gptq"), (3, 16, False, False, "gptq_v2"),
    (8, 16, True, False, "gptq"), (8, 32, False, True, "gptq"),
]


@pytest.mark.parametrize("bits,gs,sym,act,fmt", GPTQ_CASES)
def test_gptq_import_is_the_reference_and_export_gives_the_bytes_back(bits, gs, sym, act, fmt):
    t, ref = gptq_layer(np.random.default_rng(bits), 64, 96, bits=bits, group_size=gs, sym=sym, act_order=act,
                        fmt=fmt)
    q = gptq.to_qtensor(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], bits=bits, group_size=gs, sym=sym,
                        desc_act=act, checkpoint_format=fmt, name="l")
    assert np.array_equal(dense(q), ref)
    assert q.fmt == f"int{bits}" and q.symmetric == sym and (q.zero is None) == sym
    assert (q.perm is not None) == act and q.layout.granularity == ("channel" if gs == -1 else "group")
    back, scheme = gptq.from_qtensor(q, checkpoint_format=fmt)
    same_bytes(back, t)
    assert scheme == {"bits": bits, "group_size": gs, "sym": sym, "desc_act": act}


@pytest.mark.parametrize("gs", [16, -1])
def test_awq_import_is_the_reference_and_export_gives_the_bytes_back(gs):
    t, ref = awq_layer(np.random.default_rng(1), 64, 48, group_size=64 if gs == -1 else gs)
    q = awq.to_qtensor(t["qweight"], t["qzeros"], t["scales"], group_size=gs, name="l")
    assert np.array_equal(dense(q), ref) and not q.symmetric and q.perm is None
    back, scheme = awq.from_qtensor(q)
    same_bytes(back, t)
    assert scheme == {"bits": 4, "group_size": gs}


CT_CASES = [  # bits, group_size (None: channel), sym, act order, scale dtype, K
    (4, 16, True, False, np.float16, 64), (4, 16, False, True, BF16, 64), (8, None, True, False, np.float32, 64),
    (8, 16, False, False, np.float16, 48), (4, None, False, False, np.float16, 36), (4, 12, True, True, BF16, 36),
]


@pytest.mark.parametrize("bits,gs,sym,act,sdt,k", CT_CASES)
def test_compressed_import_is_the_reference_and_export_gives_the_bytes_back(bits, gs, sym, act, sdt, k):
    t, ref = ct_layer(np.random.default_rng(bits + k), k, 20, bits=bits, group_size=gs, sym=sym, act_order=act,
                      scale_dtype=sdt)
    q = compressed.to_qtensor(t["weight_packed"], t["weight_scale"], t["weight_shape"], t.get("weight_zero_point"),
                              t.get("weight_g_idx"), num_bits=bits, group_size=gs, symmetric=sym, name="l")
    assert np.array_equal(dense(q), ref) and q.symmetric == sym and q.shape == (k, 20)
    back, scheme = compressed.from_qtensor(q)
    same_bytes(back, t)
    assert scheme["strategy"] == ("channel" if gs is None else "group")
    assert scheme["actorder"] == ("group" if act else None)


def test_legacy_unpacked_zero_points_read_the_same():
    t, ref = ct_layer(np.random.default_rng(5), 32, 16, bits=4, group_size=16, sym=False)
    zp = unpack_words(t["weight_zero_point"], 4, 16, axis=0).astype(np.int16) - 8
    q = compressed.to_qtensor(t["weight_packed"], t["weight_scale"], t["weight_shape"], zp.astype(np.int8),
                              num_bits=4, group_size=16, symmetric=False)
    assert np.array_equal(dense(q), ref)


# ------------------------------------------------------------------------------------------ property tests


@settings(max_examples=20, deadline=None)
@given(st.sampled_from([2, 3, 4, 8]), st.integers(1, 70), st.integers(1, 3), st.integers(0, 2**32 - 1))
def test_bit_streams_round_trip_and_match_jq_packing(bits, n, cols, seed):
    codes = np.random.default_rng(seed).integers(0, 1 << bits, (n, cols)).astype(np.uint8)
    words = pack_words(codes, bits, axis=0)
    assert words.dtype == np.int32
    assert words.shape[0] == (-(-n // 32) * 3 if bits == 3 else -(-n * bits // 32))
    assert np.array_equal(unpack_words(words, bits, n, axis=0), codes)
    assert np.array_equal(unpack_words(pack_words(codes.T, bits, axis=1), bits, n, axis=1), codes.T)
    jq_bytes = np.asarray(formats.pack(codes, bits, axis=0))  # the same little-endian stream, cut into bytes
    stream = np.ascontiguousarray(words.T).view(np.uint8).T
    assert np.array_equal(stream[: jq_bytes.shape[0]], jq_bytes)


@settings(max_examples=25, deadline=None)
@given(st.sampled_from([(2, 32), (3, 32), (4, 16), (8, 8)]), st.booleans(), st.booleans(), st.integers(0, 2**32 - 1))
def test_gptq_layers_round_trip(bits_gs, sym, act, seed):
    bits, gs = bits_gs
    t, ref = gptq_layer(np.random.default_rng(seed), 64, 32, bits=bits, group_size=gs, sym=sym, act_order=act,
                        fmt="gptq_v2")
    q = gptq.to_qtensor(*(t[k] for k in gptq.TENSORS), bits=bits, group_size=gs, sym=sym, desc_act=True,
                        checkpoint_format="gptq_v2")
    assert np.array_equal(dense(q), ref)
    same_bytes(gptq.from_qtensor(q, checkpoint_format="gptq_v2")[0], t)
    if bits in compressed.BITS:  # the same layer through another format holds the same numbers
        again = compressed.to_qtensor(**compressed.from_qtensor(q)[0], num_bits=bits, group_size=gs, symmetric=sym)
        assert np.array_equal(dense(again), ref)


# ---------------------------------------------------------------------------------------------- bad input


def test_bits_that_disagree_with_the_tensors_are_named():
    t, _ = gptq_layer(np.random.default_rng(0), 64, 32, bits=4, group_size=16)
    with pytest.raises(ValueError, match=r"l\.scales: shape \(4, 32\), expected \(8, 32\).*fix bits"):
        gptq.to_qtensor(t["qweight"], t["qzeros"], t["scales"], bits=2, group_size=16, name="l")
    with pytest.raises(ValueError, match=r"l\.qzeros: shape \(4, 4\), expected \(2, 4\)"):
        gptq.to_qtensor(t["qweight"], t["qzeros"], t["scales"][:2], bits=4, group_size=32, name="l")


def test_g_idx_must_be_a_permutation_of_whole_groups():
    t, _ = gptq_layer(np.random.default_rng(0), 64, 32, bits=4, group_size=16, act_order=True)
    bad = t["g_idx"].copy()
    bad[3] = 9
    with pytest.raises(ValueError, match=r"l\.g_idx: g_idx is not a permutation of groups: row \[3\] has group "
                                         r"\[9\], outside 0 \.\. 3"):
        gptq.to_qtensor(t["qweight"], t["qzeros"], t["scales"], bad, bits=4, group_size=16, desc_act=True, name="l")
    uneven = np.sort(t["g_idx"])
    uneven[16] = 0
    with pytest.raises(ValueError, match="not group-consistent: group 0 has 17 rows, expected 16"):
        perm_from_g_idx(uneven, 64, 16, "l.g_idx")
    with pytest.raises(ValueError, match="act-order permutation but desc_act is false"):
        gptq.to_qtensor(*(t[k] for k in gptq.TENSORS), bits=4, group_size=16, desc_act=False, name="l")


def test_v1_zero_points_of_all_ones_are_refused():
    t, _ = gptq_layer(np.random.default_rng(0), 32, 32, bits=4, group_size=16)
    t["qzeros"][0, 0] = -1  # every nibble 0xF: zero point 16 in the v1 convention
    with pytest.raises(ValueError, match=r"l\.qzeros: holds 15 \(all ones\).*gptq_v2"):
        gptq.to_qtensor(*(t[k] for k in gptq.TENSORS), bits=4, group_size=16, name="l")


def test_missing_asymmetric_zero_point_and_wrong_shape_are_named():
    t, _ = ct_layer(np.random.default_rng(0), 32, 16, sym=False)
    with pytest.raises(ValueError, match=r"l\.weight_zero_point: is missing for an asymmetric scheme"):
        compressed.to_qtensor(t["weight_packed"], t["weight_scale"], t["weight_shape"], num_bits=4, group_size=16,
                              symmetric=False, name="l")
    with pytest.raises(ValueError, match=r"l\.weight_packed: shape \(16, 4\) dtype int32, expected int32 \(16, 8\)"):
        compressed.to_qtensor(t["weight_packed"], t["weight_scale"], t["weight_shape"], num_bits=8, group_size=16,
                              symmetric=False, name="l")


def test_configs_jq_cannot_read_are_named():
    with pytest.raises(ValueError, match=r"cfg: unknown AWQ version 'gemv'.*gemm"):
        awq.read_config({"quant_method": "awq", "bits": 4, "group_size": 128, "version": "gemv"}, "cfg")
    with pytest.raises(ValueError, match=r"cfg: quantization_config checkpoint_format 'marlin'"):
        gptq.read_config({"bits": 4, "group_size": 128, "checkpoint_format": "marlin"}, "cfg")
    with pytest.raises(ValueError, match=r"cfg config group 'g': quantizes activations"):
        compressed.read_config({"format": "pack-quantized", "config_groups": {"g": {
            "targets": ["Linear"], "weights": {"num_bits": 8, "strategy": "channel"},
            "input_activations": {"num_bits": 8}}}}, "cfg")


def _q(**kw):
    t, _ = gptq_layer(np.random.default_rng(0), 64, 32, bits=4, group_size=16, **kw)
    return gptq.to_qtensor(*(t[k] for k in gptq.TENSORS), bits=4, group_size=16, desc_act=True, name="l")


@pytest.mark.parametrize("change,to,act,match", [
    (lambda q: dataclasses.replace(q, policy=ExecPolicy(rotation="hadamard")), "gptq", True, "stored rotated"),
    (lambda q: dataclasses.replace(q, policy=ExecPolicy(act="int8")), "compressed", False, "activation quantization"),
    (lambda q: dataclasses.replace(q, fmt="nf4"), "gptq", False, "format nf4 cannot be stored in GPTQ"),
    (lambda q: dataclasses.replace(q, zero=np.asarray(q.zero, np.float16)), "gptq", False, "float zero points"),
    (lambda q: dataclasses.replace(q, scale=np.asarray(q.scale, np.float32)), "awq", False, "scales are float32"),
    (lambda q: q, "awq", True, "act-order permutation, and AWQ has no g_idx"),
    (lambda q: dataclasses.replace(q, zero_min=True), "gptq", False, "offsets in weight units"),
    (lambda q: dataclasses.replace(q, outer_scale=np.float32(2)), "compressed", False, "outer scale"),
])
def test_what_a_format_cannot_hold_is_refused(change, to, act, match):
    q = change(_q(act_order=act))
    write = {"gptq": gptq.from_qtensor, "awq": awq.from_qtensor, "compressed": compressed.from_qtensor}[to]
    with pytest.raises(ValueError, match=match):
        write(q, name="layers_0/mlp/up_proj/kernel")


def test_v1_cannot_store_zero_point_zero_but_v2_can():
    t, ref = gptq_layer(np.random.default_rng(3), 32, 32, bits=4, group_size=16, fmt="gptq_v2")
    t["qzeros"][:] = 0
    q = gptq.to_qtensor(*(t[k] for k in gptq.TENSORS), bits=4, group_size=16, checkpoint_format="gptq_v2")
    with pytest.raises(ValueError, match=r"k: has zero point 0.*export as checkpoint_format gptq_v2"):
        gptq.from_qtensor(q, checkpoint_format="gptq", name="k")
    same_bytes(gptq.from_qtensor(q, checkpoint_format="gptq_v2")[0], t)
