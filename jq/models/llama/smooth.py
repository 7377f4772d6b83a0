"""SmoothAttention for the Llama family (QServe's QoQ; the arithmetic is `jq.algorithms.smoothattention`): the
per-channel max |K| of every layer's pre-RoPE keys (k_proj outputs) over calibration tokens, then λ folded into the
q_proj (× λ) and k_proj (÷ λ) output columns. Llama's RoPE is rotate-half, so λ is equal on channels i and i + D/2
of each head. Every layer's statistics come from one pass of the float model: the fold changes no activation other
than the queries and keys it scales, so it leaves the model's function (logits) unchanged.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jq.algorithms.smoothattention import SmoothAttentionConfig, fold_smooth_attention, smooth_attention_scales
from jq.calibration.capture import batched
from jq.interop.layers import LayerCall, layer_interceptor
from jq.interop.linen import apply
from jq.models.llama.config import LlamaConfig
from jq.models.llama.model import Llama

__all__ = ["key_absmax", "smooth_attention"]


@functools.lru_cache(maxsize=None)
def _key_fn(cfg: LlamaConfig) -> Callable[[dict, jax.Array], dict[str, jax.Array]]:
    """jitted (params, tokens [B, T]) -> {"layers_i": max |k_proj(x)| [n_kv_heads · head_dim]}, one per config."""
    model = Llama(cfg)

    def run(p, tokens):
        found: dict = {}

        def keep(c: LayerCall):
            y = c.proceed()
            if c.path.endswith("/attn/k_proj/kernel"):
                found[c.path.split("/")[0]] = jnp.max(jnp.abs(y.astype(jnp.float32)).reshape(-1, y.shape[-1]), 0)
            return y

        apply(model, {"params": p}, tokens, interceptor=layer_interceptor(keep))
        return found

    return jax.jit(run)


def key_absmax(params: dict, cfg: LlamaConfig, batches: Sequence[Any]) -> dict[str, jax.Array]:
    """{"layers_i": max |k_proj(x)| per output channel [n_kv_heads · head_dim]} over token batches [B, T] of the
    float model (keys before RoPE)."""
    step = _key_fn(cfg)
    out: dict[str, jax.Array] = {}
    for b in batches:
        new = step(params, jnp.asarray(b))
        out = {k: jnp.maximum(out[k], v) if k in out else v for k, v in new.items()}
    if not out:
        raise ValueError("smooth_attention: no calibration batch reached a k_proj layer; pass calibration tokens")
    return out


def smooth_attention(params: dict, cfg: LlamaConfig, spec: SmoothAttentionConfig, calib: Any,
                     batch_size: int = 4) -> tuple[dict, dict[str, Any]]:
    """Fold SmoothAttention into a float Llama tree (linen `params`; not modified).

    Args:
      params: float parameters (after any rotation; the keys are the same in a rotated model).
      cfg: the model config (heads, kv heads, head_dim).
      spec: α of λ = max |K|^α.
      calib: calibration tokens [S, T] int.
      batch_size: rows per forward pass.

    Returns:
      (params, info): q_proj / k_proj kernels scaled; info {"alpha", "key_absmax_max" (the largest key channel,
      before), "key_absmax_max_after"} for the log.
    """
    tokens = np.asarray(calib)
    if tokens.ndim != 2 or not len(tokens):
        raise ValueError(f"smooth_attention: calibration tokens must be [S, T] with S > 0, got shape {tokens.shape}")
    stats = key_absmax(params, cfg, batched(tokens, batch_size))
    p = {k: dict(v) if isinstance(v, dict) else v for k, v in params.items()}
    before, after = [], []
    for name, amax in stats.items():
        lam = smooth_attention_scales(amax, cfg.head_dim, spec.alpha, "half")
        attn = {**p[name]["attn"]}
        wq, wk = fold_smooth_attention(attn["q_proj"]["kernel"], attn["k_proj"]["kernel"], lam, cfg.n_heads,
                                       cfg.n_kv_heads)
        attn["q_proj"] = {**attn["q_proj"], "kernel": wq}
        attn["k_proj"] = {**attn["k_proj"], "kernel": wk}
        p[name] = {**p[name], "attn": attn}
        before.append(float(jnp.max(amax)))
        after.append(float(jnp.max(amax / lam)))
    return p, {"alpha": spec.alpha, "layers": len(stats), "key_absmax_max": max(before),
               "key_absmax_max_after": max(after)}
