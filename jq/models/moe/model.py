"""A Flax linen mixture-of-experts decoder (Mixtral / Qwen-MoE style): the Llama attention, RMSNorm pre-norm blocks,
and the MLP replaced by a routed set of SwiGLU experts.

Routing (Mixtral): a float32 `router` Dense d → E gives logits; each token goes to its `top_k` experts, weighted by
the softmax of their logits (the top-k probabilities renormalised to sum to 1). Experts are stored stacked and run
by einsum over all experts at once (dense compute: every expert on every token, the combine weights zero outside
the top k — E× the flops of a sparse dispatch, but static shapes, jit- and shard-friendly for small models):

    h_te = silu(x_t · gate_e) * (x_t · up_e)           gate, up [E, D, F]   ("btd,edf->btef")
    y_t  = Σ_e c_te · (h_te · down_e)                  down [E, F, D]       ("btef,efd->bted"), c [B, T, E]

The experts are bias-free `nn.Einsum` layers, so on quantized params `jq.apply` routes them to `jq.ops.qeinsum`;
their kernels lie under an `experts` scope, where `jq.quantize_params` contracts stacked [E, K, N] weights over
axis 1 (groups per expert). The experts' scope sows its routing mask (`jq.calibration.experts.MASK`), from which
per-expert calibration statistics are taken. Parameter paths (inside `params`):

    embed/embedding                                   (vocab, dim)
    layers_{i}/input_norm/scale, post_attn_norm/scale (dim,)
    layers_{i}/attn/{q,k,v,o}_proj/kernel             as in `jq.models.llama.model`
    layers_{i}/moe/router/kernel                      (dim, n_experts)          float by default
    layers_{i}/moe/experts/{gate,up}/kernel           (n_experts, dim, expert_dim)
    layers_{i}/moe/experts/down/kernel                (n_experts, expert_dim, dim)
    final_norm/scale                                  (dim,)
    lm_head/kernel                                    (dim, vocab), only when not tied
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from jq.calibration.experts import MASK
from jq.models.llama.model import Attention, RMSNorm
from jq.models.moe.config import MoeConfig

__all__ = ["MoeConfig", "route", "Experts", "MoE", "Block", "MoeLM", "init_params", "make_forward"]


def route(logits: jax.Array, top_k: int) -> jax.Array:
    """Mixtral routing: combine weights [..., E] from router logits [..., E] — the softmax over each token's top-k
    logits at those experts, 0 elsewhere (rows sum to 1). Computed in float32; ties go to the lower index."""
    logits = logits.astype(jnp.float32)
    vals, idx = jax.lax.top_k(logits, top_k)                                              # [..., k]
    w = jax.nn.softmax(vals, axis=-1)
    return jnp.einsum("...k,...ke->...e", w, jax.nn.one_hot(idx, logits.shape[-1], dtype=jnp.float32))


class Experts(nn.Module):
    """`n_experts` SwiGLU experts stored stacked (`gate`, `up` [E, D, F], `down` [E, F, D], bias-free
    `nn.Einsum`s). `__call__(x [B, T, D], combine [B, T, E]) -> [B, T, D]` in `dtype`."""

    cfg: MoeConfig
    dtype: Any = jnp.float32

    def setup(self) -> None:
        c = self.cfg
        ein = lambda shape, eq: nn.Einsum(shape, eq, use_bias=False, dtype=self.dtype,  # noqa: E731
                                          param_dtype=jnp.float32)
        self.gate = ein((c.n_experts, c.dim, c.expert_dim), "btd,edf->btef")
        self.up = ein((c.n_experts, c.dim, c.expert_dim), "btd,edf->btef")
        self.down = ein((c.n_experts, c.expert_dim, c.dim), "btef,efd->bted")

    def hidden(self, x: jax.Array) -> jax.Array:
        """Every expert's SwiGLU hidden state: x [B, T, D] -> [B, T, E, F] (the input of `down`)."""
        return nn.silu(self.gate(x)) * self.up(x)

    def __call__(self, x: jax.Array, combine: jax.Array) -> jax.Array:
        """x [B, T, D], combine weights [B, T, E] (zero off the routed experts) -> [B, T, D]."""
        self.sow("intermediates", MASK, (combine > 0).astype(jnp.float32))
        y = self.down(self.hidden(x))                                                       # [B, T, E, D]
        return jnp.einsum("bted,bte->btd", y, combine.astype(y.dtype))


