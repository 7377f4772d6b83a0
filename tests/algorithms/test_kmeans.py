"""Weighted k-means codebooks (`method: kmeans`, jq.algorithms.kmeans) against a NumPy Lloyd reference; weighting,
determinism, empty clusters, a tiny linen model through a recipe, and the refusals."""

from __future__ import annotations

import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jq
from jq.algorithms.kmeans import KMeans, _update, assign, kmeans, lloyd, quantile_init
from jq.algorithms.registry import get_method
from jq.algorithms.stats import LayerStats
from jq.numbers.scheme import Scheme
from jq.tree.quantize import quantize_leaf, quantize_params
from jq.tree.recipe import Rule, recipe_from_dict

RECIPES = __import__("pathlib").Path(__file__).resolve().parents[2] / "configs"


def np_lloyd(x: np.ndarray, w: np.ndarray, entries: int, iters: int) -> np.ndarray:
    """Reference weighted Lloyd on one table: x, w [n, d] (float32) → centroids [entries, d] (float64 sums)."""
    n = x.shape[0]
    key, wt = x.sum(-1), w.sum(-1)
    order = np.argsort(key, kind="stable")
    cdf = np.cumsum(wt[order], dtype=np.float32)
    targets = (np.arange(entries, dtype=np.float32) + np.float32(0.5)) / np.float32(entries) * cdf[-1]
    c = x[order[np.clip(np.searchsorted(cdf, targets, side="left"), 0, n - 1)]].astype(np.float64)
    for _ in range(iters):
        a = np.argmin((w[:, None, :] * (x[:, None, :] - c[None]) ** 2).sum(-1), axis=1)
        new = c.copy()
        den = np.zeros(entries)
        for k in range(entries):
            m = a == k
            den[k] = w[m].sum()
            if den[k] > 0:
                new[k] = (w[m] * x[m]).sum(0) / w[m].sum(0)
        err = (w * (x - new[a]) ** 2).sum(-1)
        worst = np.argsort(-err, kind="stable")
        for j, k in enumerate(np.flatnonzero(den <= 0)):  # empty clusters: the worst vectors, in order
            new[k] = x[worst[j]]
        c = new
    return c


@pytest.mark.parametrize("d", [1, 2])
def test_lloyd_matches_a_numpy_reference(d):
    rng = np.random.default_rng(0)
    x = rng.standard_t(4, (240, d)).astype(np.float32)
    w = rng.integers(1, 4, (240, d)).astype(np.float32)  # integer weights: the quantile init is exact in float32
    np.testing.assert_array_equal(np.asarray(quantile_init(jnp.asarray(x), jnp.asarray(w), 8)),
                                  np_lloyd(x, w, 8, 0).astype(np.float32))
    got = np.asarray(jax.jit(lloyd, static_argnums=(2, 3))(jnp.asarray(x), jnp.asarray(w), 8, 12))
    np.testing.assert_allclose(got, np_lloyd(x, w, 8, 12), rtol=1e-4, atol=1e-5)


def test_indices_point_at_the_nearest_stored_entry_and_tables_are_the_centroids():
    w = jax.random.normal(jax.random.key(1), (96, 6))
    s = Scheme("cb3")
    q = kmeans(w, s, s.layout(w.shape, (0,)), iters=10)
    q.check()
    stored = np.asarray(q.codebook, np.float32)[0, :, :, 0] * np.asarray(q.scale, np.float32)[0][:, None]  # [N, 8]
    deq = np.asarray(q.dequantize())
    ref = stored[np.arange(6), np.abs(np.asarray(w)[:, :, None] - stored[None]).argmin(-1)]  # nearest entry
    np.testing.assert_array_equal(deq, ref)
    cents = np.stack([np_lloyd(np.asarray(w)[:, n:n + 1], np.ones((96, 1), np.float32), 8, 10)[:, 0]
                      for n in range(6)])
    np.testing.assert_allclose(np.sort(stored, 1), np.sort(cents, 1), rtol=2e-3, atol=1e-3)  # float16 tables


def _weighted_problem():
    kx, kw = jax.random.split(jax.random.key(2))
    x = jax.random.normal(kx, (512, 64)) * jnp.exp(jnp.linspace(-2.0, 2.0, 64))  # inputs of very different energy
    w = jax.random.normal(kw, (64, 16))
    return w, LayerStats(hessian=x.T @ x / x.shape[0], count=jnp.asarray(512.0))


