"""A Flax linen Gemma 3 decoder (text): sandwich RMSNorms, q/k RMSNorm, grouped-query attention alternating
sliding-window and global layers with their own RoPE bases, GeGLU (tanh GELU), embedding scaled by sqrt(dim),
LM head tied to the embedding.

Every projection is a plain `nn.Dense(use_bias=False)` with an (in, out) kernel. Parameter paths:

    embed/embedding                                   (vocab, dim)
    layers_{i}/input_norm/scale                       (dim,)         before attention
    layers_{i}/attn/{q,k,v,o}_proj/kernel             (dim, n_heads*head_dim) ... (n_heads*head_dim, dim)
    layers_{i}/attn/{q,k}_norm/scale                  (head_dim,)
    layers_{i}/post_attn_norm/scale                   (dim,)         on the attention output, before the residual
    layers_{i}/pre_mlp_norm/scale                     (dim,)
    layers_{i}/mlp/{gate,up}_proj/kernel              (dim, hidden_dim)
    layers_{i}/mlp/down_proj/kernel                   (hidden_dim, dim)
    layers_{i}/post_mlp_norm/scale                    (dim,)
    final_norm/scale                                  (dim,)

Norm scales multiply the normalised input (1 + w in Hugging Face's storage). q/k use the rotate-half RoPE layout
(llama.cpp stores Gemma's rows unpermuted). Decoding (`init_cache` / `make_decode`) has the Llama family's
signatures; a local layer's cache is a ring buffer of the window's rows.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from jq.models.decoder import attend, decode_fns, init_kv_cache, kv_bytes_per_token
from jq.models.gemma3.config import Gemma3Config
from jq.models.llama.model import RMSNorm, qk_rotation, rope
from jq.numbers.kvcache import KVCacheConfig

__all__ = ["Gemma3Config", "Gemma3", "Attention", "MLP", "Block", "input_rotation", "init_params", "make_forward", "init_cache",
           "make_decode", "cache_bytes_per_token"]


def _dense(features: int, dtype: Any, name: str) -> nn.Dense:
    return nn.Dense(features, use_bias=False, dtype=dtype, param_dtype=jnp.float32, name=name)


class Attention(nn.Module):
    """Grouped-query causal attention with q/k RMSNorm; `is_global` picks full attention and `rope_global`, else
    the sliding window and `rope_local`. Call and cache protocol as `jq.models.llama.model.Attention`."""

    cfg: Gemma3Config
    is_global: bool
    dtype: Any = jnp.float32
    kv_cache: KVCacheConfig | None = None

    @nn.compact
    def __call__(self, x: jax.Array, positions: jax.Array,
                 cache: dict | None = None) -> jax.Array | tuple[jax.Array, dict]:
        """x: [B, T, dim]; positions: [B, T] int -> [B, T, dim] (or, with a layer cache, ([B, T, dim], cache))."""
        c, kv = self.cfg, self.kv_cache
        b, t, _ = x.shape
        q = _dense(c.n_heads * c.head_dim, self.dtype, "q_proj")(x).reshape(b, t, c.n_heads, c.head_dim)
        k = _dense(c.n_kv_heads * c.head_dim, self.dtype, "k_proj")(x).reshape(b, t, c.n_kv_heads, c.head_dim)
        v = _dense(c.n_kv_heads * c.head_dim, self.dtype, "v_proj")(x).reshape(b, t, c.n_kv_heads, c.head_dim)
        q = RMSNorm(c.norm_eps, self.dtype, name="q_norm")(q)
        k = RMSNorm(c.norm_eps, self.dtype, name="k_norm")(k)
        theta = c.rope_global if self.is_global else c.rope_local
        q, k = rope(q, positions, theta), rope(k, positions, theta)
        rotate = qk_rotation(kv, c.head_dim)
        if rotate is not None:
            q, k = rotate(q), rotate(k)
        window = None if self.is_global else c.sliding_window
        out, cache = attend(q, k, v, positions, cache, kv, self.dtype, jnp.float32(c.query_scale ** -0.5), window)
        out = _dense(c.dim, self.dtype, "o_proj")(out)
        return out if cache is None else (out, cache)


class MLP(nn.Module):
    """GeGLU: down(gelu_tanh(gate(x)) * up(x)). x: [B, T, dim] -> [B, T, dim]."""

    cfg: Gemma3Config
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [B, T, dim] -> [B, T, dim]."""
        c = self.cfg
        h = nn.gelu(_dense(c.hidden_dim, self.dtype, "gate_proj")(x), approximate=True)
        return _dense(c.dim, self.dtype, "down_proj")(h * _dense(c.hidden_dim, self.dtype, "up_proj")(x))


def input_rotation(cfg: Gemma3Config) -> Callable[[jax.Array], jax.Array]:
    """x [..., dim] -> x Q, the rotation of the pre-norms' outputs (`cfg.residual_rotation`, set by
    `jq.models.gemma3.rotate`), or the identity for an unrotated model."""
    if cfg.residual_rotation is None:
        return lambda x: x
    from jq.numbers.hadamard import Rotation

    rot = Rotation.parse(cfg.residual_rotation)
    return lambda x: rot.apply(x.astype(jnp.float32), axis=-1).astype(x.dtype)


