"""The GPTQ tests' data and runners: correlated Hessians, small kernels, one jitted GPTQ per option set, and the
layer objective tr(ΔᵀHΔ) the properties compare (shared by tests/algorithms/test_gptq.py and test_gptq_grids.py)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jq.algorithms import GPTQ
from jq.algorithms.rtn import rtn

__all__ = ["N", "correlated_hessian", "weight", "jitted", "run", "rtn_jit", "stored_codes", "objective"]

N = 48  # output columns of the test kernels


def correlated_hessian(k: int, seed: int = 0, n: int = 2048):
    """H = XᵀX/n for inputs with a few high-variance channels and strongly correlated groups of channels."""
    return _correlated_hessian(k, seed, n).copy()


@functools.lru_cache(maxsize=None)
def _correlated_hessian(k: int, seed: int, n: int):
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((n, k // 4))
    mix = rng.standard_normal((k // 4, k)) * (rng.random((k // 4, k)) < 0.2)
    x = z @ mix + 0.3 * rng.standard_normal((n, k))
    x[:, rng.choice(k, 4, replace=False)] *= 8.0
    return (x.T @ x / n).astype(np.float32)


def weight(k: int, n: int = N, seed: int = 1):
    return (np.random.default_rng(seed).standard_normal((k, n)) * 0.05).astype(np.float32)


@functools.lru_cache(maxsize=None)
def jitted(**options):
    """One jitted GPTQ (with info) per recipe option set (jax then caches per scheme, layout and shapes)."""
    return jax.jit(GPTQ.from_options(**options).quantize_with_info, static_argnums=(1, 2))


def run(w, scheme, h, axes=(0,), **options):
    layout = scheme.layout(w.shape, axes)
    return jitted(**options)(jnp.asarray(w), scheme, layout, {"hessian": jnp.asarray(h)})


rtn_jit = jax.jit(rtn, static_argnums=(1, 2))


def stored_codes(q) -> np.ndarray:
    c = np.asarray(q.unpacked_codes()).astype(np.float64)
    return c.reshape(-1, c.shape[-1])


def objective(w, q_deq, h):
    d = (np.asarray(q_deq, np.float64) - w).reshape(h.shape[0], -1)
    return float(np.trace(d.T @ h.astype(np.float64) @ d))
