"""SmoothQuant (Xiao et al., 2022): migrate the quantization difficulty of activation outliers into the weights by a
per-input-channel scale s, mathematically equivalent for the float model:

    Y = (X · diag(s)⁻¹) · (diag(s) · W),      s_j = max|X_j|^α / max|W_j|^(1−α).

α = 0.5 balances the two; larger α moves more difficulty into the weights. The max over W_j runs over every output
column of every kernel that reads the same input (q/k/v, gate/up), so one s serves them all. This module computes s
only; folding X/s into the preceding norm and diag(s)·W into the kernels is the model's business.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax.numpy as jnp

__all__ = ["smooth_scales", "weight_absmax"]


def weight_absmax(weights: jnp.ndarray | Sequence[jnp.ndarray]) -> jnp.ndarray:
    """max |W_j| per input channel [K] over all output columns of all kernels (input axis first, [K, ...])."""
    ws = weights if isinstance(weights, (list, tuple)) else [weights]
    cols = [jnp.abs(jnp.asarray(w, jnp.float32)).reshape(jnp.shape(w)[0], -1) for w in ws]
    return jnp.max(jnp.concatenate(cols, axis=1), axis=1)


def smooth_scales(act_absmax: jnp.ndarray, weights: jnp.ndarray | Sequence[jnp.ndarray], alpha: float = 0.5,
                  eps: float = 1e-5) -> jnp.ndarray:
    """SmoothQuant's per-input-channel scales s [K] (float32).

    Args:
      act_absmax: max |x| per input channel over the calibration data [K].
      weights: a kernel [K, N] or a list of kernels [K, N_i] (input axis first) sharing that input.
      alpha: migration strength in [0, 1]; 0 → s = 1 / max|W_j| (weights only), 1 → s = max|X_j| (activations only).
      eps: s is clipped to [eps, 1/eps] so a folded scale can neither underflow nor blow up.

    A channel whose activation or weight maximum is 0 (or not finite) gets s = 1: there is nothing to migrate and
    a 0 or ∞ scale would destroy the other side when folded.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"SmoothQuant alpha must lie in [0, 1], got {alpha}")
    if not 0.0 < eps < 1.0:
        raise ValueError(f"SmoothQuant eps must lie in (0, 1), got {eps}")
    a = jnp.asarray(act_absmax, jnp.float32)
    w = weight_absmax(weights)
    if w.shape != a.shape:
        raise ValueError(f"SmoothQuant: act_absmax has shape {tuple(a.shape)} but the kernels have {w.shape[0]} inputs")
    ok = (a > 0) & (w > 0) & jnp.isfinite(a) & jnp.isfinite(w)
    a_safe, w_safe = jnp.where(ok, a, 1.0), jnp.where(ok, w, 1.0)
    s = jnp.power(a_safe, alpha) / jnp.power(w_safe, 1.0 - alpha)
    s = jnp.clip(s, eps, 1.0 / eps)
    return jnp.where(ok, s, 1.0)
