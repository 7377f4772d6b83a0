"""AQLM additive codebooks (`method: aqlm`, format `aq{B}x{M}`: jq.algorithms.aqlm, jq.numbers.additive): decoding
against a NumPy sum of codewords, the layer objective against RTN and from init to after the alternation, beam
search against greedy, determinism, exact size accounting, recipes on a tree, N-D kernels, and the refusals."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jq
from jq.algorithms.aqlm import AQLM, aqlm, beam_search
from jq.algorithms.gptvq import layer_objective
from jq.algorithms.rtn import RTN
from jq.algorithms.stats import LayerStats
from jq.numbers import formats
from jq.numbers.scheme import Scheme
from jq.pallas_kernels.dispatch import force_interpret, supports_lut
from jq.tree.quantize import quantize_params
from jq.tree.recipe import recipe_from_dict

from jqtest.layers import correlated_layer

RECIPES = __import__("pathlib").Path(__file__).resolve().parents[2] / "configs"


def _problem(K=64, N=32, seed=3):
    return correlated_layer(K, N, seed)


@functools.cache
def _jitted(fmt, shape, axes, group_size=None, **kw):
    s = Scheme(fmt, group_size=group_size) if group_size else Scheme(fmt, granularity="channel")
    return jax.jit(lambda w, st: aqlm(w, s, s.layout(shape, axes), st, **kw))


def _fit(fmt, w, stats, **kw):
    return _jitted(fmt, w.shape, (0,), group_size=32, **kw)(w, stats)


@pytest.fixture(scope="module")
def fitted():
    w, stats = _problem()
    return w, stats, {it: _fit("aq4x4", w, stats, iters=it) for it in (0, 3)}


def test_decode_is_the_sum_of_codewords_times_the_scale(fitted):
    w, stats, qs = fitted
    q = qs[3]
    codes, cb, sc = np.asarray(q.codes), np.asarray(q.codebook, np.float64), np.asarray(q.scale, np.float64)
    assert codes.dtype == np.uint8 and codes.shape == (8, 32, 4) and cb.shape == (2, 1, 4, 16, 8)
    ref = np.zeros((64, 32))
    for j in range(8):
        g = j // 4  # 32-row groups (one set of tables each): 4 blocks of 8 rows
        for n in range(32):
            ref[8 * j:8 * j + 8, n] = sc[g, n] * sum(cb[g, 0, m, codes[j, n, m]] for m in range(4))
    np.testing.assert_allclose(np.asarray(q.dequantize(), np.float64), ref, rtol=1e-5, atol=1e-7)


def test_objective_beats_rtn_and_the_alternation_lowers_it_deterministically(fitted):
    w, stats, qs = fitted
    obj = lambda q: float(layer_objective(w, q.dequantize(), stats.hessian))  # noqa: E731
    g = Scheme("int2", group_size=32)
    rtn = obj(RTN().quantize(w, g, g.layout(w.shape, (0,))))
    assert obj(qs[3]) <= obj(qs[0]) < rtn  # index bits: aq4x4 = 2 per weight, int2 = 2
    assert obj(qs[3]) < 0.9 * obj(qs[0])
    again = _fit("aq4x4", w, stats, iters=3)
    assert np.array_equal(np.asarray(again.codes), np.asarray(qs[3].codes))
    assert np.array_equal(np.asarray(again.codebook), np.asarray(qs[3].codebook))


def test_beam_search_is_never_worse_than_greedy():
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    r = jax.random.normal(k1, (8, 8))
    a = r @ r.T / 8 + 0.1 * jnp.eye(8)
    b = jax.random.normal(k2, (64, 8))
    for books in (2, 3):
        t = jax.random.normal(k3, (books, 16, 8)) / jnp.arange(1, books + 1)[:, None, None]
        tat = jnp.einsum("mei,ij,mej->me", t, a, t)
        run = jax.jit(jax.vmap(lambda bb, beam: beam_search(bb, a, t, tat, beam), in_axes=(0, None)),
                      static_argnums=1)
        (_, greedy), (codes, wide) = run(b, 1), run(b, 8)
        v = sum(t[m][codes[:, m]] for m in range(books))  # the reported cost is the cost of the returned codes
        np.testing.assert_allclose(wide, jnp.sum(v * (v @ a - 2 * b), -1), rtol=1e-4, atol=1e-4)
        if books == 2:  # the last table is searched exhaustively over every kept hypothesis: never worse
            assert bool(jnp.all(wide <= greedy + 1e-4))
        assert float(jnp.mean(wide)) < float(jnp.mean(greedy))


def test_bits_per_weight_are_counted_exactly(fitted):
    q = fitted[2][0]
    # codes: 8·32 vectors × 4 one-byte indices; scales: 2 groups × 32 float16; tables: 2 groups × 4 × 16 × 8 float16
    assert q.nbytes == 8 * 32 * 4 + 2 * 32 * 2 + 2 * 4 * 16 * 8 * 2
    assert q.bits_per_weight == pytest.approx(8 * (1024 + 128 + 2048) / (64 * 32))
    assert formats.get_format("aq8x3").bits_per_weight == 3.0


def test_a_recipe_on_a_tree_an_nd_kernel_and_the_refusals_of_kernels_and_exporters(tmp_path):
    w, stats = _problem()
    cfg = recipe_from_dict({"name": "x", "rules": [{"pattern": ".*kernel", "method": "aqlm", "format": "aq4x2",
                                                    "granularity": "channel", "rotate": "hadamard",
                                                    "options": {"iters": 1}}]})
    out = quantize_params({"a": {"kernel": w, "bias": jnp.zeros(32)}}, cfg, {"a/kernel": stats})
    q = out["a"]["kernel"]
    x = jax.random.normal(jax.random.key(1), (4, 64))
    got, ref = np.asarray(jq.ops.qdot(x, q)), np.asarray(x @ w)
    assert q.fmt == "aq4x2" and np.linalg.norm(got - ref) < 0.6 * np.linalg.norm(ref)
    with force_interpret():
        assert "kind additive" in supports_lut(x, q.unrotated(), (((1,), (0,)), ((), ())))
    from jq.models.io.hfq.common import unsigned_view
    with pytest.raises(ValueError, match="format aq4x2 cannot be stored in gptq"):
        unsigned_view(q, "a/kernel", "gptq", (4, 8))
    from jq import checkpoint as ck

    d = ck.save(tmp_path / "ck", out)
    assert ck.read_meta(d)["format_version"] == "1.5"
    back = ck.load(d)[0]["a"]["kernel"]
    for f in ("codes", "scale", "codebook"):
        np.testing.assert_array_equal(np.asarray(getattr(back, f)), np.asarray(getattr(q, f)))
    nd = _jitted("aq4x2", (4, 16, 32), (0, 1), iters=0)(w.reshape(4, 16, 32), stats)
    flat = _jitted("aq4x2", (64, 32), (0,), iters=0)(w, stats)
    assert nd.codes.shape == (4, 2, 32, 2)
    np.testing.assert_array_equal(np.asarray(nd.dequantize()).reshape(64, 32), np.asarray(flat.dequantize()))
    for name, fmt in (("aqlm_w2", "aq8x2"), ("aqlm_w3", "aq8x3"), ("aqlm_w4", "aq8x4")):
        r = jq.load_recipe(RECIPES / f"{name}.yaml").rules[-1]
        assert r.method == "aqlm" and r.scheme.fmt.name == fmt and r.scheme.policy.rotation is not None


def test_refusals_name_the_value_and_the_fix():
    def run(fmt, shape=(64, 32), **kw):
        cfg = recipe_from_dict({"name": "x", "rules": [{"pattern": ".*kernel", "method": "aqlm", "format": fmt,
                                                        **kw}]})
        return quantize_params({"a": {"kernel": jnp.ones(shape)}}, cfg, {"a/kernel": LayerStats(
            hessian=jnp.eye(shape[0]))})

    with pytest.raises(ValueError, match=r"B = 9 bits per codebook index is out of range; use B in 4\.\.8"):
        Scheme("aq9x2")
    with pytest.raises(ValueError, match=r"M = 5 codebooks per vector is out of range; use M in 1\.\.4"):
        formats.get_format("aq8x5")
    with pytest.raises(ValueError, match=r"vectors of 8 weights \(format aq4x2\) do not divide axis 0 of length 60"):
        run("aq4x2", (60, 32), granularity="channel")
    with pytest.raises(ValueError, match=r"a/kernel: aqlm: a codebook of 256 entries for only 128 vectors "
                                         r"per group \(format aq8x2, .* use fewer bits"):
        run("aq8x2", (64, 16), granularity="channel")
    with pytest.raises(ValueError, match=r"format 'cb6x2' is not a additive codebook; aqlm takes aq\{B\}x\{M\}"):
        run("cb6x2", group_size=32)
    for bad in (dict(beam=0), dict(iters=-1), dict(damp=0), dict(refit=1)):
        with pytest.raises(ValueError, match="method 'aqlm': option"):
            AQLM(**bad)
