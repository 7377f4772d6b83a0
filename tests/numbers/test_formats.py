"""jq.numbers.formats: exact sub-byte packing against a Python-integer bit-stream reference, format tables against the
published values, and rounding (int / fp8 / codebook) against NumPy and ml_dtypes."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from jq.numbers import formats
from jqtest.npref import FP4_E2M1, FP8_MAX, NF4_QLORA, np_fp8_saturating, np_nearest_index, np_pack, sign_extend

# ------------------------------------------------------------------------------------------------------ packing

# dims from a few buckets so eager jnp ops compile a bounded number of shapes
DIMS = st.sampled_from([1, 3, 8, 13, 16])


@st.composite
def packing_case(draw):
    bits = draw(st.integers(1, 8))
    shape = tuple(draw(st.lists(DIMS, min_size=1, max_size=3)))
    axis = draw(st.integers(-len(shape), len(shape) - 1))
    dtype = draw(st.sampled_from([np.uint8, np.int8, np.int32]))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    info = np.iinfo(dtype)
    codes = rng.integers(max(info.min, -1000), min(info.max, 1000), size=shape, endpoint=True).astype(dtype)
    return bits, codes, axis


@functools.partial(jax.jit, static_argnums=(1, 2))
def _pack_round_trip(codes, bits, axis):
    """pack, unpack and signed unpack in one compiled function (one compile per shape / bits / axis)."""
    packed = formats.pack(codes, bits, axis=axis)
    n = codes.shape[axis]
    return packed, formats.unpack(packed, bits, n, axis=axis), formats.unpack(packed, bits, n, axis=axis, signed=True)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(packing_case())
def test_pack_matches_bitstream_reference_and_round_trips(case):
    bits, codes, axis = case
    n = codes.shape[axis]
    packed, un, sg = _pack_round_trip(jnp.asarray(codes), bits, axis)
    assert packed.dtype == jnp.uint8
    expect_shape = list(codes.shape)
    expect_shape[axis] = formats.packed_length(n, bits)
    assert packed.shape == tuple(expect_shape)
    np.testing.assert_array_equal(np.asarray(packed), np_pack(codes, bits, axis))

    mask = (1 << bits) - 1
    assert un.dtype == jnp.uint8 and un.shape == codes.shape
    np.testing.assert_array_equal(np.asarray(un), codes.astype(np.int64) & mask)
    assert sg.dtype == jnp.int8 and sg.shape == codes.shape
    np.testing.assert_array_equal(np.asarray(sg), sign_extend(codes, bits))


def test_pack_eager_equals_reference():
    """The un-jitted path too (one shape, a non-multiple of 8 along a middle axis)."""
    codes = np.random.default_rng(0).integers(-128, 128, size=(2, 11, 3)).astype(np.int8)
    for bits in (3, 4):
        packed = formats.pack(jnp.asarray(codes), bits, axis=1)
        np.testing.assert_array_equal(np.asarray(packed), np_pack(codes, bits, 1))
        out = formats.unpack(packed, bits, 11, axis=1, signed=True)
        np.testing.assert_array_equal(np.asarray(out), sign_extend(codes, bits))


@pytest.mark.parametrize("bits", range(1, 9))
def test_signed_codes_round_trip_exactly(bits):
    """Every two's-complement code of `bits` bits survives pack → unpack(signed=True) unchanged."""
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    codes = np.arange(lo, hi + 1, dtype=np.int8)
    codes = np.stack([codes, codes[::-1]])  # (2, 2^bits)
    _, _, out = _pack_round_trip(jnp.asarray(codes), bits, 1)
    np.testing.assert_array_equal(np.asarray(out), codes)


def test_pack_layout_hand_examples():
    # 4 bits: two per byte, low nibble first
    assert np.asarray(formats.pack(jnp.array([0x1, 0x2, 0xF, 0x0], jnp.uint8), 4)).tolist() == [0x21, 0x0F, 0, 0]
    # 3 bits: 8 codes → 3 bytes of one little-endian bit stream
    stream = sum(c << (3 * i) for i, c in enumerate([5, 1, 7, 0, 2, 6, 3, 4]))
    got = np.asarray(formats.pack(jnp.array([5, 1, 7, 0, 2, 6, 3, 4], jnp.uint8), 3)).tolist()
    assert got == list(stream.to_bytes(3, "little"))
    # 2 bits, along axis 0
    got = np.asarray(formats.pack(jnp.array([[1], [2], [3], [0]], jnp.uint8), 2, axis=0))
    assert got[:, 0].tolist() == [0b00_11_10_01, 0]