def test_weighting_by_the_hessian_diagonal_lowers_the_weighted_error():
    w, stats = _weighted_problem()
    s = Scheme("cb2")
    lay = s.layout(w.shape, (0,))
    h = np.diag(np.asarray(stats.hessian))[:, None]
    werr = lambda q: float((h * (np.asarray(q.dequantize()) - np.asarray(w)) ** 2).sum())  # noqa: E731
    weighted, plain = kmeans(w, s, lay, stats), kmeans(w, s, lay, stats, weighted=False)
    assert werr(weighted) < 0.8 * werr(plain)
    # without statistics k-means is unweighted; act_sq serves when there is no Hessian
    assert np.array_equal(np.asarray(kmeans(w, s, lay).codes), np.asarray(plain.codes))
    via_sq = kmeans(w, s, lay, LayerStats(act_sq=jnp.diagonal(stats.hessian)))
    assert np.array_equal(np.asarray(via_sq.codes), np.asarray(weighted.codes))


def test_same_input_gives_identical_codebooks():
    w, stats = _weighted_problem()
    s = Scheme("cb3", group_size=32)
    lay = s.layout(w.shape, (0,))
    a = kmeans(w, s, lay, stats)
    b = jax.jit(kmeans, static_argnums=(1, 2))(w, s, lay, stats)
    for f in ("codes", "scale", "codebook"):
        assert np.asarray(getattr(a, f)).tobytes() == np.asarray(getattr(b, f)).tobytes()


def test_empty_clusters_are_reseeded_at_the_worst_vectors():
    x = jnp.asarray([[0.0], [0.1], [5.0], [9.0]])
    w = jnp.ones_like(x)
    c = jnp.asarray([[0.05], [100.0], [7.0]])  # the middle centroid attracts nothing
    a = assign(x, w, c)
    new = np.asarray(_update(x, w, a, c))
    assert new[1, 0] in (5.0, 9.0) and new[0, 0] == pytest.approx(0.05) and new[2, 0] == pytest.approx(7.0)
    # few distinct values for many entries: every table stays finite and reconstructs them exactly
    vals = jnp.tile(jnp.asarray([-1.0, 0.5, 2.0]), 22)[:64, None] * jnp.ones((1, 3))
    s = Scheme("cb3")
    q = kmeans(vals, s, s.layout(vals.shape, (0,)))
    assert np.isfinite(np.asarray(q.codebook, np.float32)).all()
    np.testing.assert_array_equal(np.asarray(q.dequantize()), np.asarray(vals))


@pytest.mark.parametrize("fmt,kw,bound", [("cb3", {}, 0.25), ("cb2x2", dict(group_size=32), 0.55)])  # 3 and 1 bit/w
def test_padded_groups_and_vectors_fit(fmt, kw, bound):
    w = jax.random.normal(jax.random.key(3), (80, 8))
    s = Scheme(fmt, **kw, pad=bool(kw))
    q = kmeans(w, s, s.layout(w.shape, (0,)))
    q.check()
    rel = float(jnp.linalg.norm(q.dequantize() - w) / jnp.linalg.norm(w))
    assert rel < bound


class _MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.gelu(nn.Dense(64, name="up")(x))
        return nn.Dense(16, name="down")(x)


def test_a_linen_model_quantized_by_the_recipe_runs_close_to_float():
    from jq.calibration.capture import capture

    m = _MLP()
    x = jax.random.normal(jax.random.key(4), (4, 32, 32))
    v = m.init(jax.random.key(5), x)
    stats = capture(m, v, [x[:2], x[2:]])
    cfg = jq.load_recipe(RECIPES / "kmeans_w3.yaml")
    assert cfg.needs_calibration
    q = quantize_params(v["params"], cfg, stats)
    assert q["up"]["kernel"].fmt == "cb3" and q["up"]["kernel"].describe() == "cb3 channel"
    ref = m.apply(v, x)
    out = jq.apply(m, {"params": q}, x)
    rel = float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref))
    rtn3 = quantize_params(v["params"], recipe_from_dict({"name": "rtn3", "rules": [
        {"pattern": ".*kernel", "format": "int3", "symmetric": False, "granularity": "channel"}]}))
    rel_rtn = float(jnp.linalg.norm(jq.apply(m, {"params": rtn3}, x) - ref) / jnp.linalg.norm(ref))
    assert rel < 0.25 and rel < 0.9 * rel_rtn  # same tables' granularity, less error than the uniform grid
    rows = {r.path: r for r in jq.tree.report.report(v["params"], q)}
    assert rows["up/kernel"].bits_per_weight == pytest.approx(q["up"]["kernel"].bits_per_weight)
    # the 2-bit recipe is coarser, still sane
    q2 = quantize_params(v["params"], jq.load_recipe(RECIPES / "kmeans_w2.yaml"), stats)
    rel2 = float(jnp.linalg.norm(jq.apply(m, {"params": q2}, x) - ref) / jnp.linalg.norm(ref))
    assert rel < rel2 < 0.5


