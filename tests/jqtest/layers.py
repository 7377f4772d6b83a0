"""A layer problem with correlated inputs, the shape calibration gives the codebook and GPTQ-style methods."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jq.algorithms.stats import LayerStats


def correlated_layer(K: int = 64, N: int = 24, seed: int = 3) -> tuple[jax.Array, LayerStats]:
    """(w [K, N], LayerStats with the Hessian xᵀx / n of 2048 correlated inputs x [2048, K])."""
    kx, kw = jax.random.split(jax.random.key(seed))
    x = jax.random.normal(kx, (2048, K)) @ (0.4 * jax.random.normal(kw, (K, K)) + jnp.eye(K))
    w = 0.05 * jax.random.normal(kw, (K, N))
    return w, LayerStats(hessian=x.T @ x / x.shape[0])
