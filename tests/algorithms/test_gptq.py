"""GPTQ: the jitted implementation against a plain float64 NumPy transcription of the published algorithm
(one channel at a time, no lazy batches), plus properties: lower output error than RTN, equality with RTN when
the Hessian is diagonal, dead inputs, damping retries and the RTN fallback, act-order permutations, layouts (the
`refit` / `hqq` grid options: test_gptq_grids.py)."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
from jqtest.gptqdata import N, correlated_hessian, jitted, objective, rtn_jit, run, stored_codes, weight

from jq.algorithms import METHODS
from jq.algorithms import GPTQ, HQQFit, LeastSquaresRefit
from jq.algorithms.gptq import gptq
from jq.numbers.scheme import Scheme


# -- the reference --------------------------------------------------------------------------------------------


def np_grid(x: np.ndarray, bits: int, sym: bool, scale_dtype=np.float32, tensor=False):
    """min-max grid over the rows of x [rows, N] (jq's conventions): scale [N], zero [N] or None; one range
    for all of x if `tensor`."""
    lo, hi = x.min(0), x.max(0)
    if tensor:
        lo, hi = np.full_like(lo, lo.min()), np.full_like(hi, hi.max())
    if sym:
        s = (np.maximum(np.abs(lo), np.abs(hi)) / ((2**bits - 1) / 2)).astype(scale_dtype).astype(np.float64)
        return np.where(s > 0, s, 1.0), None
    lo, hi = np.minimum(lo, 0), np.maximum(hi, 0)
    s = ((hi - lo) / (2**bits - 1)).astype(scale_dtype).astype(np.float64)
    s = np.where(s > 0, s, 1.0)
    return s, np.clip(np.round(-lo / s), 0, 2**bits - 1)


def np_quant(w: np.ndarray, s, z, bits: int, sym: bool):
    """Codes and dequantized values of one channel w [N]."""
    if sym:
        c = np.clip(np.round(w / s), -(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
        return c, c * s
    c = np.clip(np.round(w / s + z), 0, 2**bits - 1)
    return c, (c - z) * s


def ref_gptq(ws, h, real, *, bits, sym, g=None, act_order=False, static_groups=False, damp=0.01,
             scale_dtype=np.float32, tensor=False, order=None):
    """GPTQ as published, in float64, one channel at a time.

    ws: [Kp, N] weight in the stored flat view (zero rows at padding); h: [K, K] Hessian of the real inputs;
    real: [K] positions of the real inputs in ws. g None = per-channel (or per-tensor) grid. Returns (stored
    codes [Kp, N] (in processing order when act-order groups store a permutation), scales [Kp/g or 1, N],
    zeros or None, perm or None, dequantized weight in the original order [Kp, N], the objective Σ e²).
    `order` (act-order only): the processing order of the stored rows, instead of descending diag H.
    """
    ws, h = ws.astype(np.float64).copy(), h.astype(np.float64).copy()
    kp, k = ws.shape[0], h.shape[0]
    d = np.diag(h).copy()  # dead inputs (d = 0) are left to the damping: decoupled, rounded without feedback
    lam = damp * d.mean()
    pads = np.setdiff1d(np.arange(kp), real)
    hp = np.eye(kp) * d.mean()
    hp[np.ix_(real, real)] = h
    if order is None:
        order = np.concatenate([real[np.argsort(-d, kind="stable")], pads]) if act_order else np.arange(kp)
    store_perm = act_order and g is not None and not static_groups
    if g is None:
        fixed = np_grid(ws, bits, sym, scale_dtype, tensor)
    elif static_groups:
        tab = [np_grid(ws[i : i + g], bits, sym, scale_dtype) for i in range(0, kp, g)]
    w, hp = ws[order], hp[np.ix_(order, order)] + lam * np.eye(kp)
    u = np.linalg.cholesky(np.linalg.inv(hp)).T  # upper, uᵀu = H⁻¹
    codes, deq = np.zeros_like(w), np.zeros_like(w)
    scales, zeros, obj = [], [], 0.0
    is_real = np.isin(order, real)
    for j in range(kp):
        if g is None:
            s, z = fixed
        elif static_groups:
            s, z = tab[order[j] // g]
        elif j % g == 0:
            s, z = np_grid(w[j : j + g], bits, sym, scale_dtype)
            scales.append(s)
            zeros.append(z)
        c, q = np_quant(w[j], s, z, bits, sym)
        e = (w[j] - q) / u[j, j]
        w[j:] -= np.outer(u[j, j:], e)
        codes[j], deq[j] = c, q
        obj += (e**2).sum() * is_real[j]
    if g is None:
        scales, zeros = [fixed[0]], [fixed[1]]
    elif static_groups:
        scales, zeros = [t[0] for t in tab], [t[1] for t in tab]
    inv = np.argsort(order)
    perm = None
    if store_perm:
        perm = order[:k]
    else:
        codes, deq = codes[inv], deq[inv]
    deq_orig = deq if not store_perm else deq[inv]
    return codes, np.stack(scales), None if sym else np.stack(zeros), perm, deq_orig, obj


# -- agreement with the reference ----------------------------------------------------------------------------
# Each configuration compiles once (~1 s); the property tests below reuse these (same scheme, options, shapes).

CASES = {
    # name: (K, scheme kwargs, gptq options)
    "channel asym, block not dividing K": (96, dict(format="int4", symmetric=False), dict(block_size=40)),
    "channel sym act_order": (128, dict(format="int4"), dict(block_size=32, act_order=True)),
    "tensor sym int3": (128, dict(format="int3", granularity="tensor"), dict(block_size=32)),
    "g32 asym": (128, dict(format="int4", symmetric=False, group_size=32), dict(block_size=64)),
    "g32 sym int3 static, fp16 scales, block 48": (
        128, dict(format="int3", group_size=32, scale_dtype="float16"), dict(block_size=48, static_groups=True)),
    "g64 groups larger than blocks": (192, dict(format="int4", symmetric=False, group_size=64), dict(block_size=16)),
    "g32 act_order": (128, dict(format="int4", symmetric=False, group_size=32), dict(block_size=64, act_order=True)),
    "g32 act_order static": (128, dict(format="int4", symmetric=False, group_size=32),
                             dict(block_size=64, act_order=True, static_groups=True)),
    "padded g32 act_order": (100, dict(format="int4", symmetric=False, group_size=32, pad=True),
                             dict(block_size=32, act_order=True)),
}


def case(name: str):
    k, skw, opts = CASES[name]
    return k, Scheme(**{"scale_dtype": "float32", **skw}), opts


@pytest.mark.parametrize("name", list(CASES))
def test_matches_numpy_reference(name):
    k, scheme, opts = case(name)
    h, w = correlated_hessian(k), weight(k)
    q, info = run(w, scheme, h, **opts)
    q.check()
    kp = q.layout.stored_shape[0]
    ws = np.zeros((kp, N), np.float32)
    ws[:k] = w
    codes, scales, zeros, perm, deq, obj = ref_gptq(
        ws, h, np.arange(k), bits=scheme.bits, sym=scheme.symmetric, g=scheme.group_size,
        act_order=opts.get("act_order", False), static_groups=opts.get("static_groups", False),
        scale_dtype=np.dtype(scheme.scale_dtype), tensor=scheme.granularity == "tensor")
    assert (q.perm is None) == (perm is None)
    if perm is not None:
        np.testing.assert_array_equal(np.asarray(q.perm), perm)
    got = stored_codes(q)
    mismatch = np.mean(got[:k] != codes[:k])
    assert mismatch < 0.01, f"{mismatch:.2%} of codes differ from the reference"
    ok_cols = np.all(got[:k] == codes[:k], axis=0)  # a rounding tie flips the rest of its output column
    assert ok_cols.mean() > 0.9
    sc = np.broadcast_to(np.asarray(q.scale, np.float64).reshape(-1, q.scale.shape[-1]), scales.shape)
    np.testing.assert_allclose(sc[:, ok_cols], scales[:, ok_cols], rtol=1e-3)
    if zeros is not None:
        zq = np.broadcast_to(np.asarray(q.zero, np.float64).reshape(-1, q.zero.shape[-1]), zeros.shape)
        np.testing.assert_array_equal(zq[:, ok_cols], zeros[:, ok_cols])
    deq_q = np.asarray(q.dequantize())  # un-permuted, padding dropped
    assert deq_q.shape == w.shape
    np.testing.assert_allclose(deq_q[:, ok_cols], deq[:k][:, ok_cols], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(float(info["err"]), obj, rtol=1e-2)
    assert not bool(info["fallback"]) and float(info["damp"]) == pytest.approx(0.01)


def test_padded_rows_stay_zero_and_act_order_dequantizes_unpermuted():
    k, scheme, opts = case("padded g32 act_order")
    q, _ = run(weight(k), scheme, correlated_hessian(k), **opts)
    perm = np.asarray(q.perm)
    assert sorted(perm.tolist()) == list(range(k)) and not np.array_equal(perm, np.arange(k))
    c = stored_codes(q)
    zero = np.repeat(np.asarray(q.zero, np.float64), 32, axis=0)
    np.testing.assert_array_equal(c[k:], zero[k:])  # padded rows hold exact zeros
    # dequantize() undoes the permutation: stored row j is input channel perm[j]
    deq_stored = (c - zero) * np.repeat(np.asarray(q.scale, np.float64), 32, axis=0)
    np.testing.assert_allclose(np.asarray(q.dequantize())[perm], deq_stored[:k], rtol=1e-6)


def test_multi_axis_kernel_matches_flattened():
    """A DenseGeneral kernel (heads, head_dim, out) with axes (0, 1): the same as the (heads·head_dim, out) one."""
    k, scheme, opts = case("g32 act_order static")
    h, w = correlated_hessian(k), weight(k)
    q2, _ = run(w, scheme, h, **opts)
    q3, _ = run(w.reshape(4, 32, N), scheme, h, axes=(0, 1), **opts)
    assert q3.scale.shape == (4, 1, N)
    np.testing.assert_array_equal(np.asarray(q3.dequantize()).reshape(k, N), np.asarray(q2.dequantize()))
    # padded head_dim: padding is per head, in the middle of the flattened inputs
    w3, hh = w[:120].reshape(4, 30, N), h[:120, :120]
    q, info = run(w3, dataclasses.replace(scheme, pad=True, group_size=16), hh, axes=(0, 1), block_size=32)
    real = (np.arange(4)[:, None] * 32 + np.arange(30)[None]).ravel()
    ws = np.zeros((128, N), np.float32)
    ws[real] = w3.reshape(120, N)
    codes, *_, deq, obj = ref_gptq(ws, hh, real, bits=4, sym=False, g=16)
    assert np.mean(stored_codes(q) != codes) < 0.01
    np.testing.assert_allclose(float(info["err"]), obj, rtol=1e-2)


def test_act_order_groups_over_several_contraction_axes_share_one_order_of_the_group_axis():
    """o_proj-like (heads, head_dim, out) with groups along head_dim: the stored permutation orders head_dim by diag H
    summed over heads, and the pass runs head by head in that order — the NumPy reference given that order."""
    heads, hd = 4, 32
    k, scheme, opts = case("g32 act_order")
    h, w = correlated_hessian(k), weight(k)
    q, info = run(w.reshape(heads, hd, N), dataclasses.replace(scheme, group_size=16), h, axes=(0, 1), **opts)
    shared = np.argsort(-np.diag(h).reshape(heads, hd).sum(0), kind="stable")
    np.testing.assert_array_equal(np.asarray(q.perm), shared)
    order = (np.arange(heads)[:, None] * hd + shared).ravel()
    codes, scales, zeros, perm, deq, obj = ref_gptq(w, h, np.arange(k), bits=4, sym=False, g=16, act_order=True,
                                                    order=order)
    assert np.mean(stored_codes(q) != codes) < 0.01
    np.testing.assert_allclose(np.asarray(q.dequantize()).reshape(k, N), deq, rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(float(info["err"]), obj, rtol=1e-2)
    # and it does what act-order is for: lower error than the same groups in the original order
    _, plain = run(w.reshape(heads, hd, N), dataclasses.replace(scheme, group_size=16), h, axes=(0, 1))
    assert float(info["err"]) < float(plain["err"])


# -- properties -----------------------------------------------------------------------------------------------


def test_beats_rtn_on_correlated_inputs():
    k, scheme, opts = case("g32 act_order")
    h, w = correlated_hessian(k, seed=3), weight(k, seed=4)
    q, info = run(w, scheme, h, **opts)
    r = rtn_jit(jnp.asarray(w), scheme, scheme.layout(w.shape, (0,)))
    e_gptq, e_rtn = objective(w, q.dequantize(), h), objective(w, r.dequantize(), h)
    assert e_gptq < 0.6 * e_rtn, (e_gptq, e_rtn)
    # the reported objective is tr((W−Q)ᵀ(H+λI)(W−Q))
    lam = 0.01 * np.mean(np.diag(h))
    d = np.asarray(q.dequantize(), np.float64) - w
    assert float(info["err"]) == pytest.approx(e_gptq + lam * np.sum(d * d), rel=1e-3)


@pytest.mark.parametrize("skw,opts", [
    (dict(format="int3", symmetric=False, group_size=32, range="mse", mse_grid=20), dict(block_size=16)),
    (dict(format="nf4", group_size=32), dict(act_order=True, static_groups=True)),
    (dict(format="fp8_e4m3", scale_dtype="float32"), dict(act_order=True)),
])
def test_diagonal_hessian_equalsrtn_jit(skw, opts):
    """Without correlations the error feedback vanishes: GPTQ's codes and grids are RTN's."""
    k = 96
    scheme, w = Scheme(**skw), weight(k)
    # act-order with distinct diagonals reorders the groups; with equal ones the order is the identity
    d = np.ones(k) if opts.get("act_order") else np.random.default_rng(5).uniform(0.5, 2.0, k)
    q, info = run(w, scheme, np.diag(d).astype(np.float32), **opts)
    r = rtn_jit(jnp.asarray(w), scheme, scheme.layout(w.shape, (0,)))
    assert q.perm is None or np.array_equal(np.asarray(q.perm), np.arange(k))
    np.testing.assert_array_equal(np.asarray(q.unpacked_codes()), np.asarray(r.unpacked_codes()))
    np.testing.assert_array_equal(np.asarray(q.scale), np.asarray(r.scale))
    np.testing.assert_array_equal(np.asarray(q.dequantize()), np.asarray(r.dequantize()))
    assert not bool(info["fallback"])


@pytest.mark.parametrize("name", ["g32 asym", "g32 act_order", "g32 act_order static"])
def test_dead_inputs_are_rounded_not_zeroed_and_counted(name):
    """An input no calibration token fired keeps its weights (rounded on its group's grid, with no feedback in
    or out) instead of the published code's zero row, which is wrong wherever the input is live; the count is
    reported. Live rows match the NumPy transcription of the algorithm."""
    k, scheme, opts = case(name)
    h = correlated_hessian(k)
    dead = np.array([3, 17, 40, 127])
    h[dead, :] = 0.0
    h[:, dead] = 0.0
    w = weight(k)
    q, info = run(w, scheme, h, **opts)
    deq = np.asarray(q.dequantize())
    codes = np.asarray(q.unpacked_codes()).astype(np.float64)
    scale = np.repeat(np.asarray(q.scale, np.float64), 32, axis=0)
    zero = np.repeat(np.asarray(q.zero, np.float64), 32, axis=0)
    rows = np.argsort(np.asarray(q.perm))[dead] if q.perm is not None else dead  # stored position of each dead row
    np.testing.assert_array_equal(codes[rows], np.clip(np.round(w[dead] / scale[rows] + zero[rows]), 0, 15))
    assert np.all(np.abs(deq[dead]).sum(1) > 0)
    ref = ref_gptq(w, h, np.arange(k), bits=4, sym=False, g=32, act_order=opts.get("act_order", False),
                   static_groups=opts.get("static_groups", False))
    assert np.mean(stored_codes(q) != ref[0]) < 0.01
    assert int(info["dead"]) == len(dead) and not bool(info["no_data"])
    assert np.isfinite(float(info["err"])) and not bool(info["fallback"])


def test_indefinite_hessian_raises_damping():
    k, scheme, opts = case("channel sym act_order")
    v = np.random.default_rng(0).standard_normal(k)
    v /= np.linalg.norm(v)
    h = (np.eye(k) - 1.5 * np.outer(v, v)).astype(np.float32)  # one eigenvalue −0.5, diagonal positive
    assert np.all(np.diag(h) > 0)
    q, info = run(weight(k), scheme, h, **opts)
    assert not bool(info["fallback"])
    assert float(info["damp"]) == pytest.approx(1.0)  # 0.01 and 0.1 fail, 1.0 (× mean diag ≈ 1) succeeds
    assert np.all(np.isfinite(np.asarray(q.dequantize())))


@pytest.mark.parametrize("h_kind", ["negative", "nan", "zero", "count0"])
def test_hopeless_hessian_falls_back_tortn_jit(h_kind):
    k, scheme, opts = case("g32 act_order")
    w = weight(k)
    h = {"negative": -np.eye(k), "nan": np.full((k, k), np.nan), "zero": np.zeros((k, k)),
         "count0": correlated_hessian(k)}[h_kind].astype(np.float32)
    layout = scheme.layout(w.shape, (0,))
    stats = {"hessian": jnp.asarray(h)}
    if h_kind == "count0":
        stats["count"] = jnp.float32(0.0)
    q, info = jitted(**opts)(jnp.asarray(w), scheme, layout, stats)
    assert bool(info["fallback"])
    assert q.perm is None or np.array_equal(np.asarray(q.perm), np.arange(k))
    r = rtn_jit(jnp.asarray(w), scheme, layout)
    np.testing.assert_array_equal(np.asarray(q.dequantize()), np.asarray(r.dequantize()))


def test_compiles_at_two_sizes_keeps_dtype_and_registers():
    assert METHODS["gptq"].needs_calibration and METHODS["gptq"].reports_info
    assert METHODS["gptq"].build(hqq={"p": 1.0}, refit=True) == GPTQ(grid=HQQFit(p=1.0), refit=LeastSquaresRefit())
    _, scheme, opts = case("g64 groups larger than blocks")
    for k, dt in ((192, jnp.float32), (64, jnp.bfloat16)):
        w = jnp.asarray(weight(k), dt)
        q, _ = jitted(**opts)(w, scheme, scheme.layout(w.shape, (0,)), {"hessian": correlated_hessian(k)})
        assert q.shape == (k, N) and q.dtype == jnp.dtype(dt).name and q.dequantize().dtype == dt
        assert np.all(np.isfinite(np.asarray(q.dequantize(), np.float32)))


def test_refusals():
    w = jnp.asarray(weight(64))
    h = {"hessian": jnp.asarray(correlated_hessian(64))}
    flat = Scheme("int4", group_size=32, flat_groups=True)
    with pytest.raises(ValueError, match="pad: true"):
        gptq(w, flat, flat.layout(w.shape, (0,)), h)
    s = Scheme("int4")
    with pytest.raises(ValueError, match=r"capture this layer's inputs, or use method: rtn"):  # K = N, H is 64 x 64
        gptq(w, s, s.layout(w.shape, (1,)), h)
    with pytest.raises(ValueError, match=r"\(64, 64\)"):
        gptq(w, s, s.layout(w.shape, (0,)), {"hessian": jnp.eye(32)})
    with pytest.raises(ValueError, match="hessian"):
        gptq(w, s, s.layout(w.shape, (0,)), None)


def test_tree_level_gptq_warns_naming_the_layer_on_raised_damping_and_fallback():
    import warnings

    import jq

    rng = np.random.default_rng(0)
    w = jnp.asarray(rng.normal(size=(64, 16)), jnp.float32)
    rule = jq.Rule(".*", jq.Scheme("int4", symmetric=False, group_size=32), method="gptq")
    bad = -np.eye(64, dtype=np.float32)  # negative definite: no damping makes it factorable
    with pytest.warns(UserWarning, match=r"blk_7/mlp/kernel: gptq failed .* fell back to RTN"):
        jq.tree.quantize.quantize_leaf("blk_7/mlp/kernel", w, rule, {"hessian": jnp.asarray(bad)})
    x = rng.normal(size=(256, 64)).astype(np.float32)
    h = x.T @ x / 256
    h[5, 5] = -1.0  # indefinite until damped harder than the default
    with pytest.warns(UserWarning, match=r"blk_2/attn/kernel: gptq raised the relative damping"):
        jq.tree.quantize.quantize_leaf("blk_2/attn/kernel", w, rule, {"hessian": jnp.asarray(h)})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        jq.tree.quantize.quantize_leaf("blk_0/ok/kernel", w, rule, {"hessian": jnp.asarray(x.T @ x / 256)})
    x[:, 40:60] = 0.0  # 20 of 64 inputs never fire on this calibration set
    with pytest.warns(UserWarning, match=r"blk_3/mlp/kernel: 20 input channel\(s\) never fired on the calibration "
                                         r"data.*Calibrate on more or other data"):
        q = jq.tree.quantize.quantize_leaf("blk_3/mlp/kernel", w, rule, {"hessian": jnp.asarray(x.T @ x / 256)})
    assert np.all(np.abs(np.asarray(q.dequantize())[40:60]).sum(1) > 0)  # kept, not zeroed
    with pytest.warns(UserWarning, match=r"blk_4/mlp/kernel: no calibration signal reached this layer") as rec:
        jq.tree.quantize.quantize_leaf("blk_4/mlp/kernel", w, rule, {"hessian": jnp.zeros((64, 64)), "count": 512.0})
    assert not any("not positive definite" in str(r.message) for r in rec)


def test_contraction_axes_that_do_not_lead_are_moved_to_the_front_and_back():
    """A weight stored (N, K) (contraction on axis 1) quantizes as its transpose (K, N) would, codes and scales
    restored to the stored layout."""
    w = jnp.asarray(weight(64))                                   # [64, N]: as stored, K = N along axis 1
    h = {"hessian": jnp.asarray(correlated_hessian(N))}
    s = Scheme("int4", group_size=16)
    q_t = gptq(w, s, s.layout(w.shape, (1,)), h)
    q_ref = gptq(w.T, s, s.layout(w.T.shape, (0,)), h)
    np.testing.assert_array_equal(np.asarray(q_t.dequantize()), np.asarray(q_ref.dequantize()).T)
