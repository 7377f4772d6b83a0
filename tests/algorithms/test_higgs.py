"""HIGGS-style data-free codebooks (`method: higgs`, jq.algorithms.higgs): the Gaussian grids against Lloyd-Max's
known distortion, the rounding against a NumPy nearest-point reference, the gain of a rotation on heavy-tailed
weights, the recipe path (no calibration) and the refusals."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jq
from jq.algorithms.higgs import gaussian_grid, higgs
from jq.algorithms.rtn import RTN
from jq.numbers.scheme import Scheme
from jq.tree.quantize import quantize_params
from jq.tree.recipe import recipe_from_dict

RECIPES = __import__("pathlib").Path(__file__).resolve().parents[2] / "configs"

# Lloyd-Max mean squared error of N(0, 1) (Max 1960): 1, 2, 3 bits
LLOYD_MAX = {1: 0.3634, 2: 0.1175, 3: 0.03454}


@pytest.mark.parametrize("bits", [1, 2, 3])
def test_scalar_grids_reach_lloyd_max_distortion(bits):
    g = gaussian_grid(bits, 1)[:, 0]
    x = np.random.default_rng(1).standard_normal(200_000)
    mse = np.mean((x - g[np.abs(x[:, None] - g[None]).argmin(1)]) ** 2)
    assert abs(mse - LLOYD_MAX[bits]) < 0.02 * LLOYD_MAX[bits]
    assert np.allclose(np.sort(g), -np.sort(g)[::-1], atol=0.03)  # symmetric up to the sample


def test_vector_grids_beat_scalar_ones_at_the_same_bits():
    x = np.random.default_rng(2).standard_normal((100_000, 2))
    g2, g1 = gaussian_grid(4, 2), gaussian_grid(2, 1)[:, 0]  # 2 bits per weight each
    mse2 = np.mean(((x[:, None] - g2[None]) ** 2).sum(-1).min(1)) / 2
    mse1 = np.mean((x - g1[np.abs(x[..., None] - g1).argmin(-1)]) ** 2)
    assert mse2 < 0.97 * mse1


@pytest.mark.parametrize("fmt,g", [("cb3", 32), ("cb4x2", 16), ("cb6x2", None)])
def test_rounding_is_the_numpy_nearest_grid_point(fmt, g):
    w = 0.02 * jax.random.normal(jax.random.key(0), (64, 12))
    s = Scheme(fmt, group_size=g) if g else Scheme(fmt)
    q = higgs(w, s, s.layout(w.shape, (0,)))
    q.check()
    d, rows = s.fmt.vec, g or 64
    grid = gaussian_grid(s.fmt.bits, d)
    W = np.asarray(w, np.float32)
    sc = np.sqrt((W.reshape(64 // rows, rows, 12) ** 2).mean(1)).astype(np.float16).astype(np.float32)  # [G, N]
    ref = np.zeros_like(W)
    for k0 in range(0, 64, d):
        for n in range(12):
            v = W[k0:k0 + d, n] / sc[k0 // rows, n]
            ref[k0:k0 + d, n] = grid[((grid - v) ** 2).sum(1).argmin()] * sc[k0 // rows, n]
    np.testing.assert_allclose(np.asarray(q.dequantize()), ref, rtol=1e-6, atol=1e-7)
    assert q.codebook.shape == (1, 1, 2**s.fmt.bits, d)  # one grid per tensor


def test_a_rotation_makes_heavy_tailed_weights_fit_the_grid():
    w = 0.02 * jax.random.t(jax.random.key(3), 2.5, (128, 64))  # outliers, as LLM weights have
    cfg = lambda rot: recipe_from_dict({"name": "x", "rules": [dict(  # noqa: E731
        pattern=".*kernel", method="higgs", format="cb6x2", group_size=64, **rot)]})
    plain = quantize_params({"a": {"kernel": w}}, cfg({}))["a"]["kernel"]
    rot = quantize_params({"a": {"kernel": w}}, cfg({"rotate": "hadamard"}))["a"]["kernel"]
    err = lambda q: float(jnp.sum((q.dequantize() - w) ** 2))  # noqa: E731
    assert err(rot) < 0.8 * err(plain)
    s = Scheme("int3", group_size=64, symmetric=False)
    rtn = RTN().quantize(w, s, s.layout(w.shape, (0,)))
    assert err(rot) < err(rtn)  # 3 + 0.25 + 0.25 bits against 3 + 0.5


def test_recipes_load_and_need_no_calibration():
    for b in (2, 3):
        cfg = jq.load_recipe(RECIPES / f"higgs_w{b}.yaml")
        assert {r.method for r in cfg.rules} == {"higgs"} and all(r.scheme.policy.rotation for r in cfg.rules)
    w = 0.02 * jax.random.normal(jax.random.key(0), (64, 8))
    out = quantize_params({"a": {"kernel": w}}, recipe_from_dict(
        {"name": "x", "rules": [{"pattern": ".*kernel", "method": "higgs", "format": "cb3", "group_size": 32}]}))
    assert out["a"]["kernel"].fmt == "cb3"


def test_refusals_name_the_leaf_value_and_fix():
    def run(fmt, shape=(64, 8), **kw):
        return quantize_params({"a": {"kernel": jnp.ones(shape)}}, recipe_from_dict(
            {"name": "x", "rules": [{"pattern": ".*kernel", "method": "higgs", "format": fmt, **kw}]}))

    with pytest.raises(ValueError, match=r"a/kernel: format 'nf4' is not a learned codebook; higgs takes"):
        run("nf4")
    with pytest.raises(ValueError, match=r"a/kernel: higgs needs a kernel \[K, N\] .* tensor"):
        run("cb3", granularity="tensor")
    with pytest.raises(ValueError, match="unknown option"):
        run("cb3", options={"iters": 3})
