"""A Flax linen Llama-family decoder: RMSNorm, rotate-half RoPE, grouped-query causal attention, SwiGLU.

Every projection is a plain `nn.Dense(use_bias=False)` with an (in, out) kernel, so a quantization library that
intercepts `nn.Dense` sees all of them. Parameter paths (inside the `params` collection):

    embed/embedding                                   (vocab, dim)
    layers_{i}/input_norm/scale                       (dim,)
    layers_{i}/attn/{q,k,v,o}_proj/kernel             (dim, n_heads*head_dim) ... (n_heads*head_dim, dim)
    layers_{i}/post_attn_norm/scale                   (dim,)
    layers_{i}/mlp/{gate,up}_proj/kernel              (dim, hidden_dim)
    layers_{i}/mlp/down_proj/kernel                   (hidden_dim, dim)
    final_norm/scale                                  (dim,)
    lm_head/kernel                                    (dim, vocab), only when not tied

q/k use the Hugging Face ("rotate-half") head layout; the GGUF loader un-permutes llama.cpp's interleaved rows.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from jq.models.config import LlamaConfig

__all__ = ["LlamaConfig", "Llama", "RMSNorm", "Attention", "MLP", "Block", "rope", "init_params", "make_forward"]


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * scale, computed in fp32 and cast back to `dtype`. x: [..., dim]."""

    eps: float
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), jnp.float32)
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (y * scale).astype(self.dtype)


def rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
    """Rotate-half rotary embedding (Hugging Face layout).

    x: [B, T, H, D]; positions: [B, T] int. Pairs (i, i + D/2) are rotated by angle pos * theta^(-2i/D).
    Computed in fp32, returned in x's dtype.
    """
    d = x.shape[-1]
    inv_freq = 1.0 / (theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))            # [D/2]
    angles = positions.astype(jnp.float32)[..., None] * inv_freq                           # [B, T, D/2]
    cos = jnp.cos(angles)[:, :, None, :]                                                   # [B, T, 1, D/2]
    sin = jnp.sin(angles)[:, :, None, :]
    x32 = x.astype(jnp.float32)
    x1, x2 = x32[..., : d // 2], x32[..., d // 2:]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


class Attention(nn.Module):
    """Grouped-query causal self-attention; kv head j serves query heads j*G .. (j+1)*G-1 (G = n_heads/n_kv_heads)."""

    cfg: LlamaConfig
    dtype: Any = jnp.float32

    def _dense(self, features: int, name: str) -> nn.Dense:
        return nn.Dense(features, use_bias=False, dtype=self.dtype, param_dtype=jnp.float32, name=name)

    @nn.compact
    def __call__(self, x: jax.Array, positions: jax.Array) -> jax.Array:
        """x: [B, T, dim]; positions: [B, T] int (the causal mask is key_pos <= query_pos) -> [B, T, dim]."""
        c = self.cfg
        b, t, _ = x.shape
        g = c.group_size
        q = self._dense(c.n_heads * c.head_dim, "q_proj")(x).reshape(b, t, c.n_heads, c.head_dim)
        k = self._dense(c.n_kv_heads * c.head_dim, "k_proj")(x).reshape(b, t, c.n_kv_heads, c.head_dim)
        v = self._dense(c.n_kv_heads * c.head_dim, "v_proj")(x).reshape(b, t, c.n_kv_heads, c.head_dim)
        q = rope(q, positions, c.rope_theta).reshape(b, t, c.n_kv_heads, g, c.head_dim)
        k = rope(k, positions, c.rope_theta)

        scores = jnp.einsum("bqkgd,bskd->bkgqs", q, k, preferred_element_type=jnp.float32)
        scores = scores * (1.0 / jnp.sqrt(jnp.float32(c.head_dim)))
        causal = positions[:, :, None] >= positions[:, None, :]                             # [B, Tq, Tk]
        scores = jnp.where(causal[:, None, None], scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(self.dtype)
        out = jnp.einsum("bkgqs,bskd->bqkgd", probs, v).reshape(b, t, c.n_heads * c.head_dim)
        return self._dense(c.dim, "o_proj")(out)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)). x: [B, T, dim] -> [B, T, dim]."""

    cfg: LlamaConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        dense = lambda f, n: nn.Dense(f, use_bias=False, dtype=self.dtype, param_dtype=jnp.float32, name=n)  # noqa: E731
        h = nn.silu(dense(self.cfg.hidden_dim, "gate_proj")(x)) * dense(self.cfg.hidden_dim, "up_proj")(x)
        return dense(self.cfg.dim, "down_proj")(h)


class Block(nn.Module):
    """Pre-norm decoder layer: x + attn(norm(x)), then + mlp(norm(.)). x: [B, T, dim] -> [B, T, dim]."""

    cfg: LlamaConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, positions: jax.Array) -> jax.Array:
        eps = self.cfg.norm_eps
        x = x + Attention(self.cfg, self.dtype, name="attn")(RMSNorm(eps, self.dtype, name="input_norm")(x), positions)
        return x + MLP(self.cfg, self.dtype, name="mlp")(RMSNorm(eps, self.dtype, name="post_attn_norm")(x))


class Llama(nn.Module):
    """Llama-family decoder. `dtype` is the activation compute dtype; parameters are created in fp32."""

    cfg: LlamaConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, tokens: jax.Array, positions: jax.Array | None = None) -> jax.Array:
        """tokens: [B, T] int32; positions: [B, T] or [T] int (default arange(T)) -> logits [B, T, vocab] float32."""
        c = self.cfg
        b, t = tokens.shape
        if positions is None:
            positions = jnp.arange(t, dtype=jnp.int32)
        positions = jnp.broadcast_to(positions, (b, t))
        embed = nn.Embed(c.vocab_size, c.dim, dtype=self.dtype, param_dtype=jnp.float32, name="embed")
        x = embed(tokens)
        for i in range(c.n_layers):
            x = Block(c, self.dtype, name=f"layers_{i}")(x, positions)
        x = RMSNorm(c.norm_eps, self.dtype, name="final_norm")(x)
        if c.tie_embeddings:
            logits = embed.attend(x)
        else:
            logits = nn.Dense(c.vocab_size, use_bias=False, dtype=self.dtype, param_dtype=jnp.float32, name="lm_head")(x)
        return logits.astype(jnp.float32)


def init_params(cfg: LlamaConfig, key: jax.Array) -> dict[str, Any]:
    """Random parameters (Flax default initializers) as a nested dict keyed like the module docstring."""
    variables = Llama(cfg).init(key, jnp.zeros((1, 2), jnp.int32))
    return flax.core.unfreeze(variables["params"])


def make_forward(cfg: LlamaConfig, dtype: Any = jnp.float32) -> Callable[[Any, jax.Array], jax.Array]:
    """forward(params, tokens[B, T] int32) -> logits[B, T, vocab] float32 (not jitted; the caller jits or wraps)."""
    model = Llama(cfg, dtype=dtype)

    def forward(params: Any, tokens: jax.Array) -> jax.Array:
        return model.apply({"params": params}, tokens)

    return forward
