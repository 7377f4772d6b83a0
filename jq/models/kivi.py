"""Per-channel key quantization (KIVI, Liu et al. 2024) for decoder attention: what a query reads and what the
cache keeps when `KVCacheConfig.keys == "channel"`.

Keys are quantized per channel (and kv head) over aligned blocks of G = `key_group` positions; a block is
quantized when its last position is written, and until then its keys stay exact in the cache entry's `recent`
buffer ([B, G, H, D], in the cache dtype). A query at position p therefore reads every block that ends at or before
p quantized and its own block exact. Values stay per token (`jq.numbers.kvcache`), as in KIVI.

Each call splits the keys into a *stored* part (the cache's complete blocks, positions < g0 = G·⌊start / G⌋,
already quantized) and a *tail*: positions g0 … g0 + n − 1, n = G·(⌈T / G⌉ + 1) — the recent rows, then the T new
ones — held both exact and quantized by aligned blocks; `attend` picks, per query and key, the quantized tail key
when the key's block is complete at the query and the exact one otherwise. A full-sequence forward (no cache) is a
call with an empty stored part, so `jq eval` measures exactly what token-by-token decoding would see.

Cache entry for keys (values unchanged): codes [B, L, H, D or D/2], scale (and zero) [B, L/G, H, D] — L a
multiple of G — and `recent`; a ring buffer (sliding-window layer) needs G to divide its length and writes only
complete blocks, so no slot a later query may read is overwritten early.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

from jq.numbers import kvcache
from jq.numbers.kvcache import KVCacheConfig

__all__ = ["cache_rows", "empty_keys", "tail_complete", "split"]


def cache_rows(rows: int, kv: KVCacheConfig, ring: bool) -> int:
    """Rows of a layer's cache with per-channel keys: a full cache rounds up to whole key blocks; a ring buffer's
    length (the sliding window) must be whole blocks already."""
    g = kv.key_group
    if rows % g and ring:
        raise ValueError(f"kv_cache key_group {g} must divide the sliding window ({rows} positions) so that key "
                         f"blocks fill whole ring slots; pick a divisor of {rows}, e.g. {math.gcd(rows, 64)}")
    return rows + -rows % g


def empty_keys(shape: tuple[int, int, int, int], kv: KVCacheConfig, dtype: Any) -> dict[str, jax.Array]:
    """A zero key entry of `shape` = (B, L, H, D), L a multiple of `key_group` (`cache_rows`)."""
    b, rows, h, d = shape
    g = kv.key_group
    out = {"codes": kvcache.empty_kv((b, rows, h, d), kv, dtype)["codes"],
           "scale": jnp.ones((b, rows // g, h, d), jnp.dtype(kv.scale_dtype))}
    if not kv.symmetric:
        out["zero"] = jnp.zeros((b, rows // g, h, d), jnp.uint8)
    out["recent"] = jnp.zeros((b, g, h, d), dtype)
    return out


def tail_complete(key_pos: jax.Array, query_pos: jax.Array, g: int) -> jax.Array:
    """Whether each tail key's block is complete at each query (quantized keys are read): key_pos [B, 1, n],
    query_pos [B, Tq, 1] -> bool [B, Tq, n]."""
    return (key_pos // g + 1) * g <= query_pos + 1


def _gather_rows(x: jax.Array, rows: jax.Array) -> jax.Array:
    """x[:, rows] with rows clipped into range (rows out of range are hidden by their positions)."""
    return jnp.take(x, jnp.clip(rows, 0, x.shape[1] - 1), axis=1)


def split(cache: dict | None, k: jax.Array, v: jax.Array, positions: jax.Array, kv: KVCacheConfig, dtype: Any,
          hidden: int) -> tuple[dict, dict | None]:
    """Keys and values of one layer for attention, and the updated cache.

    k, v: [B, T, H, D] new rows at positions [B, T] (consecutive, positions[0, 0] = start); cache: None, a full
    cache {"k", "v"} or a ring {"k", "v", "pos"}. Returns ({"keys": stored ++ quantized tail, "values",
    "key_pos" [B, S + n] (`hidden` where not readable), "exact": the tail's exact keys [B, n, H, D]}, cache)."""
    g = kv.key_group
    b, t, h, d = k.shape
    start = positions[0, 0]
    g0 = start // g * g
    n = g * (-(-t // g) + 1)
    tail_pos = g0 + jnp.arange(n, dtype=positions.dtype)
    ring = cache is not None and "pos" in cache
    if cache is None:
        stored_k = stored_v = jnp.zeros((b, 0, h, d), dtype)
        stored_pos = jnp.zeros((0,), positions.dtype)
        recent_k = recent_v = jnp.zeros((b, g, h, d), dtype)
        first = start
    else:
        stored_k = kvcache.dequantize_kv(cache["k"], kv, dtype, keys=True)
        recent_k, first = cache["k"]["recent"].astype(dtype), g0
        if ring:
            slots = cache["pos"]
            stored_v = kvcache.read_kv(cache["v"], kv, dtype)
            recent_v = _gather_rows(stored_v, (g0 + jnp.arange(g)) % slots.shape[0])
            stored_pos = slots
        else:
            cache = {**cache, "v": kvcache.write_kv(cache["v"], v, start, kv)}
            stored_v = kvcache.read_kv(cache["v"], kv, dtype)
            recent_v = _gather_rows(stored_v, g0 + jnp.arange(g))
            stored_pos = jnp.arange(stored_k.shape[1], dtype=positions.dtype)
        stored_pos = jnp.where((stored_pos >= 0) & (stored_pos < g0), stored_pos, hidden)
    offset = (0, start - g0, 0, 0)
    exact = jax.lax.dynamic_update_slice(jnp.zeros((b, n, h, d), dtype).at[:, :g].set(recent_k), k.astype(dtype),
                                         offset)
    new_v = kvcache.fake_quant_kv(v, kv).astype(dtype)
    tail_v = jax.lax.dynamic_update_slice(jnp.zeros((b, n, h, d), dtype).at[:, :g].set(recent_v), new_v, offset)
    q = kvcache.quantize_kv(exact, kv, keys=True)
    tail_k = kvcache.dequantize_kv(q, kv, dtype, keys=True)
    end = start + t
    readable = (tail_pos >= first) & (tail_pos < end)
    key_pos = jnp.concatenate([stored_pos, jnp.where(readable, tail_pos, hidden)])
    out = {"keys": jnp.concatenate([stored_k, tail_k], 1), "values": jnp.concatenate([stored_v, tail_v], 1),
           "key_pos": jnp.broadcast_to(key_pos, (b, key_pos.shape[0])), "exact": exact}
    if cache is not None:
        cache = _write_back(cache, q, exact, v, positions, g0, end, kv, ring)
    return out, cache


def _write_back(cache: dict, q: dict, exact: jax.Array, v: jax.Array, positions: jax.Array, g0: jax.Array,
                end: jax.Array, kv: KVCacheConfig, ring: bool) -> dict:
    """The cache after a call: the tail's complete blocks (a ring: only the newest that fit) written as codes and
    block scales, `recent` = the exact rows of the block still open at `end`, values per token as before."""
    g = kv.key_group
    n = exact.shape[1]
    t = positions.shape[1]
    rows = g0 + jnp.arange(n)
    last = end // g * g                                          # end of the complete blocks
    keep = (rows // g + 1) * g <= end                            # the row's block is complete
    length = cache["k"]["codes"].shape[1]
    oob = length + n  # scatter with mode="drop" ignores it
    if ring:
        keep &= rows >= last - length
        slot = jnp.where(keep, rows % length, oob)
    else:
        slot = jnp.where(keep, rows, oob)
    blocks = jnp.where(keep[::g], slot[::g] // g, oob)
    k_entry = {name: cache["k"][name].at[:, blocks if name in ("scale", "zero") else slot].set(
        q[name].astype(cache["k"][name].dtype), mode="drop") for name in q}
    k_entry["recent"] = jax.lax.dynamic_slice_in_dim(exact, last - g0, g, axis=1).astype(cache["k"]["recent"].dtype)
    out = {**cache, "k": k_entry}
    if ring:
        new_pos, slots = kvcache.ring_slots(positions[0, 0], t, length)
        out["v"] = kvcache.write_kv_rows(cache["v"], v[:, t - new_pos.shape[0]:], slots, kv)
        out["pos"] = cache["pos"].at[slots].set(new_pos)
    return out
