"""Tests of the plain-NumPy reference implementations (`jqtest.npref`) the other tests compare jq with: the
references are checked themselves on hand-computed cases (so a wrong reference cannot make a wrong implementation
look right). Nothing here calls jq: the references are written from the conventions documented in
jq/numbers/grid.py, jq/numbers/qtensor.py and jq/numbers/formats.py."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from jqtest.npref import (SCALE_DTYPES, np_pack, sign_extend, np_nearest_index, np_fp8_saturating, np_scale_zero, np_encode, np_rtn)


def test_np_pack_hand_cases():
    # 4 bits: two per byte, low nibble first
    assert np_pack(np.array([1, 2, 3, 4, 5, 6, 7, 8]), 4).tolist() == [0x21, 0x43, 0x65, 0x87]
    # 3 bits: codes 0..7 → one 24-bit little-endian stream
    val = sum(i << (3 * i) for i in range(8))
    assert val == 0b111_110_101_100_011_010_001_000
    assert np_pack(np.arange(8), 3).tolist() == [val & 0xFF, (val >> 8) & 0xFF, val >> 16]
    # 2 bits: four per byte, first code lowest; 5 codes pad to 8 → 2 bytes
    assert np_pack(np.array([3, 0, 1, 2, 1]), 2).tolist() == [0b10_01_00_11, 0b01]
    # 1 bit: a bitmap
    assert np_pack(np.array([1, 0, 1, 1, 0, 0, 0, 1, 1]), 1).tolist() == [0b10001101, 1]
    # 8 bits: identity
    assert np_pack(np.array([255, 0, 7]), 8).tolist() == [255, 0, 7]


def test_sign_extend_hand_cases():
    assert sign_extend(np.array([0, 1, 7, 8, 15]), 4).tolist() == [0, 1, 7, -8, -1]
    assert sign_extend(np.array([0, 1]), 1).tolist() == [0, -1]


def test_near_tie_marks_only_boundaries():
    codes, near = np_encode(np.array([0.5, 0.5000001, 0.7, 2.5, -1.5, 3.0], np.float32), np.float32(1.0), None, "int4")
    assert codes.tolist() == [0, 1, 1, 2, -2, 3]
    assert near.tolist() == [True, True, False, True, True, False]


def test_nearest_index_hand_cases():
    t = np.array([-1.0, 0.0, 0.5, 2.0])
    assert np_nearest_index(np.array([-0.6, -0.4, 0.3, 1.2, 1.3, 9.0]), t).tolist() == [0, 1, 2, 2, 3, 3]


def test_fp8_saturating_hand_cases():
    y = np.array([1e6, -1e6, 449.0, 470.0, 0.3, 1e-9], np.float32)
    out = np_fp8_saturating(y, "fp8_e4m3")
    assert out[:4].tolist() == [448.0, -448.0, 448.0, 448.0]
    assert out[4] == np.float32(0.3).astype(ml_dtypes.float8_e4m3fn).astype(np.float32)
    assert out[5] == 0.0
    assert np_fp8_saturating(np.array([1e9], np.float32), "fp8_e5m2")[0] == 57344.0


def test_np_rtn_hand_case_int4_sym():
    # absmax 7.5 → scale exactly 1 (f16 representable); codes = round-half-even, clipped to -8..7
    w = np.array([[7.5, -7.5], [2.5, 0.4], [-3.5, 1.0]], np.float32)
    r = np_rtn(w, "int4", scale_dtype="float32")
    assert r["scale"].tolist() == [[1.0, 1.0]]
    assert r["codes"].tolist() == [[7, -8], [2, 0], [-4, 1]]  # 7.5 → 8 → clipped to 7; −7.5 → −8 (half-even)
    assert r["deq"].tolist() == [[7, -8], [2, 0], [-4, 1]]


def test_np_rtn_hand_case_int2_asym_groups():
    # group [0, 3] (range 0..3): scale 1, zero 0; group [-1, 2] (range -1..2): scale 1, zero 1
    w = np.array([[0.0], [3.0], [-1.0], [2.0]], np.float32)
    r = np_rtn(w, "int2", symmetric=False, group_size=2, scale_dtype="float32")
    assert r["scale"].ravel().tolist() == [1.0, 1.0]
    assert r["zero"].ravel().tolist() == [0.0, 1.0]
    assert r["codes"].ravel().tolist() == [0, 3, 0, 3]
    np.testing.assert_array_equal(r["deq"], w)


@pytest.mark.parametrize("sdt", ["float16", "bfloat16"])
def test_np_scale_rounding_hand_case(sdt):
    s, _ = np_scale_zero(np.float32(-1.0), np.float32(1.0), "int8", scale_dtype=sdt)  # 1/127.5
    assert s == np.float32(1 / 127.5).astype(SCALE_DTYPES[sdt]).astype(np.float32)
    assert s != np.float32(1 / 127.5)