def test_a_layer_no_token_reached_is_fitted_unweighted():
    w = jax.random.normal(jax.random.key(6), (32, 4))
    rule = Rule(".*kernel", Scheme("cb2"), "kmeans")
    dead = LayerStats(hessian=jnp.zeros((32, 32)), count=jnp.asarray(0.0))
    with pytest.warns(UserWarning, match="unweighted kmeans"):
        q = quantize_leaf("a/kernel", w, rule, dead)
    s = Scheme("cb2")
    assert np.array_equal(np.asarray(q.codes), np.asarray(kmeans(w, s, s.layout(w.shape, (0,))).codes))


def test_refusals():
    w = jnp.ones((64, 4))
    with pytest.raises(ValueError, match=r"a/kernel: a codebook of 256 entries"):
        quantize_params({"a": {"kernel": w}}, recipe_from_dict(
            {"name": "x", "rules": [{"pattern": ".*kernel", "method": "kmeans", "format": "cb8"}]}),
            {"a/kernel": LayerStats(hessian=jnp.eye(64))})
    with pytest.raises(ValueError, match=r"a/kernel: vectors of 4 weights .* do not divide axis 0 of length 66"):
        quantize_params({"a": {"kernel": jnp.ones((66, 4))}}, recipe_from_dict(
            {"name": "x", "rules": [{"pattern": ".*kernel", "method": "kmeans", "format": "cb2x4"}]}))
    s = Scheme("int4")
    with pytest.raises(ValueError, match="'int4' is not a learned codebook"):
        kmeans(w, s, s.layout(w.shape, (0,)))
    with pytest.raises(ValueError, match="learned codebook .* method: kmeans"):  # rounding cannot make a codebook
        quantize_params({"a": {"kernel": w}}, recipe_from_dict(
            {"name": "x", "rules": [{"pattern": ".*kernel", "method": "rtn", "format": "cb3"}]}))
    with pytest.raises(ValueError, match="option 'iters' has value 0"):
        KMeans(iters=0)
    with pytest.raises(ValueError, match="does not take these options|unknown"):
        Rule(".*", Scheme("cb3"), "kmeans", options=(("clusters", 5),))
    assert get_method("kmeans").needs_calibration
    with pytest.raises(ValueError, match="statistics of 8 inputs"):
        kmeans(w, Scheme("cb2"), Scheme("cb2").layout(w.shape, (0,)), LayerStats(act_sq=jnp.ones(8)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Scheme("cb2x2").layout((64, 4), (0,), "ok")


def np_feedback(w: np.ndarray, tables: np.ndarray, group: int, u: np.ndarray) -> np.ndarray:
    """Reference error-feedback assignment, one row at a time without blocking (float32): indices [K, N]."""
    W = w.astype(np.float32).copy()
    K, N = W.shape
    idx = np.zeros((K, N), np.int64)
    for k in range(K):
        t = np.broadcast_to(tables[k // group], (N, tables.shape[-1]))
        i = np.abs(W[k][:, None] - t).argmin(-1)
        e = (W[k] - t[np.arange(N), i]) / u[k, k]
        W[k + 1:] -= np.outer(u[k, k + 1:], e)
        idx[k] = i
    return idx


def _feedback_problem():
    kx, kw = jax.random.split(jax.random.key(7))
    x = jax.random.normal(kx, (1024, 48)) @ (0.4 * jax.random.normal(kw, (48, 48)) + jnp.eye(48))
    return jax.random.normal(kw, (48, 24)), x, LayerStats(hessian=x.T @ x / x.shape[0])


def test_feedback_matches_a_numpy_gptq_pass_and_lowers_the_output_error():
    from jq.algorithms.codebook_feedback import feedback_assign, inverse_hessian_factor

    w, x, stats = _feedback_problem()
    u = inverse_hessian_factor(stats.hessian, 0.01)
    np.testing.assert_allclose(np.asarray(u.T @ u), np.linalg.inv(np.asarray(stats.hessian, np.float64)
                               + 0.01 * np.mean(np.diag(stats.hessian)) * np.eye(48)), rtol=2e-3, atol=1e-4)
    tables = jnp.sort(jax.random.normal(jax.random.key(8), (3, 24, 8)), axis=-1)  # groups of 16 rows
    got, _, _ = feedback_assign(w, u, 1, 16, lambda b, wb: (tables[b][..., None], None))  # blocks of 16 rows
    got = np.asarray(got)
    ref = np_feedback(np.asarray(w), np.asarray(tables), 16, np.asarray(u))
    assert (got == ref).mean() > 0.97  # float32 rounding near a midpoint may flip a few, never many

    s = Scheme("cb3")
    lay = s.layout(w.shape, (0,))
    oerr = lambda q: float(jnp.linalg.norm(x @ (q.dequantize() - w)) / jnp.linalg.norm(x @ w))  # noqa: E731
    plain, fb = KMeans().quantize(w, s, lay, stats), KMeans(feedback=True).quantize(w, s, lay, stats)
    assert np.array_equal(np.asarray(plain.codebook), np.asarray(fb.codebook))  # same tables, other indices
    assert oerr(fb) < 0.9 * oerr(plain)
    cfg = jq.load_recipe(RECIPES / "kmeans_w3_feedback.yaml")
    assert dict(cfg.rules[0].options)["feedback"] is True


def test_feedback_refusals():
    w, _, stats = _feedback_problem()
    s = Scheme("cb2x2")
    with pytest.raises(ValueError, match="feedback: true needs scalar codebooks"):
        KMeans(feedback=True).quantize(w, s, s.layout(w.shape, (0,)), stats)
    s = Scheme("cb2")
    with pytest.raises(ValueError, match="feedback: true needs stats.hessian"):
        KMeans(feedback=True).quantize(w, s, s.layout(w.shape, (0,)), None)
    with pytest.raises(ValueError, match="option 'damp'"):
        KMeans(damp=0)


@pytest.mark.parametrize("feedback", [False, True])
def test_dense_and_sparse_keeps_the_costliest_weights_and_lowers_the_output_error(feedback):
    w, x, stats = _feedback_problem()
    w = w.at[::7, ::5].multiply(6.0)  # heavy outliers stretch every channel's table
    s = Scheme("cb3")
    lay = s.layout(w.shape, (0,))
    oerr = lambda q: float(jnp.linalg.norm(x @ (q.dequantize() - w)) / jnp.linalg.norm(x @ w))  # noqa: E731
    plain = KMeans(feedback=feedback).quantize(w, s, lay, stats)
    ds = KMeans(feedback=feedback, outliers=0.03).quantize(w, s, lay, stats)
    again = KMeans(feedback=feedback, outliers=0.03).quantize(w, s, lay, stats)
    assert ds.sparse_index.shape == (round(0.03 * w.size),)
    assert oerr(ds) < 0.7 * oerr(plain)
    for f in ("codes", "codebook", "sparse_index", "sparse_value"):  # deterministic
        np.testing.assert_array_equal(np.asarray(getattr(ds, f)), np.asarray(getattr(again, f)))
    pos = np.asarray(ds.sparse_index)
    absw = np.abs(np.asarray(w)).reshape(-1)
    assert absw[pos].mean() > 2 * absw.mean()  # the large weights cost most (those a centroid does not catch)
    if not feedback:  # kept at their own value (with feedback: their error-updated one)
        np.testing.assert_allclose(np.asarray(ds.dequantize()).reshape(-1)[pos], np.asarray(w).reshape(-1)[pos],
                                   rtol=2e-3, atol=2e-3)
    with pytest.raises(ValueError, match=r"method 'kmeans': option 'outliers' has value -0.1"):
        KMeans(outliers=-0.1)
