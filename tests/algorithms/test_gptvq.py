"""GPTVQ (`method: gptvq`, jq.algorithms.gptvq): the vector error-feedback pass and the table update against NumPy
references, shared-table QTensors (lookup, checkpoint), the gain over plain assignment and over scalar GPTQ at the
same bits, determinism, a layer no token reached, and the refusals."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jq
from jq.algorithms.codebook_feedback import feedback_assign, inverse_hessian_factor
from jq.algorithms.gptq import GPTQ
from jq.algorithms.gptvq import GPTVQ, gptvq, layer_objective, refit_scales, update_tables
from jq.algorithms.stats import LayerStats
from jq.numbers.scheme import Scheme
from jq.tree.quantize import quantize_leaf, quantize_params
from jq.tree.recipe import recipe_from_dict

RECIPES = __import__("pathlib").Path(__file__).resolve().parents[2] / "configs"


def _problem(K=64, N=24, seed=3):
    kx, kw = jax.random.split(jax.random.key(seed))
    x = jax.random.normal(kx, (2048, K)) @ (0.4 * jax.random.normal(kw, (K, K)) + jnp.eye(K))
    w = 0.05 * jax.random.normal(kw, (K, N))
    return w, x, LayerStats(hessian=x.T @ x / x.shape[0])


def np_vector_feedback(w: np.ndarray, tables: np.ndarray, rows: int, u: np.ndarray, d: int) -> np.ndarray:
    """Reference pass without lazy blocks (float64): tables [G, N, C, d] per group of `rows` rows; each step picks,
    per column, the entry minimising ‖U_vv⁻ᵀ (w_v − c)‖², then fixes the d rows one by one feeding errors forward."""
    W = w.astype(np.float64).copy()
    K, N = W.shape
    idx = np.zeros((K // d, N), np.int64)
    for s in range(0, K, d):
        t = tables[s // rows].astype(np.float64)  # [N, C, d]
        lt = np.linalg.inv(u[s:s + d, s:s + d].T)
        a = W[s:s + d].T @ lt.T  # [N, d]
        tt = t @ lt.T
        i = ((a[:, None, :] - tt) ** 2).sum(-1).argmin(-1)
        q = t[np.arange(N), i].T  # [d, N]
        for r in range(d):
            e = (W[s + r] - q[r]) / u[s + r, s + r]
            W[s + r + 1:] -= np.outer(u[s + r, s + r + 1:], e)
        idx[s // d] = i
    return idx


@pytest.mark.parametrize("d", [1, 2, 4])
def test_vector_feedback_matches_a_numpy_pass(d):
    w, _, stats = _problem()
    u = inverse_hessian_factor(stats.hessian, 0.01)
    tables = 0.05 * jax.random.normal(jax.random.key(9), (4, 24, 8, d))  # groups of 16 rows, a table per column
    got, aux, _ = feedback_assign(w, u, d, 16, lambda b, wb: (tables[b], b))
    ref = np_vector_feedback(np.asarray(w), np.asarray(tables), 16, np.asarray(u, np.float64), d)
    assert got.shape == (64 // d, 24) and np.array_equal(np.asarray(aux), np.arange(4))
    assert (np.asarray(got) == ref).mean() > 0.97  # float32 near a tie may flip a few, never many


def test_table_update_solves_the_least_squares_problem():
    w, _, stats = _problem(K=32, N=8)
    G, C, d = 2, 4, 2
    rng = np.random.default_rng(0)
    idx = rng.integers(0, C, (32 // d, 8))
    scale = rng.uniform(0.5, 2, (G, 8)).astype(np.float32)
    t0 = jnp.zeros((G, C, d))
    got = np.asarray(update_tables(w, stats.hessian, jnp.asarray(idx), t0, jnp.asarray(scale), 200))
    # dense P: Ŵ.ravel() = P c.ravel()
    P = np.zeros((32 * 8, G * C * d))
    for k in range(32):
        for n in range(8):
            P[k * 8 + n, ((k // 16) * C + idx[k // d, n]) * d + k % d] = scale[k // 16, n]
    H = np.kron(np.asarray(stats.hessian, np.float64), np.eye(8))  # vec(W) row-major: (k, n) → k·8 + n
    A, b = P.T @ H @ P, P.T @ H @ np.asarray(w, np.float64).ravel()
    used = np.abs(np.diag(A)) > 0
    ref = np.zeros(G * C * d)
    ref[used] = np.linalg.solve(A[np.ix_(used, used)], b[used])
    np.testing.assert_allclose(got.ravel()[used], ref[used], rtol=2e-3, atol=2e-4)
    assert np.all(got.ravel()[~used] == 0)  # entries no weight uses keep their values


def test_scale_refit_solves_each_columns_least_squares_problem():
    w, _, stats = _problem(K=32, N=8)
    G, C, d = 4, 4, 2
    rng = np.random.default_rng(1)
    idx = rng.integers(0, C, (32 // d, 8))
    tables = rng.normal(size=(G, C, d)).astype(np.float32)
    scale = np.full((G, 8), 0.01, np.float32)
    got = np.asarray(refit_scales(w, stats.hessian, jnp.asarray(idx), jnp.asarray(tables), jnp.asarray(scale)))
    H, W = np.asarray(stats.hessian, np.float64), np.asarray(w, np.float64)
    for n in range(8):
        D = np.zeros((32, G))
        for k in range(32):
            D[k, k // 8] = tables[k // 8, idx[k // d, n], k % d]
        ref = np.linalg.solve(D.T @ H @ D, D.T @ H @ W[:, n])
        np.testing.assert_allclose(got[:, n], ref, rtol=2e-3, atol=1e-5)


def test_refit_and_act_order_options():
    w, _, stats = _problem()
    s = Scheme("cb6x2", group_size=32)
    lay, h = s.layout(w.shape, (0,)), stats.hessian
    base = gptvq(w, s, lay, stats)
    refit = gptvq(w, s, lay, stats, refit=True)
    assert layer_objective(w, refit.dequantize(), h) <= layer_objective(w, base.dequantize(), h) * 1.001
    ao = GPTVQ(act_order=True).quantize(w, s, lay, stats)
    order = np.argsort(-np.diag(np.asarray(h)), kind="stable")
    assert np.array_equal(np.asarray(ao.perm), order)  # stored rows = W[perm]; dequantize undoes it
    np.testing.assert_allclose(np.asarray(ao.dequantize())[order], np.asarray(dataclasses.replace(
        ao, perm=None).dequantize()), rtol=0, atol=0)
    assert layer_objective(w, ao.dequantize(), h) < 0.5 * layer_objective(w, jnp.zeros_like(w), h)


@pytest.mark.parametrize("fmt,g", [("cb6x2", 32), ("cb4x2", 16), ("cb8x4", 64), ("cb3", 32)])
def test_gptvq_beats_plain_assignment_and_is_deterministic(fmt, g):
    w, _, stats = _problem()
    s = Scheme(fmt, group_size=g)
    lay = s.layout(w.shape, (0,))
    h = stats.hessian
    q = gptvq(w, s, lay, stats)
    q.check()
    assert q.codebook.shape == (64 // g, 1, 2**s.fmt.bits, s.fmt.vec) and q.scale.shape == (64 // g, 24)
    plain = gptvq(w, s, lay, None, update_iters=0)  # H = I: nearest vectors, no feedback
    assert layer_objective(w, q.dequantize(), h) < 0.9 * layer_objective(w, plain.dequantize(), h)
    no_update = gptvq(w, s, lay, stats, update_iters=0)
    assert layer_objective(w, q.dequantize(), h) <= layer_objective(w, no_update.dequantize(), h) * 1.001
    again = gptvq(w, s, lay, stats)
    for f in ("codes", "scale", "codebook"):
        assert np.asarray(getattr(q, f)).tobytes() == np.asarray(getattr(again, f)).tobytes()


def test_vectors_beat_scalar_gptq_at_the_same_bits():
    w, _, stats = _problem(K=128, N=256)
    h = stats.hessian
    vq = GPTVQ().quantize(w, s := Scheme("cb6x2", group_size=64), s.layout(w.shape, (0,)), stats)
    si = Scheme("int3", group_size=64, symmetric=False)
    sq = GPTQ().quantize(w, si, si.layout(w.shape, (0,)), stats)
    assert vq.bits_per_weight <= sq.bits_per_weight  # 3 + 0.25 scales + 0.125 tables = 3.375 both
    assert layer_objective(w, vq.dequantize(), h) < 0.85 * layer_objective(w, sq.dequantize(), h)


def test_shared_tables_dequantize_as_the_numpy_lookup_and_round_trip_a_checkpoint(tmp_path):
    w, _, stats = _problem(K=48, N=6)
    s = Scheme("cb3x2", group_size=16)
    q = gptvq(w, s, s.layout(w.shape, (0,)), stats)
    idx = np.asarray(q.unpacked_codes())  # [24, 6]
    cb, sc = np.asarray(q.codebook, np.float32), np.asarray(q.scale, np.float32)
    ref = np.array([[cb[k // 16, 0, idx[k // 2, n], k % 2] * sc[k // 16, n] for n in range(6)] for k in range(48)])
    np.testing.assert_array_equal(np.asarray(q.dequantize()), ref.astype(np.float32))
    assert q.nbytes == q.codes.nbytes + q.scale.nbytes + q.codebook.nbytes  # honest bits: tables counted once

    from jq import checkpoint as ck

    ck.save(tmp_path / "ck", {"a": {"kernel": q}})
    back, _ = ck.load(tmp_path / "ck")
    got = back["a"]["kernel"]
    for f in ("codes", "scale", "codebook"):
        assert np.asarray(getattr(got, f)).tobytes() == np.asarray(getattr(q, f)).tobytes()


def test_int8_tables_halve_the_table_bits_at_almost_the_same_error(tmp_path):
    w, _, stats = _problem(K=64, N=8)
    s = Scheme("cb6x2", group_size=32)
    lay = s.layout(w.shape, (0,))
    f16 = GPTVQ(refit=True).quantize(w, s, lay, stats)
    i8 = GPTVQ(refit=True, int8_tables=True).quantize(w, s, lay, stats)
    assert i8.codebook.dtype == jnp.int8 and f16.codebook.dtype == jnp.float16
    assert f16.bits_per_weight - i8.bits_per_weight == pytest.approx(8 * 64 * 2 * 2 / (64 * 8))
    obj = lambda q: float(layer_objective(w, q.dequantize(), stats.hessian))  # noqa: E731
    assert obj(i8) < 1.02 * obj(f16)
    idx = np.asarray(i8.unpacked_codes())  # [32, 8]: the lookup reads int8 entries times the folded scales
    cb, sc = np.asarray(i8.codebook, np.float32), np.asarray(i8.scale, np.float32)
    ref = np.array([[cb[k // 32, 0, idx[k // 2, n], k % 2] * sc[k // 32, n] for n in range(8)] for k in range(64)])
    np.testing.assert_array_equal(np.asarray(i8.dequantize()), ref.astype(np.float32))
    from jq import checkpoint as ck

    ck.save(tmp_path / "ck", {"a": {"kernel": i8}})
    back = ck.load(tmp_path / "ck")[0]["a"]["kernel"]
    assert back.codebook.dtype == jnp.int8
    np.testing.assert_array_equal(np.asarray(back.dequantize()), np.asarray(i8.dequantize()))


def test_a_recipe_on_a_tree_and_a_layer_no_token_reached():
    w, _, stats = _problem()
    cfg = recipe_from_dict({"name": "x", "rules": [{"pattern": ".*kernel", "method": "gptvq", "format": "cb4x2",
                                                    "group_size": 32, "options": {"iters": 10}}]})
    out = quantize_params({"a": {"kernel": w, "bias": jnp.zeros(24)}}, cfg, {"a/kernel": stats})
    assert out["a"]["kernel"].fmt == "cb4x2" and out["a"]["bias"].shape == (24,)
    dead = LayerStats(hessian=jnp.zeros((64, 64)), count=jnp.asarray(0.0))
    with pytest.warns(UserWarning, match="unweighted gptvq"):
        q = quantize_leaf("a/kernel", w, cfg.rules[0], dead)
    assert np.isfinite(np.asarray(q.dequantize())).all()
    for name in ("gptvq_w3", "quarot_gptvq_w3", "quarot_gptvq_w2"):
        r = jq.load_recipe(RECIPES / f"{name}.yaml").rules[0]
        assert r.method == "gptvq" and 576 % r.scheme.group_size == 0 and 1536 % r.scheme.group_size == 0


def test_refusals_name_the_leaf_value_and_fix():
    w, _, stats = _problem()

    def run(fmt, shape=(64, 24), **kw):
        cfg = recipe_from_dict({"name": "x", "rules": [{"pattern": ".*kernel", "method": "gptvq", "format": fmt,
                                                        **kw}]})
        arr = jnp.ones(shape)
        st = LayerStats(hessian=jnp.eye(shape[0])) if len(shape) == 2 else None
        return quantize_params({"a": {"kernel": arr}}, cfg, {"a/kernel": st})

    with pytest.raises(ValueError, match=r"a/kernel: format 'int4' is not a learned codebook"):
        run("int4")
    with pytest.raises(ValueError, match=r"a/kernel: gptvq needs a kernel \[K, N\] .* padded"):
        run("cb2x2", (60, 4), group_size=16, pad=True)
    with pytest.raises(ValueError, match=r"a/kernel: gptvq needs .* tensor"):
        run("cb2x2", granularity="tensor")
    with pytest.raises(ValueError, match=r"a/kernel: gptvq: a codebook of 256 entries for only 32 vectors"):
        run("cb8x4", (16, 8), granularity="channel")
    with pytest.raises(ValueError, match="do not divide groups of 6"):
        run("cb2x4", (60, 4), group_size=6)
    for bad in (dict(iters=0), dict(update_iters=-1), dict(damp=0), dict(iters=True), dict(refit=1),
                dict(act_order="yes"), dict(int8_tables=1)):
        with pytest.raises(ValueError, match="method 'gptvq': option"):
            GPTVQ(**bad)


@pytest.mark.parametrize("rule", [{"method": "gptvq", "format": "cb4x2", "group_size": 8, "options": {"iters": 8}},
                                  {"method": "quip", "format": "e8p", "granularity": "channel"}])  # higgs: same wrapper
def test_n_d_and_transposed_kernels_equal_the_flattened_matrix(tmp_path, rule):
    """A DenseGeneral kernel [heads, head_dim, out_a, out_b] contracting (0, 1) is quantized as its [K, N] matrix
    (groups within head_dim are the same rows), stored in its own layout, and runs through qeinsum; so are kernels
    whose contraction axis does not lead (einsum [heads, d_model, head_dim], a transposed [out, in] matrix)."""
    w, _, stats = _problem(K=64, N=24)
    wn = w.reshape(4, 16, 6, 4)
    one = recipe_from_dict({"name": "x", "rules": [{"pattern": ".*", **rule}]}).rules[0]
    nd = recipe_from_dict({"name": "x", "rules": [{"pattern": ".*", "axes": [0, 1], **rule}]}).rules[0]
    q2, qn = quantize_leaf("a/kernel", w, one, stats), quantize_leaf("a/kernel", wn, nd, stats)
    assert qn.shape == (4, 16, 6, 4) and qn.layout.axes == (0, 1)
    np.testing.assert_array_equal(np.asarray(qn.dequantize()), np.asarray(q2.dequantize()).reshape(4, 16, 6, 4))
    assert qn.nbytes == q2.nbytes
    x = jax.random.normal(jax.random.key(2), (3, 4, 16))
    np.testing.assert_allclose(np.asarray(jq.ops.qeinsum("bhd,hdij->bij", x, qn)),
                               np.asarray(x.reshape(3, 64) @ q2.dequantize()).reshape(3, 6, 4), rtol=1e-4, atol=1e-5)
    from jq import checkpoint as ck

    ck.save(tmp_path / "ck", {"a": {"kernel": qn}})
    np.testing.assert_array_equal(np.asarray(ck.load(tmp_path / "ck")[0]["a"]["kernel"].dequantize()),
                                  np.asarray(qn.dequantize()))
    # contraction axes that do not lead: an einsum kernel [heads, d_model, head_dim] contracting d_model (and, for
    # one method, a PyTorch-style [out, in] matrix contracting axis 1) — the same groups and codes, transposed
    got = {}
    cases = (((4, 64, 6), (1, 0, 2)),) + ((((24, 64), (1, 0)),) if rule["method"] == "quip" else ())
    for shape, order in cases:
        rule_t = recipe_from_dict({"name": "x", "rules": [{"pattern": ".*", "axes": [1], **rule}]}).rules[0]
        moved = tuple(shape[i] for i in order)  # the shape with the contraction axis first
        got[shape] = qt = quantize_leaf("a/kernel", jnp.transpose(w.reshape(moved), np.argsort(order)), rule_t, stats)
        assert qt.shape == shape and qt.layout.axes == (1,) and qt.nbytes == q2.nbytes
        want = np.transpose(np.asarray(q2.dequantize()).reshape(moved), np.argsort(order))
        np.testing.assert_array_equal(np.asarray(qt.dequantize()), want)
    np.testing.assert_allclose(np.asarray(jq.ops.qeinsum("bd,ndh->bnh", x.reshape(3, 64), got[(4, 64, 6)])),
                               np.asarray(x.reshape(3, 64) @ q2.dequantize()).reshape(3, 4, 6), rtol=1e-4, atol=1e-5)
    if rule["method"] == "gptvq":
        bad = recipe_from_dict({"name": "x", "rules": [{"pattern": ".*", "axes": [0, 1], **rule,
                                                        "options": {"act_order": True}}]}).rules[0]
        with pytest.raises(ValueError, match=r"act_order on an N-D kernel \(shape \(4, 16, 6, 4\)\)"):
            quantize_leaf("a/kernel", wn, bad, stats)
