"""Microscaling presets (OCP MX v1.0, NVFP4): codes and scales bit-exact against NumPy references written here from
the specs (ml_dtypes casts for the element rounding), the element formats' tables and bit patterns, 6-bit packing,
the spec's edge cases, honest bits per weight and clear refusals."""

from __future__ import annotations

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import jq
from jq.numbers import formats, mx
from jq.numbers.scheme import Scheme
from jq.tree.recipe import QuantConfig

# element format → (ml_dtypes type, emax of the spec's Table: exponent of the largest normal)
ELEMENTS = {"mxfp4": (ml_dtypes.float4_e2m1fn, 2), "mxfp6_e2m3": (ml_dtypes.float6_e2m3fn, 2),
            "mxfp6_e3m2": (ml_dtypes.float6_e3m2fn, 4), "mxfp8_e4m3": (ml_dtypes.float8_e4m3fn, 8),
            "mxfp8_e5m2": (ml_dtypes.float8_e5m2, 15)}


def ref_mx(x: np.ndarray, fmt: str, ceil: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """OCP MX v1.0 §6.3 on x [K, N], blocks of 32 along K: (element bit patterns / int8 codes [K, N], e8m0 scale
    bits [K/32, N]). Shared exponent floor(log2 amax) − emax, clamped at −126 (the implementation's documented
    floor: XLA flushes the f32 subnormal 2^−127); elements clamped to ± max, then rounded to nearest-even."""
    k, n = x.shape
    xb = x.reshape(k // 32, 32, n).astype(np.float64)
    amax = np.abs(xb).max(axis=1, keepdims=True)
    with np.errstate(divide="ignore"):
        lg = np.floor(np.log2(amax))
    if fmt == "mxint8":  # int8 with an implicit 2^-6: emax 0, stored scale X · 2^-6, codes round(V / X / 2^-6)
        e = np.where(amax > 0, lg, -np.inf)
        e = np.maximum(e - 6, -126)
        codes = np.clip(np.round(xb / 2.0**e), -127, 127).astype(np.int8)
    else:
        dt, emax = ELEMENTS[fmt]
        vmax = float(ml_dtypes.finfo(dt).max)
        e = np.where(amax > 0, lg - emax, -np.inf)
        if ceil:
            e = np.where(amax > vmax * 2.0**e, e + 1, e)
        e = np.maximum(e, -126)
        y = np.clip(xb / 2.0**e, -vmax, vmax).astype(np.float32)
        codes = y.astype(dt).view(np.uint8)
    return codes.reshape(k, n), (e[:, 0] + 127).astype(np.uint8)


def ref_nvfp4(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.float32]:
    """NVIDIA NVFP4 on x [K, N], blocks of 16 along K: (fp4 bit patterns, e4m3 scale bits [K/16, N], outer)."""
    k, n = x.shape
    outer = np.float32(np.abs(x).max() * np.float32(1 / (448 * 6)))  # amax / 2688 (as one f32 product)
    y = (x.astype(np.float32) / outer).reshape(k // 16, 16, n)
    s = np.minimum(np.abs(y).max(axis=1, keepdims=True) / np.float32(6), 448).astype(ml_dtypes.float8_e4m3fn)
    s = np.where(s.astype(np.float32) > 0, s, np.ones_like(s))
    codes = np.clip(y / s.astype(np.float32), -6, 6).astype(ml_dtypes.float4_e2m1fn).view(np.uint8)
    return codes.reshape(k, n), s[:, 0].view(np.uint8), outer


def quantize(w: np.ndarray, fmt: str, **kw):
    q = jq.quantize_params({"d": {"kernel": jnp.asarray(w)}}, QuantConfig.simple(Scheme(fmt, **kw)))
    return q["d"]["kernel"]


def stored(q) -> tuple[np.ndarray, np.ndarray]:
    """(codes as unsigned bit patterns / int8 values, scale bit patterns) of a QTensor."""
    c = np.asarray(q.unpacked_codes())
    if c.dtype != np.int8:
        c = c.view(np.uint8) if c.dtype.itemsize == 1 else c
    return c, np.asarray(q.scale).view(np.uint8)


def weights(seed: int, k: int = 128, n: int = 24) -> np.ndarray:
    r = np.random.default_rng(seed)
    w = r.standard_normal((k, n)).astype(np.float32) * np.exp2(r.integers(-6, 4, (k // 32, 1, n))).repeat(32, 0).reshape(k, n)
    w[:32, 0] = 0.0  # an all-zero block
    w[32:64, 1] *= 0
    w[40, 1] = 4.0  # a block whose amax is a power of two
    w[k - 32:, 2] = np.float32(1e-30) * r.standard_normal(32)  # a tiny block
    return w


@pytest.mark.parametrize("fmt", [*ELEMENTS, "mxint8"])
@pytest.mark.parametrize("ceil", [False, True])
def test_mx_codes_and_scales_equal_the_spec_reference(fmt, ceil):
    if ceil and fmt == "mxint8":
        pytest.skip("ceil vs floor for int8 is covered by the fp formats")
    w = weights(0)
    q = quantize(w, fmt, scale_round="ceil" if ceil else "floor")
    codes, sbits = ref_mx(w, fmt, ceil)
    got_c, got_s = stored(q)
    assert q.scale.dtype == jnp.float8_e8m0fnu and q.scale.shape == (4, 24) and q.outer_scale is None
    np.testing.assert_array_equal(got_s, sbits)
    np.testing.assert_array_equal(got_c, codes)


def test_nvfp4_codes_scales_and_outer_equal_nvidias_recipe():
    w = weights(1, 64, 40)
    w[5, 7] = 2688.0 * 0.03125  # tensor amax = 2688 · 2^-5: outer is the power of two 2^-5 (exact divisions)
    q = quantize(w, "nvfp4")
    codes, sbits, outer = ref_nvfp4(w)
    got_c, got_s = stored(q)
    assert q.scale.dtype == jnp.float8_e4m3fn and q.scale.shape == (4, 40)
    assert float(q.outer_scale) == float(outer) == 2.0**-5
    np.testing.assert_array_equal(got_s, sbits)
    np.testing.assert_array_equal(got_c, codes)
    assert np.abs(np.asarray(q.scale, np.float32)).max() == 448.0  # the tensor's largest block uses e4m3's max


def test_spec_edge_cases():
    f = formats.get_format("mxfp4")
    amax = jnp.asarray([0.0, 4.0, 6.0, 7.9, 1e-40, jnp.inf, jnp.nan])
    s = np.asarray(mx.block_scale(amax, f))
    # zero block: the floor 2^-126; 4 = 2^2 → 2^0 (4 is exactly representable); 6, 7.9 → 2^0 (7.9 saturates to 6)
    np.testing.assert_array_equal(s[:4], [2.0**-126, 1.0, 1.0, 1.0])
    assert s[4] == 2.0**-126 and np.isnan(s[5]) and np.isnan(s[6])  # non-finite: the block decodes to NaN
    c = np.asarray(mx.block_scale(amax[:4], f, "ceil"))
    np.testing.assert_array_equal(c, [2.0**-126, 1.0, 1.0, 2.0])  # ceil: 7.9 > 6 · 2^0 → 2^1, nothing clips
    w = np.zeros((32, 2), np.float32)
    w[:, 1] = np.linspace(-7.9, 7.9, 32)
    q = quantize(w, "mxfp4")
    d = np.asarray(q.dequantize())
    assert (d[:, 0] == 0).all() and d[:, 1].max() == 6.0 and d[:, 1].min() == -6.0  # saturated, not wrapped
    # subnormal elements: e2m1's 0.5 is its only subnormal; values at it and halfway round half to even
    y = jnp.asarray([0.25, 0.5, 0.75, 1.25, 2.5, 5.0, -0.25, -0.75, 100.0])
    np.testing.assert_array_equal(f.decode(f.encode(y)), [0.0, 0.5, 1.0, 1.0, 2.0, 4.0, -0.0, -1.0, 6.0])


@pytest.mark.parametrize("name,dt", [("fp4_e2m1", ml_dtypes.float4_e2m1fn), ("fp6_e2m3", ml_dtypes.float6_e2m3fn),
                                     ("fp6_e3m2", ml_dtypes.float6_e3m2fn)])
def test_minifloat_tables_are_the_ocp_bit_patterns(name, dt):
    f = formats.get_format(name)
    n = 2**f.bits
    want = np.arange(n, dtype=np.uint8).view(dt).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(f.table, np.float32), want)
    codes = np.asarray(f.encode(jnp.asarray(want)))  # every value encodes to its own pattern (−0 keeps its sign)
    np.testing.assert_array_equal(codes, np.arange(n))
    np.testing.assert_array_equal(np.asarray(f.decode(jnp.asarray(codes))), want)
    assert f.max == float(ml_dtypes.finfo(dt).max)


@settings(max_examples=30, deadline=None)
@given(name=st.sampled_from(["fp4_e2m1", "fp6_e2m3", "fp6_e3m2"]),
       y=hnp.arrays(np.float32, (64,), elements=st.floats(-40, 40, width=32)))
def test_minifloat_encode_is_the_saturating_round_to_nearest_even_cast(name, y):
    f = formats.get_format(name)
    dt = {"fp4_e2m1": ml_dtypes.float4_e2m1fn, "fp6_e2m3": ml_dtypes.float6_e2m3fn,
          "fp6_e3m2": ml_dtypes.float6_e3m2fn}[name]
    want = np.clip(y, -f.max, f.max).astype(dt).view(np.uint8)
    np.testing.assert_array_equal(np.asarray(f.encode(jnp.asarray(y))), want)


@settings(max_examples=30, deadline=None)
@given(n=st.sampled_from([1, 5, 8, 13, 32]), rows=st.sampled_from([1, 3]), data=st.data())
def test_six_bit_packing_round_trips(n, rows, data):
    c = data.draw(hnp.arrays(np.uint8, (rows, n), elements=st.integers(0, 63)))
    p = formats.pack(jnp.asarray(c), 6, axis=-1)
    assert p.shape == (rows, formats.packed_length(n, 6)) == (rows, -(-n // 8) * 6)
    np.testing.assert_array_equal(np.asarray(formats.unpack(p, 6, n, axis=-1)), c)


@pytest.mark.parametrize("fmt,bits", [("mxfp4", 4.25), ("mxfp6_e2m3", 6.25), ("mxfp8_e4m3", 8.25), ("mxint8", 8.25),
                                      ("nvfp4", 4 + 8 / 16 + 32 / (64 * 48))])
def test_bits_per_weight_and_describe(fmt, bits):
    q = quantize(weights(2, 64, 48), fmt)
    assert q.bits_per_weight == pytest.approx(bits, abs=1e-9)
    block = 16 if fmt == "nvfp4" else 32
    assert Scheme(fmt).describe() == f"{fmt} g{block}"
    assert Scheme(fmt, scale_round="ceil").describe() == f"{fmt} g{block} ceil"
    assert q.describe().startswith(fmt) and f"g{block}" in q.describe()


def test_clear_refusals():
    with pytest.raises(ValueError, match=r"'group_size' has value 64, but format 'mxfp4' fixes blocks of 32; "
                                         r"drop group_size \(or set group_size: 32\)"):
        Scheme("mxfp4", group_size=64)
    with pytest.raises(ValueError, match=r"'scale_dtype' has value 'float32', but format 'nvfp4' stores its block "
                                         r"scales as float8_e4m3fn"):
        Scheme("nvfp4", scale_dtype="float32")
    with pytest.raises(ValueError, match="'symmetric' is False but format 'mxint8' has no zero point"):
        Scheme("mxint8", symmetric=False)
    with pytest.raises(ValueError, match="'scale_round' has value 'ceil', but format 'int4'"):
        Scheme("int4", scale_round="ceil")
    with pytest.raises(ValueError, match=r"'scale_round' has value 'up'; allowed values are \['floor', 'ceil'\]"):
        Scheme("mxfp4", scale_round="up")
    with pytest.raises(ValueError, match=r"model/w/kernel: group_size 32 does not divide axis 0 of length 48 .*"
                                         r"format mxfp4 fixes blocks of 32: set pad: true"):
        Scheme("mxfp4").layout((48, 8), (0,), "model/w/kernel")
    assert Scheme("mxfp4", group_size=32, scale_dtype="e8m0").grid == Scheme("mxfp4").grid
    q = quantize(np.ones((48, 8), np.float32), "mxfp4", pad=True)  # padded: the last block is partial
    np.testing.assert_array_equal(np.asarray(q.dequantize()), np.ones((48, 8)))