class Block(nn.Module):
    """x + post_attn_norm(attn(input_norm(x))), then + post_mlp_norm(mlp(pre_mlp_norm(.))). x: [B, T, dim]."""

    cfg: Gemma3Config
    is_global: bool
    dtype: Any = jnp.float32
    kv_cache: KVCacheConfig | None = None

    @nn.compact
    def __call__(self, x: jax.Array, positions: jax.Array,
                 cache: dict | None = None) -> jax.Array | tuple[jax.Array, dict]:
        """x: [B, T, dim]; positions: [B, T] int -> [B, T, dim] (with a layer cache: ([B, T, dim], cache))."""
        eps = self.cfg.norm_eps
        norm = lambda name: RMSNorm(eps, self.dtype, name=name)  # noqa: E731
        attn = Attention(self.cfg, self.is_global, self.dtype, self.kv_cache, name="attn")
        rot = input_rotation(self.cfg)  # q/k/v and gate/up read the normalised stream rotated (their rows hold Qᵀ)
        h = rot(norm("input_norm")(x))
        if cache is None:
            a = attn(h, positions)
        else:
            a, cache = attn(h, positions, cache)
        x = x + norm("post_attn_norm")(a)
        x = x + norm("post_mlp_norm")(MLP(self.cfg, self.dtype, name="mlp")(rot(norm("pre_mlp_norm")(x))))
        return x if cache is None else (x, cache)


class Gemma3(nn.Module):
    """Gemma 3 decoder. `dtype` is the activation compute dtype; parameters are created in fp32."""

    cfg: Gemma3Config
    dtype: Any = jnp.float32
    kv_cache: KVCacheConfig | None = None

    @nn.compact
    def __call__(self, tokens: jax.Array, positions: jax.Array | None = None,
                 cache: dict | None = None) -> jax.Array | tuple[jax.Array, dict]:
        """tokens: [B, T] int32; positions: [B, T] or [T] (default arange(T)) -> logits [B, T, vocab] float32
        (with a cache from `init_cache`: (logits, updated cache))."""
        c = self.cfg
        b, t = tokens.shape
        positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32) if positions is None else positions, (b, t))
        embed = nn.Embed(c.vocab_size, c.dim, dtype=self.dtype, param_dtype=jnp.float32, name="embed")
        x = embed(tokens) * jnp.asarray(c.dim ** 0.5, self.dtype)
        new_cache = {}
        for i in range(c.n_layers):
            name = f"layers_{i}"
            block = Block(c, c.is_global(i), self.dtype, self.kv_cache, name=name)
            if cache is None:
                x = block(x, positions)
            else:
                x, new_cache[name] = block(x, positions, cache[name])
        x = RMSNorm(c.norm_eps, self.dtype, name="final_norm")(x)
        logits = embed.attend(x).astype(jnp.float32)
        return logits if cache is None else (logits, new_cache)


def init_params(cfg: Gemma3Config, key: jax.Array) -> dict[str, Any]:
    """Random parameters as a nested dict keyed like the module docstring."""
    return flax.core.unfreeze(Gemma3(cfg).init(key, jnp.zeros((1, 2), jnp.int32))["params"])


def make_forward(cfg: Gemma3Config, dtype: Any = jnp.float32,
                 kv_cache: KVCacheConfig | None = None) -> Callable[[Any, jax.Array], jax.Array]:
    """forward(params, tokens [B, T] int32) -> logits [B, T, vocab] float32 (not jitted)."""
    model = Gemma3(cfg, dtype=dtype, kv_cache=kv_cache)
    return lambda params, tokens: model.apply({"params": params}, tokens)


def init_cache(cfg: Gemma3Config, batch: int, max_len: int, kv_cache: KVCacheConfig | None = None,
               dtype: Any = jnp.float32) -> dict[str, dict[str, Any]]:
    """An empty KV cache {"layers_i": {"k": entry, "v": entry}} (see `jq.models.decoder.init_kv_cache`): global
    layers max_len rows, local layers a ring buffer of `sliding_window` rows (when max_len is longer)."""
    return init_kv_cache(cfg, batch, max_len, kv_cache, dtype,
                         window=lambda i: None if cfg.is_global(i) else cfg.sliding_window)


def cache_bytes_per_token(cfg: Gemma3Config, kv_cache: KVCacheConfig | None = None, dtype: Any = jnp.float32) -> int:
    """Bytes each further token adds to the cache once the context is past the sliding window: the global layers'
    keys and values (local layers hold a fixed ring of `sliding_window` rows)."""
    n_global = sum(cfg.is_global(i) for i in range(cfg.n_layers))
    return kv_bytes_per_token(cfg, kv_cache, dtype) // cfg.n_layers * n_global


def make_decode(cfg: Gemma3Config, dtype: Any = jnp.float32, kv_cache: KVCacheConfig | None = None,
                ) -> tuple[Callable[..., tuple[jax.Array, dict]], Callable[..., tuple[jax.Array, dict]]]:
    """(prefill, decode_step) as in `jq.models.decoder.decode_fns`; params may hold QTensors."""
    return decode_fns(Gemma3(cfg, dtype=dtype, kv_cache=kv_cache))
