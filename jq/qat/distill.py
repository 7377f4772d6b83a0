"""Knowledge distillation from the float model: the loss that lets QAT recover the *float model* rather than adapt
to the fine-tuning text.

Cross-entropy on a corpus both re-learns what quantization broke and adapts the model to that corpus; the second
part shows up as a perplexity gain on texts like it that the float model itself would get from the same steps. With
the float model as teacher, the student is pulled towards the teacher's next-token distribution on every position
(Hinton et al. 2015; the QAT form of LLM-QAT, Liu et al. 2023, and BitDistiller, Du et al. 2024), so what the run
recovers is what quantization lost.

    L = α · τ² · mean_t KL(softmax(z_T / τ) ‖ softmax(z_S / τ)) + (1 − α) · CE(z_S, next token)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

__all__ = ["kl_divergence", "distill_loss"]


def kl_divergence(student_logits: jax.Array, teacher_logits: jax.Array, temperature: float = 1.0) -> jax.Array:
    """Per-position KL(p_T ‖ p_S) of the softened distributions, scaled by τ² (so that the gradient's size does
    not depend on τ). logits [..., V] → [...], float32; the teacher gets no gradient."""
    t = jax.lax.stop_gradient(teacher_logits).astype(jnp.float32) / temperature
    s = student_logits.astype(jnp.float32) / temperature
    kl = optax.losses.kl_divergence_with_log_targets(jax.nn.log_softmax(s, axis=-1), jax.nn.log_softmax(t, axis=-1))
    return temperature**2 * kl


def distill_loss(student_logits: jax.Array, teacher_logits: jax.Array, labels: jax.Array, alpha: float = 1.0,
                 temperature: float = 1.0) -> jax.Array:
    """α · KD + (1 − α) · CE, averaged over positions. logits [B, T, V] aligned with labels [B, T] (the caller
    shifts: logits of positions 0..T−2 against tokens 1..T−1). α = 0 is plain cross-entropy, α = 1 pure KD."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"distillation weight alpha={alpha} must lie in [0, 1] (1 = pure KD, 0 = cross-entropy)")
    if temperature <= 0:
        raise ValueError(f"distillation temperature {temperature} must be > 0")
    ce = optax.softmax_cross_entropy_with_integer_labels(student_logits.astype(jnp.float32), labels)
    if alpha == 0.0:
        return jnp.mean(ce)
    kd = kl_divergence(student_logits, teacher_logits, temperature)
    return jnp.mean(alpha * kd + (1.0 - alpha) * ce)
