"""Best low-rank approximations of a weight (or of a quantization error), optionally in the metric of the layer's
inputs: the factorisation behind LoftQ's initialisation and LoRC's / HQQ+'s error compensation. A function of
arrays (layer 2): the adapters package (`jq.adapters`) decides what to factorise."""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["low_rank_fit", "damped_cholesky"]


def damped_cholesky(h: jax.Array, damp: float) -> jax.Array:
    """L [K, K] (lower) with L Lᵀ = h + λI, λ = damp · mean diag h: ‖Lᵀ x‖ is ‖X x‖ for h = XᵀX, and inputs that
    never fire stay solvable."""
    h = jnp.asarray(h, jnp.float32)
    lam = damp * jnp.maximum(jnp.mean(jnp.diag(h)), 1e-12)
    return jnp.linalg.cholesky(h + lam * jnp.eye(h.shape[0], dtype=jnp.float32))


def low_rank_fit(e: jax.Array, rank: int, h: jax.Array | None = None,
                 damp: float = 0.01) -> tuple[jax.Array, jax.Array]:
    """The rank-`rank` product a b closest to `e` [K, N] (float32 a [K, r], b [r, N], singular values split evenly).

    Without `h`: the truncated SVD (Eckart–Young, the Frobenius norm). With the input Hessian h = XᵀX [K, K]: the
    closest in the layer-output norm ‖X (e − a b)‖_F = ‖Lᵀ(e − a b)‖_F with h + λI = L Lᵀ (λ = damp · mean diag h,
    so inputs that never fire stay solvable): the truncated SVD U S Vᵀ of Lᵀ e gives a = L⁻ᵀ U S^½, b = S^½ Vᵀ
    (LoRC, Yao et al. 2023; the activation-aware SVD of ASVD / SVD-LLM).
    """
    e = jnp.asarray(e, jnp.float32)
    k, n = e.shape
    if not 1 <= rank <= min(k, n):
        raise ValueError(f"low_rank_fit: rank {rank} must lie in [1, min({k}, {n})]")
    if h is None:
        u, s, vt = jnp.linalg.svd(e, full_matrices=False)
        root = jnp.sqrt(s[:rank])
        return u[:, :rank] * root, root[:, None] * vt[:rank]
    chol = damped_cholesky(h, damp)
    u, s, vt = jnp.linalg.svd(chol.T @ e, full_matrices=False)
    root = jnp.sqrt(s[:rank])
    a = jax.scipy.linalg.solve_triangular(chol.T, u[:, :rank] * root, lower=False)
    return a, root[:, None] * vt[:rank]