@pytest.mark.parametrize(
    "n,bits,expected",
    [(8, 4, 4), (9, 4, 8), (1, 1, 1), (16, 1, 2), (8, 3, 3), (24, 3, 9), (25, 3, 12), (7, 2, 2), (256, 4, 128),
     (5, 8, 5), (128, 8, 128), (1, 7, 7)],
)
def test_packed_length(n, bits, expected):
    assert formats.packed_length(n, bits) == expected


def test_pack_unpack_errors():
    with pytest.raises(ValueError, match=r"bits must be in 1\.\.8.*got 9"):
        formats.pack(jnp.zeros(8, jnp.uint8), 9)
    with pytest.raises(ValueError, match=r"bits must be in 1\.\.8.*got 0"):
        formats.pack(jnp.zeros(8, jnp.uint8), 0)
    with pytest.raises(ValueError, match=r"packed axis has 4 bytes; 16 codes of 4 bits need 8"):
        formats.unpack(jnp.zeros(4, jnp.uint8), 4, 16)


# ------------------------------------------------------------------------------------------------------- tables


def test_nf4_table_equals_qlora():
    t = np.asarray(formats.get_format("nf4").table, np.float64)
    assert t.shape == (16,)
    np.testing.assert_allclose(t, NF4_QLORA, atol=1e-4, rtol=0)
    assert t[7] == 0.0 and t[0] == -1.0 and t[-1] == 1.0
    assert np.all(np.diff(t) > 0)


def test_fp4_e2m1_table():
    f = formats.get_format("fp4_e2m1")
    t = np.asarray(f.table, np.float32)
    assert set(t.tolist()) == {0.0, 0.5, -0.5, 1.0, -1.0, 1.5, -1.5, 2.0, -2.0, 3.0, -3.0, 4.0, -4.0, 6.0, -6.0}
    np.testing.assert_array_equal(t, FP4_E2M1)  # code = e2m1 bit pattern
    assert np.signbit(t[8])  # 0b1000 is −0


@pytest.mark.parametrize(
    "name,bits,fmax",
    [("int2", 2, 1), ("int3", 3, 3), ("int4", 4, 7), ("int8", 8, 127), ("fp8_e4m3", 8, 448.0),
     ("fp8_e5m2", 8, 57344.0), ("fp4_e2m1", 4, 6.0), ("nf4", 4, 1.0)],
)
def test_format_bits_and_max(name, bits, fmax):
    f = formats.get_format(name)
    assert f.bits == bits and f.max == fmax
    assert f.packs == (bits < 8)


def test_format_values():
    np.testing.assert_array_equal(formats.get_format("int4").values(), np.arange(-8, 8))
    np.testing.assert_array_equal(formats.get_format("int4").values(restricted=True), np.arange(-7, 8))
    np.testing.assert_array_equal(formats.get_format("int3").values(symmetric=False), np.arange(0, 8))
    e4 = formats.get_format("fp8_e4m3").values()
    assert len(e4) == 253 and e4.max() == 448.0 and e4.min() == -448.0  # 256 − 2 NaN − duplicate zero
    e5 = formats.get_format("fp8_e5m2").values()
    assert len(e5) == 247 and e5.max() == 57344.0  # 256 − 2 inf − 6 NaN − duplicate zero
    assert len(formats.get_format("fp4_e2m1").values()) == 15


def test_get_format_unknown_lists_names():
    with pytest.raises(ValueError, match=r"unknown format 'int9'; choose one of \[.*'fp4_e2m1'.*'int4'.*'nf4'.*\]"):
        formats.get_format("int9")


# ----------------------------------------------------------------------------------------------------- rounding


