"""AWQ's scale search (exact second-order output error, against a brute-force NumPy evaluation of every α), its clip
search and the `awq_clip` method; SmoothQuant's migration scales against the paper's formula."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jq
from jq import QTensor, QuantConfig, Rule, Scheme
from jq.algorithms import get_method
from jq.algorithms.awq import awq_clip, clip_search, rtn_fake_quant, search_scales, weight_absmean
from jq.algorithms.smoothquant import smooth_scales

K, T = 128, 512
INT4 = Scheme("int4", symmetric=False, group_size=32)
INT3 = Scheme("int3", symmetric=False, group_size=32)

jit_search = jax.jit(search_scales, static_argnames=("scheme", "layout_fn", "grid", "duo"))
jit_clip = jax.jit(clip_search, static_argnames=("scheme", "layout", "grid", "max_shrink"))
jit_rtn_fq = jax.jit(rtn_fake_quant, static_argnums=(1, 2))
dq = jax.jit(lambda q: q.dequantize(jnp.float32))


@functools.lru_cache(maxsize=None)
def data(seed=0, n_outliers=6, boost=25.0):
    """Activations with a few loud input channels (AWQ's salient channels) and two kernels sharing that input."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((T, K)).astype(np.float32)
    idx = rng.choice(K, n_outliers, replace=False)
    x[:, idx] *= boost
    w1 = (rng.standard_normal((K, 64)) * 0.05).astype(np.float32)
    w2 = (rng.standard_normal((K, 32)) * 0.05).astype(np.float32)
    h = (x.T @ x / T).astype(np.float32)
    return x, h, np.abs(x).mean(0), [w1, w2], idx


def out_err(delta, h):
    d = np.asarray(delta, np.float64).reshape(delta.shape[0], -1)
    return float(np.sum(d * (np.asarray(h, np.float64) @ d)))


# -- a NumPy RTN (asymmetric int, min-max, groups along axis 0 of a [K, N] kernel) ------------------------


def np_rtn(w, bits, g, scale_dtype=np.float16):
    k, n = w.shape
    x = w.reshape(k // g, g, n).astype(np.float32)
    lo = np.minimum(x.min(1, keepdims=True), 0)
    hi = np.maximum(x.max(1, keepdims=True), 0)
    qmax = 2**bits - 1
    s = ((hi - lo) / qmax).astype(scale_dtype).astype(np.float32)
    s = np.where(s > 0, s, 1).astype(np.float32)
    z = np.clip(np.round(-lo / s), 0, qmax)
    c = np.clip(np.round(x / s + z), 0, qmax)
    return ((c - z) * s).reshape(k, n)


def np_awq_errors(ws, h, act, bits, g, grid=20):
    errs, scales = [], []
    for i in range(grid):
        a = i / grid
        s = np.maximum(act.astype(np.float32) ** np.float32(a), 1e-4).astype(np.float32)
        s = s / np.sqrt(s.max() * s.min())
        errs.append(sum(out_err(np_rtn(w * s[:, None], bits, g) / s[:, None] - w, h) for w in ws))
        scales.append(s)
    return np.asarray(errs), scales


# -- AWQ scale search ---------------------------------------------------------------------------------------


def test_identity_hessian_uniform_activations_is_rtn():
    _, _, _, ws, _ = data()
    h = np.eye(K, dtype=np.float32)
    s, info = jit_search(ws, h, np.full(K, 0.7, np.float32), INT4)
    np.testing.assert_allclose(np.asarray(s), 1.0, atol=1e-6)
    rtn_err = sum(out_err(np.asarray(jit_rtn_fq(w, INT4, INT4.layout(w.shape, (0,)))) - w, h) for w in ws)
    assert float(info["error"]) == pytest.approx(rtn_err, rel=1e-5)
    assert float(info["rtn_error"]) == pytest.approx(rtn_err, rel=1e-5)
    assert float(info["alpha"]) == 0.0  # all candidates tie; the first (s = 1) is kept


def test_salient_channels_get_scaled_and_error_drops():
    _, h, act, ws, idx = data()
    s, info = jit_search(ws, h, act, INT4)
    s = np.asarray(s)
    assert float(info["alpha"]) > 0
    others = np.setdiff1d(np.arange(K), idx)
    assert s[idx].min() > s[others].max()  # the loud channels are the protected ones
    err = sum(out_err(np.asarray(jit_rtn_fq(w * s[:, None], INT4, INT4.layout(w.shape, (0,)))) / s[:, None] - w, h) for w in ws)
    rtn_err = float(info["rtn_error"])
    assert err == pytest.approx(float(info["error"]), rel=1e-4)
    assert err < 0.6 * rtn_err, (err, rtn_err)
    assert rtn_err == pytest.approx(float(info["errors"][0]))


@pytest.mark.parametrize("scheme,bits", [(INT4, 4), (INT3, 3)])
def test_grid_errors_match_numpy_brute_force(scheme, bits):
    _, h, act, ws, _ = data()
    s, info = jit_search(ws, h, act, scheme)
    errs, scales = np_awq_errors(ws, h, act, bits, 32)
    np.testing.assert_allclose(np.asarray(info["errors"]), errs, rtol=2e-3)
    assert int(np.argmin(np.asarray(info["errors"]))) == int(np.argmin(errs))
    np.testing.assert_allclose(np.asarray(s), scales[int(np.argmin(errs))], rtol=1e-5)
    np.testing.assert_allclose(np.asarray(info["alphas"]), np.arange(20) / 20)


def test_duo_scaling_never_worse_than_rtn():
    _, h, act, ws, _ = data()
    lays = [INT4.layout(w.shape, (0,)) for w in ws]
    # w_absmean: |w| over its group's max, averaged over all output columns of both kernels
    ref = np.concatenate([
        (np.abs(w).reshape(4, 32, -1) / (np.abs(w).reshape(4, 32, -1).max(1, keepdims=True) + 1e-6)).reshape(K, -1)
        for w in ws
    ], axis=1).mean(1)
    np.testing.assert_allclose(np.asarray(weight_absmean(ws, lays)), ref, rtol=1e-5)
    s, info = jit_search(ws, h, act, INT4, duo=True)
    assert float(info["error"]) <= float(info["rtn_error"])
    assert float(info["error"]) < 0.7 * float(info["rtn_error"])
    assert np.all(np.isfinite(np.asarray(s))) and np.all(np.asarray(s) > 0)


def test_search_rejects_mismatched_shapes():
    _, h, act, ws, _ = data()
    with pytest.raises(ValueError, match="input channels"):
        search_scales([ws[0][:64]], h, act, INT4)
    with pytest.raises(ValueError, match="hessian"):
        search_scales(ws, h[:64, :64], act, INT4)


# -- clip search --------------------------------------------------------------------------------------------


def group_objective(w, deq, h, g):
    """Δ_gᵀ H_gg Δ_g per (group, column), float64."""
    d = (np.asarray(deq, np.float64) - w).reshape(-1, g, w.shape[1])
    hb = np.stack([h[i * g : (i + 1) * g, i * g : (i + 1) * g] for i in range(w.shape[0] // g)]).astype(np.float64)
    return np.einsum("ain,aij,ajn->an", d, hb, d)


@pytest.mark.parametrize("scheme", [INT4, INT3, Scheme("int4", group_size=32)])
def test_clip_search_never_increases_group_objective(scheme):
    _, h, _, ws, _ = data()
    w = ws[0]
    layout = scheme.layout(w.shape, (0,))
    lo, hi = jit_clip(w, h, scheme, layout)
    assert lo.shape == hi.shape == (4, 1, 64)
    xg = w.reshape(4, 32, 64)
    assert np.all(np.asarray(hi) <= xg.max(1, keepdims=True) + 1e-7)
    assert np.all(np.asarray(lo) >= xg.min(1, keepdims=True) - 1e-7)
    q = awq_clip_jit(w, scheme, layout, {"hessian": h})
    e_clip = group_objective(w, dq(q), h, 32)
    e_rtn = group_objective(w, jit_rtn_fq(w, scheme, layout), h, 32)
    assert np.all(e_clip <= e_rtn * (1 + 1e-5) + 1e-12)
    assert e_clip.sum() < 0.97 * e_rtn.sum()
    shrunk = np.mean(np.asarray(hi) < xg.max(1, keepdims=True) - 1e-7)
    assert 0 < shrunk < 1


awq_clip_jit = jax.jit(awq_clip, static_argnums=(1, 2))


def test_clip_search_layouts_agree():
    """Flat groups (same groups for a [K, N] kernel when g divides K), per-channel and a 3-D kernel."""
    _, h, _, ws, _ = data()
    w = ws[1]
    stats = {"hessian": h}
    per_axis = dq(awq_clip_jit(w, INT4, INT4.layout(w.shape, (0,)), stats))
    flat_s = Scheme("int4", symmetric=False, group_size=32, flat_groups=True)
    flat = dq(awq_clip_jit(w, flat_s, flat_s.layout(w.shape, (0,)), stats))
    np.testing.assert_array_equal(np.asarray(flat), np.asarray(per_axis))
    w3 = w.reshape(K, 4, 8)
    three = dq(awq_clip_jit(w3, INT4, INT4.layout(w3.shape, (0,)), stats))
    np.testing.assert_array_equal(np.asarray(three).reshape(K, 32), np.asarray(per_axis))
    heads = w.reshape(4, 32, 32)  # a DenseGeneral (heads, head_dim, out) kernel contracted over (0, 1)
    dg = dq(awq_clip_jit(heads, INT4, INT4.layout(heads.shape, (0, 1)), stats))
    np.testing.assert_array_equal(np.asarray(dg).reshape(K, 32), np.asarray(per_axis))
    ch = Scheme("int4", symmetric=False)
    q = awq_clip_jit(w, ch, ch.layout(w.shape, (0,)), stats)
    q.check()
    d = np.asarray(dq(q)) - w
    d0 = np.asarray(jit_rtn_fq(w, ch, ch.layout(w.shape, (0,)))) - w
    per_col = lambda d: np.einsum("in,ij,jn->n", d, h.astype(np.float64), d)  # noqa: E731
    assert np.all(per_col(d) <= per_col(d0) * (1 + 1e-5) + 1e-12)


def test_padded_groups():
    """K = 128 in groups of 48 (padded to 144): the scale search and the clip search work on the padded view."""
    _, h, act, ws, _ = data()
    scheme = Scheme("int4", symmetric=False, group_size=48, pad=True)
    s, info = jit_search(ws, h, act, scheme)
    assert s.shape == (K,) and float(info["error"]) < 0.6 * float(info["rtn_error"])
    w = ws[0]
    layout = scheme.layout(w.shape, (0,))
    q = awq_clip_jit(w, scheme, layout, {"hessian": h})
    q.check()
    pad = lambda a, axes: np.pad(a, [(0, 16) if i in axes else (0, 0) for i in range(a.ndim)])  # noqa: E731
    e_clip = group_objective(pad(w, (0,)), pad(np.asarray(dq(q)), (0,)), pad(h, (0, 1)), 48)
    e_rtn = group_objective(pad(w, (0,)), pad(np.asarray(jit_rtn_fq(w, scheme, layout)), (0,)), pad(h, (0, 1)), 48)
    assert np.all(e_clip <= e_rtn * (1 + 1e-5) + 1e-12) and e_clip.sum() < e_rtn.sum()


def test_awq_clip_method_registered_and_needs_stats():
    m = get_method("awq_clip")
    assert m.build().fn is awq_clip and m.needs_calibration
    _, h, _, ws, _ = data()
    w = ws[1]
    with pytest.raises(ValueError, match="hessian"):
        awq_clip(jnp.asarray(w), INT4, INT4.layout(w.shape, (0,)), None)
    cfg = QuantConfig(rules=(Rule(r".*kernel", INT4, "awq_clip", options=(("grid", 10),)),))
    params = {"up": {"kernel": jnp.asarray(w)}}
    with pytest.raises(ValueError, match="calibration"):
        jq.quantize_params(params, cfg)
    out = jq.quantize_params(params, cfg, calib={"up/kernel": {"hessian": jnp.asarray(h)}})
    q = out["up"]["kernel"]
    assert isinstance(q, QTensor)
    q.check()
    assert out_err(np.asarray(dq(q)) - w, h) < out_err(np.asarray(jit_rtn_fq(w, INT4, INT4.layout(w.shape, (0,)))) - w, h)


# -- SmoothQuant --------------------------------------------------------------------------------------------


def sq_data(seed=1):
    rng = np.random.default_rng(seed)
    act = np.abs(rng.standard_normal(K)).astype(np.float32) + 0.1
    act[[3, 17, 90]] = [40.0, 60.0, 25.0]  # outlier activation channels
    ws = [(rng.standard_normal((K, 48)) * 0.05).astype(np.float32), (rng.standard_normal((K, 16)) * 0.05).astype(np.float32)]
    return act, ws


def test_smooth_scales_formula():
    act, ws = sq_data()
    wmax = np.max(np.abs(np.concatenate(ws, axis=1)), axis=1)
    for alpha in (0.0, 0.3, 0.5, 0.85, 1.0):
        s = np.asarray(smooth_scales(act, ws, alpha=alpha))
        np.testing.assert_allclose(s, act**alpha / wmax ** (1 - alpha), rtol=1e-5)
    # a single kernel is accepted as is; the float model is unchanged by the migration
    s = np.asarray(smooth_scales(act, ws[0]))
    np.testing.assert_allclose(s, np.sqrt(act / np.abs(ws[0]).max(1)), rtol=1e-5)
    x = np.random.default_rng(0).standard_normal((8, K)).astype(np.float32) * act
    np.testing.assert_allclose((x / s) @ (s[:, None] * ws[0]), x @ ws[0], rtol=1e-4, atol=1e-4)


def test_alpha_moves_the_difficulty():
    act, ws = sq_data()
    wmax = np.max(np.abs(np.concatenate(ws, axis=1)), axis=1)
    ratio = lambda v: float(v.max() / np.median(v))  # noqa: E731
    act_r, w_r = [], []
    for alpha in np.linspace(0, 1, 6):
        s = np.asarray(smooth_scales(act, ws, alpha=float(alpha)))
        act_r.append(ratio(act / s))
        w_r.append(ratio(wmax * s))
    assert np.all(np.diff(act_r) < 0) and np.all(np.diff(w_r) > 0)
    assert act_r[3] < 0.2 * ratio(act)  # α = 0.6 flattens the activation outliers a lot
    assert act_r[-1] == pytest.approx(1.0)  # α = 1: activations fully flat, all difficulty in the weights
    assert w_r[0] == pytest.approx(1.0)  # α = 0: weights flat


def test_alpha_extremes_depend_on_one_side_only():
    act, ws = sq_data()
    act2 = act * np.random.default_rng(5).uniform(0.5, 2.0, K).astype(np.float32)
    ws2 = [w * 3.0 for w in ws]
    s0 = np.asarray(smooth_scales(act, ws, alpha=0.0))
    np.testing.assert_allclose(np.asarray(smooth_scales(act2, ws, alpha=0.0)), s0, rtol=1e-6)
    assert not np.allclose(np.asarray(smooth_scales(act, ws2, alpha=0.0)), s0)
    s1 = np.asarray(smooth_scales(act, ws, alpha=1.0))
    np.testing.assert_allclose(np.asarray(smooth_scales(act, ws2, alpha=1.0)), s1, rtol=1e-6)
    np.testing.assert_allclose(s1, act, rtol=1e-6)


def test_zero_channels_clipping_and_checks():
    act, ws = sq_data()
    act = act.copy()
    ws = [w.copy() for w in ws]
    act[5] = 0.0  # a dead activation channel
    for w in ws:
        w[7] = 0.0  # an input no weight reads
    act[9], ws[0][9], ws[1][9] = 1e9, 1e-9, 0.0  # extreme: clipped to 1/eps
    s = np.asarray(jax.jit(smooth_scales, static_argnames=("alpha", "eps"))(act, ws, alpha=0.5))
    assert s[5] == 1.0 and s[7] == 1.0
    assert s[9] == pytest.approx(1e5)
    assert np.all(np.isfinite(s)) and np.all(s >= 1e-5) and np.all(s <= 1e5)
    with pytest.raises(ValueError, match="alpha"):
        smooth_scales(act, ws, alpha=1.5)
    with pytest.raises(ValueError, match="inputs"):
        smooth_scales(act[:64], ws)
