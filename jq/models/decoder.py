"""Pieces every decoder family shares: causal grouped-query attention over a (quantized) KV cache, the cache, the
prefill / decode pair, and parsing of the GGUF / Hugging Face tensor names of per-layer tables. A family keeps what
differs (its projections, norms, RoPE, MLP, name tables)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from jq.models import kivi
from jq.numbers import kvcache
from jq.numbers.kvcache import KVCacheConfig

__all__ = ["attend", "init_kv_cache", "kv_bytes_per_token", "decode_fns", "gguf_path", "hf_path"]


def attend(q: jax.Array, k: jax.Array, v: jax.Array, positions: jax.Array, cache: dict | None,
           kv: KVCacheConfig | None, dtype: Any, scale: jax.Array | float,
           window: int | None = None) -> tuple[jax.Array, dict | None]:
    """Causal grouped-query attention of one layer.

    q: [B, T, H, D] and k, v: [B, T, KV, D] (after RoPE); query head h reads kv head h // (H / KV); positions:
    [B, T] int. Without a cache, k and v are quantize-dequantized by `kv` (as a quantized cache would hold them);
    with one ({"k": entry, "v": entry} of L rows), the T new rows are written at positions[0, 0] ... and the queries
    read all L rows with row <= query position; with a ring buffer ({"k", "v", "pos"}: `init_kv_cache` gives one
    to a layer whose window is shorter than the cache) the queries read the ring's earlier rows and the new ones,
    and the new rows then overwrite the oldest slots. `window`: keys further than window - 1 positions back are
    hidden (sliding-window attention). Scores are scaled by `scale`. Returns (out [B, T, H*D] in `dtype`, updated
    cache or None).
    """
    b, t, n_heads, hd = q.shape
    n_kv = k.shape[2]
    q = q.reshape(b, t, n_kv, n_heads // n_kv, hd)
    exact = None  # per-channel keys: the exact keys of the tail (`jq.models.kivi`)
    if kv is not None and kv.per_channel_keys:
        parts, cache = kivi.split(cache, k, v, positions, kv, dtype, jnp.iinfo(positions.dtype).max)
        k, v, key_pos, exact = parts["keys"], parts["values"], parts["key_pos"], parts["exact"]
    elif cache is None:
        k, v = kvcache.fake_quant_kv(k, kv), kvcache.fake_quant_kv(v, kv)
        key_pos = positions
    elif "pos" in cache:
        k, v, key_pos, cache = _ring(cache, k, v, positions, kv, dtype)
    else:
        start = positions[0, 0]
        cache = {"k": kvcache.write_kv(cache["k"], k, start, kv), "v": kvcache.write_kv(cache["v"], v, start, kv)}
        k, v = kvcache.read_kv(cache["k"], kv, dtype), kvcache.read_kv(cache["v"], kv, dtype)
        key_pos = jnp.broadcast_to(jnp.arange(k.shape[1], dtype=positions.dtype), (b, k.shape[1]))
    scores = jnp.einsum("bqkgd,bskd->bkgqs", q, k, preferred_element_type=jnp.float32) * scale
    qp, kp = positions[:, :, None], key_pos[:, None, :]                                    # [B, Tq, Tk]
    if exact is not None:  # a tail key is read quantized once its block is complete, exact before
        n = exact.shape[1]
        exact_scores = jnp.einsum("bqkgd,bskd->bkgqs", q, exact, preferred_element_type=jnp.float32) * scale
        complete = kivi.tail_complete(kp[..., -n:], qp, kv.key_group)[:, None, None]
        scores = jnp.concatenate([scores[..., :-n], jnp.where(complete, scores[..., -n:], exact_scores)], -1)
    visible = qp >= kp
    if window is not None:
        visible &= qp - kp < window
    scores = jnp.where(visible[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(dtype)
    return jnp.einsum("bkgqs,bskd->bqkgd", probs, v).reshape(b, t, n_heads * hd), cache


def _ring(cache: dict, k: jax.Array, v: jax.Array, positions: jax.Array, kv: KVCacheConfig | None, dtype: Any
          ) -> tuple[jax.Array, jax.Array, jax.Array, dict]:
    """A ring-buffer layer's keys and values to attend over — its R slots (those holding positions before the new
    rows; the others hidden) then the T new rows as the cache holds them — their positions [B, R + T], and the
    cache with the last min(T, R) new rows written over the oldest slots, (position) mod R."""
    b, t = positions.shape
    pos = cache["pos"]
    ring = pos.shape[0]
    start = positions[0, 0]
    hidden = jnp.iinfo(positions.dtype).max  # a key "after" every query: never visible
    old_pos = jnp.where((pos >= 0) & (pos < start), pos, hidden).astype(positions.dtype)
    keys = jnp.concatenate([kvcache.read_kv(cache["k"], kv, dtype), kvcache.fake_quant_kv(k, kv).astype(dtype)], 1)
    values = jnp.concatenate([kvcache.read_kv(cache["v"], kv, dtype), kvcache.fake_quant_kv(v, kv).astype(dtype)], 1)
    key_pos = jnp.concatenate([jnp.broadcast_to(old_pos, (b, ring)), positions], axis=1)
    new_pos, slots = kvcache.ring_slots(start, t, ring)  # only the newest `ring` rows can still be read later
    span = new_pos.shape[0]
    cache = {"k": kvcache.write_kv_rows(cache["k"], k[:, t - span:], slots, kv),
             "v": kvcache.write_kv_rows(cache["v"], v[:, t - span:], slots, kv), "pos": pos.at[slots].set(new_pos)}
    return keys, values, key_pos, cache


def init_kv_cache(cfg: Any, batch: int, max_len: int, kv: KVCacheConfig | None = None, dtype: Any = jnp.float32,
                  window: Callable[[int], int | None] | None = None) -> dict[str, dict[str, Any]]:
    """An empty cache {"layers_i": {"k": entry, "v": entry}} for a config with n_layers / n_kv_heads / head_dim /
    max_seq_len: entries [batch, max_len, n_kv_heads, head_dim] in `dtype`, or the quantized dicts of
    `jq.numbers.kvcache` when `kv` quantizes. `window(i)`: layer i's attention window (None: full attention); a
    layer whose window is shorter than max_len gets a ring buffer instead — entries of `window` rows and "pos"
    int32 [window], the position each slot holds (−1: empty) — so sliding-window layers take the same memory
    whatever the context. Errors when max_len exceeds the model context."""
    if batch < 1 or max_len < 1:
        raise ValueError(f"a KV cache needs batch >= 1 and max_len >= 1, got batch={batch}, max_len={max_len}")
    if max_len > cfg.max_seq_len:
        raise ValueError(f"max_len {max_len} exceeds the model context max_seq_len={cfg.max_seq_len}; use a "
                         "shorter prompt or fewer new tokens")
    out = {}
    for i in range(cfg.n_layers):
        w = window(i) if window is not None else None
        ring = w is not None and w < max_len
        rows = w if ring else max_len
        channel_keys = kv is not None and kv.per_channel_keys
        if channel_keys:
            rows = kivi.cache_rows(rows, kv, ring)
        shape = (batch, rows, cfg.n_kv_heads, cfg.head_dim)
        keys = kivi.empty_keys(shape, kv, dtype) if channel_keys else kvcache.empty_kv(shape, kv, dtype)
        out[f"layers_{i}"] = {"k": keys, "v": kvcache.empty_kv(shape, kv, dtype)}
        if ring:
            out[f"layers_{i}"]["pos"] = jnp.full((rows,), -1, jnp.int32)
    return out


def kv_bytes_per_token(cfg: Any, kv: KVCacheConfig | None = None, dtype: Any = jnp.float32) -> int:
    """Bytes one token occupies in the cache over all layers (keys and values; float cache in `dtype`)."""
    return kvcache.kv_bytes_per_token(cfg.n_layers, cfg.n_kv_heads, cfg.head_dim, kv, dtype)


def decode_fns(model: Any) -> tuple[Callable[..., tuple[jax.Array, dict]], Callable[..., tuple[jax.Array, dict]]]:
    """(prefill, decode_step) of a linen decoder `model(tokens, positions, cache) -> (logits, cache)`; pure, not
    jitted; params may hold QTensors (the model runs through `jq.interop.apply`).

    prefill(params, cache, tokens [B, T], start=0) -> (logits [B, T, V] f32, cache): positions start ... start + T - 1.
    decode_step(params, cache, token [B], pos) -> (logits [B, V] f32, cache): one token at position `pos`.
    """
    from jq.interop.linen import apply

    def prefill(params: Any, cache: dict, tokens: jax.Array, start: jax.Array | int = 0) -> tuple[jax.Array, dict]:
        positions = jnp.asarray(start, jnp.int32) + jnp.arange(tokens.shape[1], dtype=jnp.int32)
        return apply(model, {"params": params}, tokens, positions, cache)

    def decode_step(params: Any, cache: dict, token: jax.Array, pos: jax.Array | int) -> tuple[jax.Array, dict]:
        logits, cache = apply(model, {"params": params}, token[:, None], jnp.full((1,), pos, jnp.int32), cache)
        return logits[:, 0], cache

    return prefill, decode_step


def gguf_path(name: str, n_layers: int, block: Mapping[str, str], top: Mapping[str, str]) -> str | None:
    """The parameter path of GGUF tensor `name`: `blk.{i}.{g}.weight` -> layers_{i}/block[g]; `{g}.weight` ->
    top[g]; None when neither table has it."""
    parts = name.split(".")
    if len(parts) == 2 and parts[1] == "weight" and parts[0] in top:
        return top[parts[0]]
    if (len(parts) == 4 and parts[0] == "blk" and parts[1].isdigit() and int(parts[1]) < n_layers
            and parts[2] in block and parts[3] == "weight"):
        return f"layers_{parts[1]}/{block[parts[2]]}"
    return None


def hf_path(name: str, n_layers: int, block: Mapping[str, str], top: Mapping[str, str]) -> str | None:
    """The parameter path of Hugging Face tensor `name`: `model.layers.{i}.{h}.weight` -> layers_{i}/block[h];
    `{h}.weight` -> top[h]; None when neither table has it."""
    if name.endswith(".weight") and name.removesuffix(".weight") in top:
        return top[name.removesuffix(".weight")]
    parts = name.split(".", 3)
    if len(parts) == 4 and parts[:2] == ["model", "layers"] and parts[2].isdigit() and int(parts[2]) < n_layers:
        module = parts[3].removesuffix(".weight")
        if parts[3].endswith(".weight") and module in block:
            return f"layers_{parts[2]}/{block[module]}"
    return None
