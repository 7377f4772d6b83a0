"""SmoothAttention (QServe's QoQ, Lin et al. 2024): a per-channel scale λ moved from the keys into the queries, so
that a 4-bit key cache holds despite the keys' outlier channels:

    q · k = (q · diag(λ)) · (diag(λ)⁻¹ · k),      λ_c = max |K_c|^α  (α = 0.5),

with K the pre-RoPE key activations (the k_proj outputs) over calibration data. Rotary embeddings rotate channel
pairs by a position-dependent angle; a 2-D rotation commutes with scaling both channels of its pair by the same
number, so λ is made equal on each pair (the larger of the two), and then RoPE(q λ) · RoPE(k / λ) = RoPE(q) · RoPE(k)
exactly. With grouped-query attention one λ per kv head serves all the query heads reading it. The scale folds into
the k_proj output columns (÷ λ) and the q_proj output columns (× λ): the float model is unchanged.

This module holds the arithmetic on arrays; which weights are q / k, how RoPE pairs channels and where the keys are
captured is the model family's business (`jq.models.llama.smooth`).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

__all__ = ["SmoothAttentionConfig", "PAIRINGS", "smooth_attention_scales", "fold_smooth_attention"]

PAIRINGS = ("half", "interleaved", "none")  # RoPE pairs (i, i + D/2) (rotate-half), (2i, 2i + 1), or no RoPE


@dataclasses.dataclass(frozen=True)
class SmoothAttentionConfig:
    """The recipe's `smooth_attention:` section: migration strength `alpha` in (0, 1]."""

    alpha: float = 0.5

    def __post_init__(self):
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not 0.0 < self.alpha <= 1.0:
            raise ValueError(f"smooth_attention: 'alpha' must be a number in (0, 1] (the paper uses 0.5), got "
                             f"{self.alpha!r}")
        object.__setattr__(self, "alpha", float(self.alpha))


def smooth_attention_scales(key_absmax: jnp.ndarray, head_dim: int, alpha: float = 0.5,
                            pairing: str = "half") -> jnp.ndarray:
    """λ [n_kv_heads · head_dim] (float32) from the keys' per-channel max |K| [n_kv_heads · head_dim] (channels in
    k_proj's output order, head-major): max |K_c|^α, equal on each RoPE pair (`pairing`, see `PAIRINGS`); a channel
    whose keys are all zero (or not finite) gets 1."""
    if pairing not in PAIRINGS:
        raise ValueError(f"smooth_attention: pairing {pairing!r}; allowed values are {list(PAIRINGS)}")
    a = jnp.asarray(key_absmax, jnp.float32)
    if a.ndim != 1 or a.shape[0] % head_dim or (pairing != "none" and head_dim % 2):
        raise ValueError(f"smooth_attention: key statistics of shape {tuple(a.shape)} do not split into heads of "
                         f"{head_dim} channels (with an even head_dim for RoPE pairs)")
    a = jnp.where(jnp.isfinite(a), a, 0.0).reshape(-1, head_dim)
    if pairing == "half":
        h = head_dim // 2
        m = jnp.maximum(a[:, :h], a[:, h:])
        a = jnp.concatenate([m, m], axis=1)
    elif pairing == "interleaved":
        m = jnp.max(a.reshape(a.shape[0], -1, 2), axis=2, keepdims=True)
        a = jnp.broadcast_to(m, m.shape[:2] + (2,)).reshape(a.shape)
    lam = jnp.where(a > 0, jnp.power(jnp.maximum(a, 1e-30), alpha), 1.0)
    return lam.reshape(-1)


def fold_smooth_attention(wq: jnp.ndarray, wk: jnp.ndarray, lam: jnp.ndarray, n_heads: int,
                          n_kv_heads: int) -> tuple[jnp.ndarray, jnp.ndarray]:
    """(wq · λ, wk / λ) for kernels (in, out): wq [D, n_heads · head_dim], wk [D, n_kv_heads · head_dim],
    λ [n_kv_heads · head_dim]; query head j takes the λ of kv head j // (n_heads / n_kv_heads). float32 results."""
    if n_heads % n_kv_heads:
        raise ValueError(f"smooth_attention: {n_heads} query heads do not divide into {n_kv_heads} kv heads")
    lam = jnp.asarray(lam, jnp.float32)
    if wk.shape[-1] != lam.shape[0] or wq.shape[-1] * n_kv_heads != lam.shape[0] * n_heads:
        raise ValueError(f"smooth_attention: λ of {lam.shape[0]} channels does not fit k_proj {tuple(wk.shape)} / "
                         f"q_proj {tuple(wq.shape)} with {n_heads} / {n_kv_heads} heads")
    head_dim = lam.shape[0] // n_kv_heads
    lam_q = jnp.repeat(lam.reshape(n_kv_heads, 1, head_dim), n_heads // n_kv_heads, axis=1).reshape(-1)
    return jnp.asarray(wq, jnp.float32) * lam_q, jnp.asarray(wk, jnp.float32) / lam
