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

Decoding with a KV cache (explicit pytree in, pytree out; the parameters and their paths are the same):

    cache = init_cache(cfg, batch, max_len, kv_cache)            # {"layers_i": {"k": entry, "v": entry}}
    prefill, decode_step = make_decode(cfg, dtype, kv_cache)
    logits, cache = prefill(params, cache, tokens)                # tokens [B, T] at positions 0..T-1
    logits, cache = decode_step(params, cache, token, pos)        # token [B] at position pos -> logits [B, V]

An entry is a float array [B, max_len, n_kv_heads, head_dim] or, with a quantized `KVCacheConfig`, a dict of
codes / scales / zero points (see `jq.numbers.kvcache`). `Llama(cfg, dtype, kv_cache)` applies the same quantization
in the full-sequence forward (k and v are quantize-dequantized before attention), so perplexity measures the
quantized cache; with `kv_cache.rotate`, q and k are rotated by one orthogonal matrix after RoPE (QuaRot).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from jq.models.decoder import attend, decode_fns, init_kv_cache, kv_bytes_per_token
from jq.models.llama.config import LlamaConfig
from jq.numbers.kvcache import KVCacheConfig

__all__ = ["LlamaConfig", "KVCacheConfig", "Llama", "RMSNorm", "Attention", "MLP", "Block", "rope", "init_params",
           "make_forward", "init_cache", "make_decode", "cache_bytes_per_token", "qk_rotation"]


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * scale, computed in fp32 and cast back to `dtype`. x: [..., dim]."""

    eps: float
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [..., dim] -> [..., dim] in `dtype`."""
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


def qk_rotation(kv: KVCacheConfig | None, head_dim: int) -> Callable[[jax.Array], jax.Array] | None:
    """The orthogonal map applied to q and k after RoPE (`kv.rotation`, any head_dim `jq.numbers.hadamard`
    supports), or None. x: [..., head_dim] -> same shape and dtype (computed in fp32)."""
    rot = None if kv is None else kv.rotation
    if rot is None:
        return None
    from jq.numbers.hadamard import decompose

    decompose(head_dim)  # a clear error for a head_dim with no Hadamard construction
    return lambda x: rot.apply(x.astype(jnp.float32), axis=-1).astype(x.dtype)


class Attention(nn.Module):
    """Grouped-query causal self-attention; kv head j serves query heads j*G .. (j+1)*G-1 (G = n_heads/n_kv_heads).

    `kv_cache` (optional) quantizes k and v (and rotates q, k) as described in the module docstring."""

    cfg: LlamaConfig
    dtype: Any = jnp.float32
    kv_cache: KVCacheConfig | None = None

    def _dense(self, features: int, name: str) -> nn.Dense:
        return nn.Dense(features, use_bias=False, dtype=self.dtype, param_dtype=jnp.float32, name=name)

    @nn.compact
    def __call__(self, x: jax.Array, positions: jax.Array,
                 cache: dict | None = None) -> jax.Array | tuple[jax.Array, dict]:
        """x: [B, T, dim]; positions: [B, T] int (the causal mask is key_pos <= query_pos) -> [B, T, dim].

        cache: None, or this layer's {"k": entry, "v": entry} with entries of max_len L rows (see `init_cache`).
        Then the T new keys/values are written at rows positions[0, 0] .. positions[0, 0] + T - 1 (all batch rows
        share positions), the queries attend over the L rows with row <= query position, and the result is
        ([B, T, dim], updated cache).
        """
        c = self.cfg
        b, t, _ = x.shape
        kv = self.kv_cache
        q = self._dense(c.n_heads * c.head_dim, "q_proj")(x).reshape(b, t, c.n_heads, c.head_dim)
        k = self._dense(c.n_kv_heads * c.head_dim, "k_proj")(x).reshape(b, t, c.n_kv_heads, c.head_dim)
        v = self._dense(c.n_kv_heads * c.head_dim, "v_proj")(x).reshape(b, t, c.n_kv_heads, c.head_dim)
        q = rope(q, positions, c.rope_theta)
        k = rope(k, positions, c.rope_theta)
        rotate = qk_rotation(kv, c.head_dim)
        if rotate is not None:
            q, k = rotate(q), rotate(k)
        out, cache = attend(q, k, v, positions, cache, kv, self.dtype, 1.0 / jnp.sqrt(jnp.float32(c.head_dim)))
        out = self._dense(c.dim, "o_proj")(out)
        return out if cache is None else (out, cache)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)). x: [B, T, dim] -> [B, T, dim]."""

    cfg: LlamaConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [B, T, dim] -> [B, T, dim]."""
        dense = lambda f, n: nn.Dense(f, use_bias=False, dtype=self.dtype, param_dtype=jnp.float32, name=n)  # noqa: E731
        h = nn.silu(dense(self.cfg.hidden_dim, "gate_proj")(x)) * dense(self.cfg.hidden_dim, "up_proj")(x)
        return dense(self.cfg.dim, "down_proj")(h)