@pytest.mark.parametrize("bits", range(2, 9))
def test_int_encode_clipping_ranges(bits):
    f = formats.get_format(f"int{bits}")
    h = 2 ** (bits - 1)
    assert f.int_range(True) == (-h, h - 1)
    assert f.int_range(True, restricted=True) == (-(h - 1), h - 1)
    assert f.int_range(False) == (0, 2 * h - 1)
    y = np.arange(-300, 300, 0.25, dtype=np.float32)
    for sym, restr, (lo, hi), dt in [
        (True, False, (-h, h - 1), np.int8),
        (True, True, (-(h - 1), h - 1), np.int8),
        (False, False, (0, 2 * h - 1), np.uint8),
    ]:
        c = f.encode(jnp.asarray(y), symmetric=sym, restricted=restr)
        assert c.dtype == dt
        np.testing.assert_array_equal(np.asarray(c).astype(np.int64), np.clip(np.round(y), lo, hi))  # half-even


def test_int_range_of_non_int_format_raises():
    with pytest.raises(ValueError, match=r"format 'nf4' is not an integer format"):
        formats.get_format("nf4").int_range(True)


def _far_from_ties(y, table, eps=1e-4):
    d = np.sort(np.abs(np.asarray(y, np.float64)[:, None] - np.unique(np.asarray(table, np.float64))), axis=1)
    return (d[:, 1] - d[:, 0]) > eps


@pytest.mark.parametrize("name", ["nf4", "fp4_e2m1"])
def test_codebook_encode_dense_grid_is_nearest(name):
    f = formats.get_format(name)
    table = np.asarray(f.table, np.float32)
    y = np.linspace(-1.3 * f.max, 1.3 * f.max, 20011).astype(np.float32)
    y = y[_far_from_ties(y, table)]
    codes = np.asarray(f.encode(jnp.asarray(y)))
    assert codes.min() >= 0 and codes.max() < 16
    np.testing.assert_array_equal(table[codes], table[np_nearest_index(y, table)])
    np.testing.assert_array_equal(np.asarray(f.decode(jnp.asarray(codes))), table[codes])


@settings(max_examples=40, deadline=None)
@given(
    name=st.sampled_from(["nf4", "fp4_e2m1"]),
    y=hnp.arrays(np.float32, (64,), elements=st.floats(-10, 10, width=32)),
)
def test_codebook_encode_is_nearest(name, y):
    f = formats.get_format(name)
    table = np.asarray(f.table, np.float32)
    keep = _far_from_ties(y, table)
    codes = np.asarray(f.encode(jnp.asarray(y)))
    np.testing.assert_array_equal(table[codes][keep], table[np_nearest_index(y, table)][keep])


@settings(max_examples=40, deadline=None)
@given(
    name=st.sampled_from(["fp8_e4m3", "fp8_e5m2"]),
    y=hnp.arrays(np.float32, (64,), elements=st.floats(width=32, allow_nan=False, allow_infinity=True)),
)
def test_fp8_encode_equals_saturating_ml_dtypes_cast(name, y):
    f = formats.get_format(name)
    c = f.encode(jnp.asarray(y))
    assert c.dtype == f.dtype
    np.testing.assert_array_equal(np.asarray(c).astype(np.float32), np_fp8_saturating(y, name))


@pytest.mark.parametrize("name", ["fp8_e4m3", "fp8_e5m2"])
def test_fp8_encode_round_to_nearest_even_at_midpoints(name):
    """Exact midpoints between neighbouring fp8 values and their f32 neighbours: catches double rounding."""
    f = formats.get_format(name)
    dt = f.dtype
    v = np.arange(256, dtype=np.uint8).view(dt).astype(np.float64)
    v = np.unique(v[np.isfinite(v)])
    mids = ((v[1:] + v[:-1]) / 2).astype(np.float32)
    y = np.concatenate([mids, np.nextafter(mids, np.float32(np.inf)), np.nextafter(mids, np.float32(-np.inf)),
                        np.float32([FP8_MAX[name] * 1.03, -FP8_MAX[name] * 1.03, 1e30, -1e30])])
    got = np.asarray(f.encode(jnp.asarray(y))).astype(np.float32)
    np.testing.assert_array_equal(got, np_fp8_saturating(y, name))
    assert np.isfinite(got).all()


def test_fp8_decode_is_the_value():
    f = formats.get_format("fp8_e4m3")
    raw = np.arange(0, 126, dtype=np.uint8)  # positive finite bit patterns
    codes = raw.view(ml_dtypes.float8_e4m3fn)
    np.testing.assert_array_equal(np.asarray(f.decode(jnp.asarray(codes))), codes.astype(np.float32))
