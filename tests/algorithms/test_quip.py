"""QuIP#-style lattice quantization (`method: quip`, jq.algorithms.quip): the block-LDL pass against a NumPy
reference, the gain of the feedback and of the scale refit, the lattice against scalar GPTQ at the same bits,
determinism, recipes on a tree, a layer no token reached, and the refusals."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jq
from jq.algorithms.codebook_feedback import inverse_hessian_factor
from jq.algorithms.gptq import GPTQ
from jq.algorithms.gptvq import layer_objective
from jq.algorithms.quip import QuIP, quip
from jq.algorithms.stats import LayerStats
from jq.numbers import lattice
from jq.numbers.scheme import Scheme
from jq.tree.quantize import quantize_leaf, quantize_params
from jq.tree.recipe import recipe_from_dict

from jqtest.layers import correlated_layer

RECIPES = __import__("pathlib").Path(__file__).resolve().parents[2] / "configs"


def _problem(K=64, N=24, seed=3):
    return correlated_layer(K, N, seed)


def np_block_ldlq(w: np.ndarray, u: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Reference (float64, no lazy blocks, one group): 8 rows at a time each column's vector divided by its scale
    [N] goes to the nearest table entry (brute force), then the 8 rows are fixed one by one feeding errors forward."""
    W = w.astype(np.float64).copy()
    t = lattice.table().astype(np.float64)
    codes = np.zeros((W.shape[0] // 8, W.shape[1]), np.int64)
    for s in range(0, W.shape[0], 8):
        y = (W[s:s + 8] / scale).T  # [N, 8]
        c = ((y[:, None, :] - t[None]) ** 2).sum(-1).argmin(1)
        q = (t[c] * scale[:, None]).T
        for r in range(8):
            e = (W[s + r] - q[r]) / u[s + r, s + r]
            W[s + r + 1:] -= np.outer(u[s + r, s + r + 1:], e)
        codes[s // 8] = c
    return codes


def test_block_ldl_pass_matches_a_numpy_reference():
    w, stats = _problem(K=32, N=6)
    s = Scheme("e8p", granularity="channel")
    q = quip(w, s, s.layout(w.shape, (0,)), stats, refit=False)
    u = np.asarray(inverse_hessian_factor(stats.hessian, 0.01), np.float64)
    ref = np_block_ldlq(np.asarray(w), u, np.asarray(q.scale, np.float64)[0])
    assert q.codes.dtype == jnp.uint16 and q.codes.shape == (4, 6)
    assert (np.asarray(q.codes) == ref).mean() > 0.9  # float32 near a tie may flip a few, never many


@pytest.mark.parametrize("fmt", ["e8p", "e8p3", "e8p2", "e8p5"])
def test_feedback_and_refit_lower_the_layer_objective_deterministically(fmt):
    w, stats = _problem()
    s = Scheme(fmt, group_size=32)
    lay = s.layout(w.shape, (0,))
    obj = lambda q: float(layer_objective(w, q.dequantize(), stats.hessian))  # noqa: E731
    plain = quip(w, s, lay, None, refit=False)  # H = I: nearest entries
    fed = quip(w, s, lay, stats, refit=False)
    refit = quip(w, s, lay, stats)
    assert obj(refit) <= obj(fed) < 0.92 * obj(plain)
    assert np.array_equal(np.asarray(refit.codes), np.asarray(quip(w, s, lay, stats).codes))
    assert refit.bits_per_weight == pytest.approx(s.fmt.bits / 8 + 16 / 32)


def test_each_bit_lowers_the_objective_and_stacked_kernels_quantize_per_slice():
    w, stats = _problem(K=128, N=32, seed=6)
    obj = {}
    for fmt in ("e8p", "e8p3", "e8p2", "e8p5", "e8p6"):
        s = Scheme(fmt, granularity="channel")
        obj[fmt] = float(layer_objective(w, quip(w, s, s.layout(w.shape, (0,)), stats).dequantize(), stats.hessian))
    ladder = [obj[f] for f in ("e8p", "e8p3", "e8p2", "e8p5", "e8p6")]
    assert all(hi < 0.6 * lo for lo, hi in zip(ladder, ladder[1:])), ladder
    s = Scheme("e8p5", granularity="channel")
    both = jnp.stack([w, -0.5 * w])
    q = quip(both, s, s.layout(both.shape, (1,)), None)
    assert q.codes.dtype == jnp.uint8 and q.codes.shape == (2, 16, 32, 5)
    for i, wi in enumerate(both):
        one = quip(wi, s, s.layout(wi.shape, (0,)), None)
        np.testing.assert_array_equal(np.asarray(q.layer(i).dequantize()), np.asarray(one.dequantize()))


def test_the_lattice_beats_scalar_gptq_at_fewer_bits():
    w, stats = _problem(K=128, N=32, seed=5)
    q = quip(w, Scheme("e8p", granularity="channel"), Scheme("e8p", granularity="channel").layout(w.shape, (0,)),
             stats)
    g = Scheme("int2", group_size=64, symmetric=False)
    q2 = GPTQ().quantize(w, g, g.layout(w.shape, (0,)), stats)
    assert q.bits_per_weight < q2.bits_per_weight
    assert float(layer_objective(w, q.dequantize(), stats.hessian)) < \
        0.8 * float(layer_objective(w, q2.dequantize(), stats.hessian))


def test_a_recipe_on_a_tree_and_a_layer_no_token_reached():
    w, stats = _problem()
    cfg = recipe_from_dict({"name": "x", "rules": [{"pattern": ".*kernel", "method": "quip", "format": "e8p",
                                                    "granularity": "channel", "rotate": "hadamard"}]})
    out = quantize_params({"a": {"kernel": w, "bias": jnp.zeros(24)}}, cfg, {"a/kernel": stats})
    x = jax.random.normal(jax.random.key(1), (4, 64))
    got, ref = np.asarray(jq.ops.qdot(x, out["a"]["kernel"])), np.asarray(x @ w)
    assert out["a"]["kernel"].fmt == "e8p" and np.linalg.norm(got - ref) < 0.5 * np.linalg.norm(ref)
    dead = LayerStats(hessian=jnp.zeros((64, 64)), count=jnp.asarray(0.0))
    with pytest.warns(UserWarning, match="unweighted quip"):
        q = quantize_leaf("a/kernel", w, cfg.rules[0], dead)
    assert np.isfinite(np.asarray(q.dequantize())).all()
    for name in ("quip_w2", "quip_w3", "quip_w4", "quip_e8p3", "quarot_quip_w2", "quarot_quip_w3", "quarot_quip_w4",
                 "quarot_quip_e8p3", "e8p_w3", "e8p_w5", "e8p_w6"):
        r = jq.load_recipe(RECIPES / f"{name}.yaml").rules[-1]
        assert r.method == "quip" and r.scheme.fmt.kind == "lattice"


def test_refusals_name_the_leaf_value_and_fix():
    def run(fmt, shape=(64, 24), **kw):
        cfg = recipe_from_dict({"name": "x", "rules": [{"pattern": ".*kernel", "method": "quip", "format": fmt,
                                                        **kw}]})
        st = LayerStats(hessian=jnp.eye(shape[0])) if len(shape) == 2 else None
        return quantize_params({"a": {"kernel": jnp.ones(shape)}}, cfg, {"a/kernel": st})

    with pytest.raises(ValueError, match=r"a/kernel: format 'cb6x2' is not a lattice codebook; quip takes e8p"):
        run("cb6x2", group_size=32)
    with pytest.raises(ValueError, match=r"a/kernel: vectors of 8 weights \(format e8p\) do not divide groups of 12"):
        run("e8p", (48, 4), group_size=12)
    with pytest.raises(ValueError, match=r"a/kernel: quip needs a kernel \[K, N\] .* padded"):
        run("e8p", (60, 4), group_size=16, pad=True)
    for bad in (dict(damp=0), dict(damp=True), dict(refit=1)):
        with pytest.raises(ValueError, match="method 'quip': option"):
            QuIP(**bad)