class Block(nn.Module):
    """Pre-norm decoder layer: x + attn(norm(x)), then + mlp(norm(.)). x: [B, T, dim] -> [B, T, dim]
    (with a layer `cache`: ([B, T, dim], updated cache), see `Attention`)."""

    cfg: LlamaConfig
    dtype: Any = jnp.float32
    kv_cache: KVCacheConfig | None = None

    @nn.compact
    def __call__(self, x: jax.Array, positions: jax.Array,
                 cache: dict | None = None) -> jax.Array | tuple[jax.Array, dict]:
        """x: [B, T, dim]; positions: [B, T] int -> [B, T, dim], or ([B, T, dim], updated cache) with a layer
        `cache` (see `Attention.__call__`)."""
        eps = self.cfg.norm_eps
        attn = Attention(self.cfg, self.dtype, self.kv_cache, name="attn")
        h = RMSNorm(eps, self.dtype, name="input_norm")(x)
        if cache is None:
            x = x + attn(h, positions)
        else:
            a, cache = attn(h, positions, cache)
            x = x + a
        x = x + MLP(self.cfg, self.dtype, name="mlp")(RMSNorm(eps, self.dtype, name="post_attn_norm")(x))
        return x if cache is None else (x, cache)


class Llama(nn.Module):
    """Llama-family decoder. `dtype` is the activation compute dtype; parameters are created in fp32.
    `kv_cache` optionally quantizes keys/values (cache and full-sequence forward alike; see `jq.numbers.kvcache`)."""

    cfg: LlamaConfig
    dtype: Any = jnp.float32
    kv_cache: KVCacheConfig | None = None

    @nn.compact
    def __call__(self, tokens: jax.Array, positions: jax.Array | None = None,
                 cache: dict | None = None) -> jax.Array | tuple[jax.Array, dict]:
        """tokens: [B, T] int32; positions: [B, T] or [T] int (default arange(T)) -> logits [B, T, vocab] float32.

        cache: None, or {"layers_i": {"k": entry, "v": entry}} from `init_cache`; then the result is
        (logits, updated cache) and the new keys/values go to rows positions[0, 0] .. + T - 1.
        """
        c = self.cfg
        b, t = tokens.shape
        if positions is None:
            positions = jnp.arange(t, dtype=jnp.int32)
        positions = jnp.broadcast_to(positions, (b, t))
        embed = nn.Embed(c.vocab_size, c.dim, dtype=self.dtype, param_dtype=jnp.float32, name="embed")
        x = embed(tokens)
        new_cache = {}
        for i in range(c.n_layers):
            name = f"layers_{i}"
            block = Block(c, self.dtype, self.kv_cache, name=name)
            if cache is None:
                x = block(x, positions)
            else:
                x, new_cache[name] = block(x, positions, cache[name])
        x = RMSNorm(c.norm_eps, self.dtype, name="final_norm")(x)
        if c.tie_embeddings:
            logits = embed.attend(x)
        else:
            logits = nn.Dense(c.vocab_size, use_bias=False, dtype=self.dtype, param_dtype=jnp.float32, name="lm_head")(x)
        logits = logits.astype(jnp.float32)
        return logits if cache is None else (logits, new_cache)


def init_params(cfg: LlamaConfig, key: jax.Array) -> dict[str, Any]:
    """Random parameters (Flax default initializers) as a nested dict keyed like the module docstring."""
    variables = Llama(cfg).init(key, jnp.zeros((1, 2), jnp.int32))
    return flax.core.unfreeze(variables["params"])


def make_forward(cfg: LlamaConfig, dtype: Any = jnp.float32,
                 kv_cache: KVCacheConfig | None = None) -> Callable[[Any, jax.Array], jax.Array]:
    """forward(params, tokens[B, T] int32) -> logits[B, T, vocab] float32 (not jitted; the caller jits or wraps).
    `kv_cache` quantize-dequantizes k and v before attention (as a quantized cache would)."""
    model = Llama(cfg, dtype=dtype, kv_cache=kv_cache)

    def forward(params: Any, tokens: jax.Array) -> jax.Array:
        return model.apply({"params": params}, tokens)

    return forward


def init_cache(cfg: LlamaConfig, batch: int, max_len: int, kv_cache: KVCacheConfig | None = None,
               dtype: Any = jnp.float32) -> dict[str, dict[str, Any]]:
    """An empty KV cache {"layers_i": {"k": entry, "v": entry}} of `max_len` rows per sequence (see
    `jq.models.decoder.init_kv_cache`)."""
    return init_kv_cache(cfg, batch, max_len, kv_cache, dtype)


def cache_bytes_per_token(cfg: LlamaConfig, kv_cache: KVCacheConfig | None = None, dtype: Any = jnp.float32) -> int:
    """Bytes one token occupies in the cache over all layers (keys and values; float cache in `dtype`)."""
    return kv_bytes_per_token(cfg, kv_cache, dtype)


def make_decode(cfg: LlamaConfig, dtype: Any = jnp.float32, kv_cache: KVCacheConfig | None = None,
                ) -> tuple[Callable[..., tuple[jax.Array, dict]], Callable[..., tuple[jax.Array, dict]]]:
    """(prefill, decode_step), pure functions of (params, cache, ...) -> (logits, cache); not jitted (see
    `jq.models.decoder.decode_fns`).

    prefill(params, cache, tokens[B, T], start=0) -> (logits [B, T, vocab] f32, cache): tokens at positions
      start .. start + T - 1 (start may be traced; start + T <= max_len is the caller's to check).
    decode_step(params, cache, token[B], pos) -> (logits [B, vocab] f32, cache): one token at position `pos`.
    """
    return decode_fns(Llama(cfg, dtype=dtype, kv_cache=kv_cache))