class MoE(nn.Module):
    """Router + experts: `__call__(x [B, T, D]) -> [B, T, D]`; `route(x) -> combine weights [B, T, E]`."""

    cfg: MoeConfig
    dtype: Any = jnp.float32

    def setup(self) -> None:
        self.router = nn.Dense(self.cfg.n_experts, use_bias=False, dtype=jnp.float32, param_dtype=jnp.float32)
        self.experts = Experts(self.cfg, self.dtype)

    def route(self, x: jax.Array) -> jax.Array:
        """Combine weights [B, T, E] of x [B, T, D] (float32 router logits, top-k softmax; see `route`)."""
        logits = self.router(x.astype(jnp.float32))
        self.sow("intermediates", "router_logits", logits)  # for a load-balancing loss in training
        return route(logits, self.cfg.top_k)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x [B, T, D] -> [B, T, D]."""
        return self.experts(x, self.route(x))


class Block(nn.Module):
    """Pre-norm decoder layer: x + attn(norm(x)), then + moe(norm(.)). x [B, T, D], positions [B, T] -> [B, T, D]."""

    cfg: MoeConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, positions: jax.Array) -> jax.Array:
        """x: [B, T, dim]; positions: [B, T] int -> [B, T, dim]."""
        eps = self.cfg.norm_eps
        x = x + Attention(self.cfg, self.dtype, name="attn")(RMSNorm(eps, self.dtype, name="input_norm")(x), positions)
        return x + MoE(self.cfg, self.dtype, name="moe")(RMSNorm(eps, self.dtype, name="post_attn_norm")(x))


class MoeLM(nn.Module):
    """The decoder. `dtype` is the activation compute dtype (parameters are fp32). `kv_cache` is accepted for the
    `ModelFamily.module` signature and must be None (this family has no KV-cache decoding)."""

    cfg: MoeConfig
    dtype: Any = jnp.float32
    kv_cache: Any = None

    @nn.compact
    def __call__(self, tokens: jax.Array, positions: jax.Array | None = None) -> jax.Array:
        """tokens [B, T] int32; positions [B, T] or [T] (default arange(T)) -> logits [B, T, vocab] float32."""
        if self.kv_cache is not None:
            raise ValueError("the moe family has no KV-cache quantization; drop kv_cache from the recipe")
        c = self.cfg
        b, t = tokens.shape
        positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32) if positions is None else positions, (b, t))
        embed = nn.Embed(c.vocab_size, c.dim, dtype=self.dtype, param_dtype=jnp.float32, name="embed")
        x = embed(tokens)
        for i in range(c.n_layers):
            x = Block(c, self.dtype, name=f"layers_{i}")(x, positions)
        x = RMSNorm(c.norm_eps, self.dtype, name="final_norm")(x)
        if c.tie_embeddings:
            logits = embed.attend(x)
        else:
            logits = nn.Dense(c.vocab_size, use_bias=False, dtype=self.dtype, param_dtype=jnp.float32,
                              name="lm_head")(x)
        return logits.astype(jnp.float32)


def init_params(cfg: MoeConfig, key: jax.Array) -> dict[str, Any]:
    """Random parameters (Flax default initializers) as a nested dict keyed like the module docstring."""
    return flax.core.unfreeze(MoeLM(cfg).init(key, jnp.zeros((1, 2), jnp.int32))["params"])


def make_forward(cfg: MoeConfig, dtype: Any = jnp.float32) -> Callable[[Any, jax.Array], jax.Array]:
    """forward(params, tokens [B, T]) -> logits [B, T, vocab] float32 (not jitted), float or quantized params."""
    from jq.interop.linen import apply

    model = MoeLM(cfg, dtype=dtype)
    return lambda params, tokens: apply(model, {"params": params}, tokens)
