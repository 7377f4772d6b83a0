"""jq.numbers.ranges: min-max / abs-max / percentile against NumPy, and the MSE clip search against a brute-force NumPy
search over the same shrink grid."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jq import Scheme, ranges
from jq.algorithms import get_method
from jqtest.npref import check_quantized, np_encode, np_scale_zero

AXES = [(0,), (1,), (2,), (0, 1), (1, 2), (0, 2), (0, 1, 2)]


def data(shape=(3, 4, 8), seed=0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(shape) * rng.uniform(0.1, 3, size=shape[-1:])).astype(np.float32)


@pytest.mark.parametrize("axes", AXES)
def test_minmax_absmax(axes):
    x = data()
    x[0, 0, 0] = -9.0  # a negative outlier decides absmax of its groups
    lo, hi = ranges.minmax(jnp.asarray(x), axes)
    np.testing.assert_array_equal(np.asarray(lo), x.min(axis=axes, keepdims=True))
    np.testing.assert_array_equal(np.asarray(hi), x.max(axis=axes, keepdims=True))
    lo, hi = ranges.absmax(jnp.asarray(x), axes)
    a = np.abs(x).max(axis=axes, keepdims=True)
    np.testing.assert_array_equal(np.asarray(hi), a)
    np.testing.assert_array_equal(np.asarray(lo), -a)


@pytest.mark.parametrize("axes", [(1,), (0, 2), (0, 1, 2)])
@pytest.mark.parametrize("p", [99.99, 99.0, 90.0, 75.5, 100.0])
def test_percentile_linear(axes, p):
    x = data(seed=1)
    lo, hi = ranges.percentile(jnp.asarray(x), axes, p)
    ref = np.quantile(x.astype(np.float64), [1 - p / 100, p / 100], axis=axes, keepdims=True, method="linear")
    assert lo.shape == hi.shape == ref[0].shape
    np.testing.assert_allclose(np.asarray(lo), ref[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(hi), ref[1], rtol=1e-5, atol=1e-6)
    if p < 100:  # the clip really happens: strictly inside min / max somewhere
        assert np.any(np.asarray(hi) < x.max(axis=axes, keepdims=True))


# ------------------------------------------------------------------------------------------------------ MSE clip


def np_err(x, s, lo0, hi0, scheme: Scheme, axes, weight=None):
    """Σ weight·|fake_quant(x) − x|^norm per group for the range (lo0·s, hi0·s), in float64 from NumPy codes."""
    scale, zero = np_scale_zero(lo0 * np.float32(s), hi0 * np.float32(s), scheme.format, scheme.symmetric,
                                scheme.restricted, scheme.scale_dtype, scheme.zero_point)
    codes, _ = np_encode(x, scale, zero, scheme.format, scheme.symmetric, scheme.restricted)
    fq = (codes if zero is None else codes - zero).astype(np.float64) * scale
    e = np.abs(fq - x) ** scheme.mse_norm
    if weight is not None:
        e = e * weight
    return e.sum(axis=axes, keepdims=True)


def np_mse_search(x, scheme: Scheme, axes, weight=None):
    """Brute force: every shrink 1, 1 − 1/grid, …, 1 − max_shrink; the first with the least error wins."""
    lo0, hi0 = x.min(axis=axes, keepdims=True), x.max(axis=axes, keepdims=True)
    n = int(round(scheme.mse_max_shrink * scheme.mse_grid))
    shrinks = [1.0 - i / scheme.mse_grid for i in range(n + 1)]
    errs = np.stack([np_err(x, s, lo0, hi0, scheme, axes, weight) for s in shrinks])
    return np.asarray(shrinks)[np.argmin(errs, axis=0)], errs, shrinks, lo0, hi0


MSE_SCHEMES = [
    Scheme("int4", range="mse", mse_grid=20, mse_max_shrink=0.5, scale_dtype="float32"),
    Scheme("int3", symmetric=False, range="mse", mse_grid=16, mse_max_shrink=0.75),
    Scheme("nf4", range="mse", mse_grid=10, mse_max_shrink=0.6, mse_norm=2.0, scale_dtype="float32"),
    Scheme("int2", range="mse", mse_grid=25, mse_max_shrink=0.8, mse_norm=1.0, scale_dtype="float32"),
]


@functools.partial(jax.jit, static_argnums=(1, 2))
def _mse_clip(x, axes, scheme, weight=None):
    return ranges.mse_clip(x, axes, scheme.range_search, scheme.grid, weight)


@pytest.mark.parametrize("scheme", MSE_SCHEMES, ids=lambda s: s.describe() + f" grid{s.mse_grid}")
def test_mse_clip_equals_brute_force_and_never_worse(scheme):
    rng = np.random.default_rng(2)
    # 8 groups of 32 along axis 1 (a grouped view (G, g, N)); heavy tails so clipping pays off in most groups
    x = (rng.standard_t(3, size=(2, 32, 4)) * rng.uniform(0.2, 2, size=(1, 1, 4))).astype(np.float32)
    axes = (1,)
    lo, hi = (np.asarray(a) for a in _mse_clip(jnp.asarray(x), axes, scheme))
    best_np, errs, shrinks, lo0, hi0 = np_mse_search(x, scheme, axes)
    s_jq = hi / hi0
    np.testing.assert_allclose(lo, lo0 * s_jq, rtol=1e-6)
    # the chosen factor is on the grid
    grid = np.asarray(shrinks)
    idx = np.abs(s_jq[..., None] - grid).argmin(-1)
    np.testing.assert_allclose(s_jq, grid[idx], rtol=1e-6)
    # never worse than no shrink (in the reference's error)
    e_jq = np.take_along_axis(errs, idx[None], 0)[0]
    assert np.all(e_jq <= errs[0] * (1 + 1e-6))
    # equal to the brute-force argmin, up to groups where two factors' errors agree to f32 rounding
    e_best = errs.min(axis=0)
    same = np.isclose(s_jq, best_np, rtol=1e-6)
    assert np.all(same | (e_jq <= e_best * (1 + 1e-5)))
    assert same.mean() >= 0.75
    if scheme.fmt.is_int:  # (NF4's dense centre rarely gains from clipping)
        assert np.any(best_np < 1.0), "test data should make clipping worthwhile somewhere"


def test_mse_clip_weight_makes_it_data_aware():
    rng = np.random.default_rng(3)
    x = (rng.standard_t(3, size=(1, 32, 6))).astype(np.float32)
    weight = np.ones_like(x)
    weight[:, :4] = 50.0  # make the first inputs matter most
    scheme = MSE_SCHEMES[0]
    lo, hi = (np.asarray(a) for a in _mse_clip(jnp.asarray(x), (1,), scheme, jnp.asarray(weight)))
    best_np, errs, shrinks, lo0, hi0 = np_mse_search(x, scheme, (1,), weight)
    s_jq = hi / hi0
    idx = np.abs(s_jq[..., None] - np.asarray(shrinks)).argmin(-1)
    e_jq = np.take_along_axis(errs, idx[None], 0)[0]
    assert np.all(e_jq <= errs.min(axis=0) * (1 + 1e-5))


def test_mse_clip_single_step_grid_is_minmax():
    x = data(seed=4)
    scheme = Scheme("int4", range="mse", mse_grid=10, mse_max_shrink=0.0)
    lo, hi = ranges.mse_clip(jnp.asarray(x), (0, 1), scheme.range_search, scheme.grid)
    np.testing.assert_array_equal(np.asarray(lo), x.min(axis=(0, 1), keepdims=True))
    np.testing.assert_array_equal(np.asarray(hi), x.max(axis=(0, 1), keepdims=True))


# ----------------------------------------------------------------------------------- ranges through estimate / rtn


def test_estimate_dispatch():
    x = jnp.asarray(data(seed=5))
    for rng_name, ref in [
        ("minmax", ranges.minmax(x, (1,))),
        ("absmax", ranges.absmax(x, (1,))),
        ("percentile", ranges.percentile(x, (1,), 99.0)),
    ]:
        got = ranges.estimate(x, (1,), Scheme("int4", range=rng_name, percentile=99.0))
        for a, b in zip(got, ref):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("rng_name,sym", [("percentile", False), ("absmax", False), ("percentile", True)])
def test_rtn_with_range_methods_matches_reference(rng_name, sym):
    """RTN's codes / dequantization under the percentile and absmax ranges, against np_rtn fed NumPy ranges."""
    w = data((64, 8), seed=6)
    w[3, 2] = 40.0  # an outlier the percentile range clips
    scheme = Scheme("int4", symmetric=sym, group_size=32, range=rng_name, percentile=97.0)
    layout = scheme.layout(w.shape, (0,))
    q = get_method("rtn")(jnp.asarray(w), scheme, layout)

    def lohi(xg, red):
        if rng_name == "absmax":
            a = np.abs(xg).max(axis=red, keepdims=True)
            return -a, a
        qs = np.quantile(xg.astype(np.float64), [0.03, 0.97], axis=red, keepdims=True).astype(np.float32)
        return qs[0], qs[1]

    c = np.asarray(q.unpacked_codes()).astype(np.float32)
    # percentile ranges differ from NumPy's by f32 rounding, which may move a scale by one f16 ulp: compare the
    # scales loosely here and the codes / values exactly given the implementation's scales
    check_quantized(w, np.asarray(q.scale, np.float32), None if q.zero is None else np.asarray(q.zero, np.float32),
                    c, np.asarray(q.dequantize()), fmt="int4", symmetric=sym, group_size=32, range_lohi=lohi)
    d = np.asarray(q.dequantize())
    assert abs(d[3, 2]) < 40.0 if rng_name == "percentile" else d[3, 2] == pytest.approx(40.0, rel=0.07)
