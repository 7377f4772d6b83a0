"""NumPy reference implementations of jq's formats, packing and round-to-nearest, and `check_quantized`."""

from __future__ import annotations

import ml_dtypes
import numpy as np

# -------------------------------------------------------------------------------------------- format constants

NF4_QLORA = np.array(
    [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
     -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
     0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0],
    np.float32,
)
# e2m1 bit patterns 0..15: sign bit 3, exponent bits 2..1, mantissa bit 0 (written out by hand, OCP MX spec)
FP4_E2M1 = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6], np.float32)
FP8_DTYPES = {"fp8_e4m3": ml_dtypes.float8_e4m3fn, "fp8_e5m2": ml_dtypes.float8_e5m2}
FP8_MAX = {"fp8_e4m3": 448.0, "fp8_e5m2": 57344.0}
SCALE_DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}


def fmt_bits(fmt: str) -> int:
    if fmt.startswith("int"):
        return int(fmt[3:])
    return 8 if fmt.startswith("fp8") else 4


# --------------------------------------------------------------------------------------------------- packing


def np_pack(codes: np.ndarray, bits: int, axis: int = -1) -> np.ndarray:
    """Reference bit packing with Python integers: every 8 codes c_0..c_7 along `axis` (zero-padded to a multiple
    of 8) form the little-endian integer Σ (c_i & mask) << (bits·i), written as `bits` little-endian bytes.
    8-bit codes are one byte each, unpadded."""
    c = np.moveaxis(np.asarray(codes).astype(np.int64) & ((1 << bits) - 1), axis, -1)
    if bits == 8:  # one code per byte, no padding
        return np.moveaxis(c.astype(np.uint8), -1, axis)
    n = c.shape[-1]
    nb = -(-n // 8)
    out = np.zeros(c.shape[:-1] + (nb * bits,), np.uint8)
    for idx in np.ndindex(*c.shape[:-1]):
        row = [int(v) for v in c[idx]] + [0] * (nb * 8 - n)
        for blk in range(nb):
            val = sum(row[blk * 8 + i] << (bits * i) for i in range(8))
            out[idx + (slice(blk * bits, (blk + 1) * bits),)] = np.frombuffer(val.to_bytes(bits, "little"), np.uint8)
    return np.moveaxis(out, -1, axis)


def sign_extend(codes: np.ndarray, bits: int) -> np.ndarray:
    """Low `bits` bits of `codes` read as two's complement."""
    u = np.asarray(codes).astype(np.int64) & ((1 << bits) - 1)
    return np.where(u >= 1 << (bits - 1), u - (1 << bits), u)


# --------------------------------------------------------------------------------------------------- rounding


def np_nearest_index(y: np.ndarray, table: np.ndarray) -> np.ndarray:
    """Index of the nearest table entry (first on ties) by brute-force argmin."""
    y = np.asarray(y, np.float64)
    return np.argmin(np.abs(y[..., None] - np.asarray(table, np.float64)), axis=-1)


def np_fp8_saturating(y: np.ndarray, fmt: str) -> np.ndarray:
    """ml_dtypes round-to-nearest-even cast, with out-of-range magnitudes saturated to ±max (as f32 values)."""
    y = np.asarray(y, np.float32)
    m = FP8_MAX[fmt]
    with np.errstate(invalid="ignore", over="ignore"):
        r = y.astype(FP8_DTYPES[fmt]).astype(np.float32)
    return np.where(np.abs(y) > m, np.sign(y) * np.float32(m), r).astype(np.float32)


# --------------------------------------------------------------------------------------------------------- RTN


def grouped_view(w: np.ndarray, axes, granularity: str, group_size: int | None):
    """Returns (xg, reduce_axes, ga, padded_len): the weight viewed with the group axis split, zero-padded."""
    nd = w.ndim
    axes = tuple(sorted(a % nd for a in axes))
    ga = max(axes)
    if granularity == "tensor":
        return w, tuple(range(nd)), ga, w.shape[ga]
    if granularity == "channel":
        return w, axes, ga, w.shape[ga]
    k = w.shape[ga]
    kp = -(-k // group_size) * group_size
    pad = [(0, 0)] * nd
    pad[ga] = (0, kp - k)
    wp = np.pad(w, pad)
    shp = wp.shape[:ga] + (kp // group_size, group_size) + wp.shape[ga + 1:]
    return wp.reshape(shp), (ga + 1,), ga, kp


def np_scale_zero(lo, hi, fmt, symmetric=True, restricted=False, scale_dtype="float16", zero_point="int"):
    lo = np.asarray(lo, np.float32)
    hi = np.asarray(hi, np.float32)
    sdt = SCALE_DTYPES[scale_dtype]
    bits = fmt_bits(fmt)

    def rnd(s):
        s = s.astype(sdt).astype(np.float32)
        return np.where(s > 0, s, np.float32(1.0)).astype(np.float32)

    if symmetric:
        amax = np.maximum(np.abs(lo), np.abs(hi))
        if fmt.startswith("int"):
            qmax = np.float32(2 ** (bits - 1) - 1) if restricted else np.float32((2**bits - 1) / 2)
        elif fmt.startswith("fp8"):
            qmax = np.float32(FP8_MAX[fmt])
        else:
            qmax = np.float32(6.0 if fmt == "fp4_e2m1" else 1.0)
        return rnd(amax / qmax), None
    lo = np.minimum(lo, np.float32(0))
    hi = np.maximum(hi, np.float32(0))
    qmax = np.float32(2**bits - 1)
    scale = rnd((hi - lo) / qmax)
    zero = (-lo / scale).astype(np.float32)
    if zero_point == "int":
        zero = np.clip(np.round(zero), 0, qmax).astype(np.float32)
    else:
        zero = zero.astype(SCALE_DTYPES[scale_dtype]).astype(np.float32)
    return scale, zero


def format_grid(fmt, symmetric=True, restricted=False) -> np.ndarray:
    """Every value a code of `fmt` can take (before scale), sorted and distinct."""
    bits = fmt_bits(fmt)
    if fmt.startswith("int"):
        if symmetric:
            hi = 2 ** (bits - 1) - 1
            return np.arange(-hi if restricted else -hi - 1, hi + 1, dtype=np.float64)
        return np.arange(0, 2**bits, dtype=np.float64)
    if fmt.startswith("fp8"):
        v = np.arange(256, dtype=np.uint8).view(FP8_DTYPES[fmt]).astype(np.float64)
        return np.unique(v[np.isfinite(v)])
    return np.unique(np.asarray(FP4_E2M1 if fmt == "fp4_e2m1" else NF4_QLORA, np.float64))


def np_encode(xg, scale, zero, fmt, symmetric=True, restricted=False):
    """Round `xg / scale (+ zero)` to the format. Returns (codes, near_tie): codes are integers for int formats
    and the format's *values* (f32) for fp8 / fp4 / NF4; `near_tie` marks elements whose scaled value lies within
    a few f32 ulps of a rounding boundary, where a correctly rounded division and XLA's CPU division (which is
    not correctly rounded) may legitimately pick neighbouring codes."""
    y = (np.asarray(xg, np.float32) / scale).astype(np.float32)
    if zero is not None:
        y = (y + zero).astype(np.float32)
    grid = format_grid(fmt, symmetric, restricted)
    mids = (grid[1:] + grid[:-1]) / 2
    j = np.clip(np.searchsorted(mids, y.astype(np.float64)), 1, len(mids) - 1)
    dist = np.minimum(np.abs(y - mids[j - 1]), np.abs(y - mids[np.minimum(j, len(mids) - 1)]))
    near_tie = dist <= 8 * np.spacing(np.abs(y).astype(np.float32)) + 1e-30
    if fmt.startswith("int"):
        codes = np.clip(np.round(y), grid[0], grid[-1]).astype(np.float32)  # half-even, as jnp.round
    elif fmt.startswith("fp8"):
        codes = np_fp8_saturating(y, fmt)
    else:
        table = FP4_E2M1 if fmt == "fp4_e2m1" else NF4_QLORA
        codes = table[np_nearest_index(y, table)].astype(np.float32)
    return codes, near_tie


def np_rtn(w, fmt="int8", *, symmetric=True, restricted=False, granularity="channel", group_size=None,
           axes=(0,), scale_dtype="float16", zero_point="int", range_lohi=None, use_scale=None):
    """Reference round-to-nearest. Returns dict(deq, codes, scale, zero, near_tie, step): scale / zero in the
    QTensor's stored shape (group axis squeezed), codes and near_tie in the stored (padded) shape, deq in the
    logical shape, step = the largest gap between neighbouring dequantized values of each element's grid.

    `use_scale` (stored-shape scales, e.g. the implementation's) replaces the reference's own scale: zero points,
    codes and the dequantized array are then computed from it, so a one-ulp difference in a scale (see
    `np_encode`) does not cascade into different codes."""
    w = np.asarray(w, np.float32)
    if group_size is not None:
        granularity = "group"
    xg, red, ga, kp = grouped_view(w, axes, granularity, group_size)
    if range_lohi is None:
        lo, hi = xg.min(axis=red, keepdims=True), xg.max(axis=red, keepdims=True)
    else:
        lo, hi = range_lohi(xg, red)
    scale, zero = np_scale_zero(lo, hi, fmt, symmetric, restricted, scale_dtype, zero_point)
    if use_scale is not None:
        scale = np.asarray(use_scale, np.float32)
        if granularity == "group":
            scale = np.expand_dims(scale, ga + 1)
        scale = scale.reshape(np.shape(lo))
        if zero is not None:
            qmax = np.float32(2 ** fmt_bits(fmt) - 1)
            zero = (-np.minimum(lo, np.float32(0)) / scale).astype(np.float32)
            if zero_point == "int":
                zero = np.clip(np.round(zero), 0, qmax).astype(np.float32)
            else:
                zero = zero.astype(SCALE_DTYPES[scale_dtype]).astype(np.float32)
    codes, near_tie = np_encode(xg, scale, zero, fmt, symmetric, restricted)
    v = codes if zero is None else (codes - zero).astype(np.float32)
    deq = (v * scale).astype(np.float32)
    grid = format_grid(fmt, symmetric, restricted)
    step = np.broadcast_to(np.float32(np.max(np.diff(grid))) * scale, xg.shape)
    stored = list(w.shape)
    stored[ga] = kp
    keep = np.arange(w.shape[ga])
    deq = np.take(deq.reshape(stored), keep, axis=ga)
    step = np.take(step.reshape(stored), keep, axis=ga)
    if granularity == "group":
        scale = np.squeeze(scale, ga + 1)
        zero = None if zero is None else np.squeeze(zero, ga + 1)
    return dict(deq=deq, codes=codes.reshape(stored), scale=scale, zero=zero, near_tie=near_tie.reshape(stored),
                step=step)


SCALE_EPS = {"float32": 2.0**-22, "float16": 2.0**-10, "bfloat16": 2.0**-7}  # ~1 ulp, relative


def check_quantized(w, scale, zero, code_values, deq, *, scale_dtype="float16", zero_point="int", **rtn_kw):
    """Compare a quantization result (stored scale, zero, codes as values, dequantized array — plain arrays)
    with `np_rtn(w, **rtn_kw)`:

    - scales equal the reference's to one ulp of `scale_dtype` (exactly, in the vast majority);
    - given those scales, zero points, codes and the dequantized array equal the reference exactly (f32
      rounding for the dequantized values), except that an element whose scaled value sits on a rounding
      boundary may take the neighbouring code (at most one grid step away), and such elements are rare.
    """
    w = np.asarray(w, np.float32)
    scale = np.asarray(scale, np.float32)
    own = np_rtn(w, scale_dtype=scale_dtype, zero_point=zero_point, **rtn_kw)
    assert scale.shape == own["scale"].shape
    np.testing.assert_allclose(scale, own["scale"], rtol=SCALE_EPS[scale_dtype], atol=0)
    if scale_dtype != "float32":
        assert np.mean(scale == own["scale"]) >= 0.95
    ref = np_rtn(w, scale_dtype=scale_dtype, zero_point=zero_point, use_scale=scale, **rtn_kw)
    if ref["zero"] is None:
        assert zero is None
    else:
        zero = np.asarray(zero, np.float32)
        if zero_point == "int":
            np.testing.assert_array_equal(zero, ref["zero"])
        else:
            np.testing.assert_allclose(zero, ref["zero"], rtol=SCALE_EPS[scale_dtype], atol=1e-6)
    tie = ref["near_tie"]
    assert tie.mean() < 0.01, f"{tie.mean():.2%} of elements near a rounding boundary: test data is degenerate"
    code_values = np.asarray(code_values, np.float32)
    assert code_values.shape == ref["codes"].shape
    np.testing.assert_array_equal(code_values[~tie], ref["codes"][~tie])
    deq = np.asarray(deq, np.float32)
    assert deq.shape == w.shape
    step = ref["step"]
    err = np.abs(deq - ref["deq"])
    assert np.all(err <= step * (1 + 1e-6) + 1e-30)
    # away from boundaries: equal to f32 rounding
    k = np.take(tie, np.arange(w.shape[_ga(w, rtn_kw)]), axis=_ga(w, rtn_kw))
    np.testing.assert_allclose(deq[~k], ref["deq"][~k], rtol=1e-6, atol=0)
    return ref


def _ga(w, rtn_kw):
    return max(a % w.ndim for a in rtn_kw.get("axes", (0,)))


# ============================================================================ tests of the references themselves
