"""Per-channel keys (KIVI, `kv_cache: {keys: channel}`): attention against a NumPy reference of what each query
reads, the cache bytes, the recipe and CLI surface, and the errors. Decode == full forward is tested with the other
caches (tests/apps/test_generate.py, tests/models/test_gemma3.py: chunked prefill, a ring past its wraps)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jq.models.decoder import attend, init_kv_cache
from jq.models.llama.config import LlamaConfig
from jq.numbers import kvcache
from jq.numbers.kvcache import KVCacheConfig
from jq.tree.recipe import recipe_from_dict
from jqtest.npref import np_encode, np_scale_zero


def np_block_channel_fq(x: np.ndarray, g: int) -> np.ndarray:
    """x [T, D] (T a multiple of g): int4 asymmetric per column over each block of g rows, as NumPy does it."""
    out = np.empty_like(x)
    for s in range(0, x.shape[0], g):
        blk = x[s:s + g]
        scale, zero = np_scale_zero(blk.min(0), blk.max(0), "int4", symmetric=False, scale_dtype="float32")
        codes, _ = np_encode(blk, scale, zero, "int4", symmetric=False)
        out[s:s + g] = (codes - zero) * scale
    return out


def np_attention(q, k, v, g, kv):
    """One kv head, one query head. q, k, v: [T, D] -> [T, D]: query p reads key j quantized per channel when
    j's block ends at or before p (blocks of g positions from 0), exact otherwise; values per token (jq's
    fake_quant, tested on its own elsewhere)."""
    t, d = k.shape
    pad = -t % g
    kq = np_block_channel_fq(np.concatenate([k, np.repeat(k[-1:], pad, 0)]), g)[:t]
    vq = np.asarray(kvcache.fake_quant_kv(jnp.asarray(v), kv))
    out = np.zeros_like(q)
    for p in range(t):
        keys = np.stack([kq[j] if (j // g + 1) * g <= p + 1 else k[j] for j in range(p + 1)])
        s = keys @ q[p] / np.sqrt(d)
        w = np.exp(s - s.max())
        out[p] = (w / w.sum()) @ vq[:p + 1]
    return out


@pytest.mark.parametrize("t", [16, 13])
def test_each_query_reads_complete_key_blocks_quantized_and_its_own_block_exact(t):
    g, d = 4, 8
    kv = KVCacheConfig("int4", keys="channel", key_group=g, scale_dtype="float32")
    rng = np.random.default_rng(0)
    q, k, v = (rng.normal(size=(t, d)).astype(np.float32) for _ in range(3))
    k *= np.linspace(0.2, 6.0, d, dtype=np.float32)  # channels of very different ranges: where per-channel helps
    positions = jnp.arange(t, dtype=jnp.int32)[None]
    got, _ = attend(jnp.asarray(q)[None, :, None], jnp.asarray(k)[None, :, None], jnp.asarray(v)[None, :, None],
                    positions, None, kv, jnp.float32, 1 / np.sqrt(d))
    np.testing.assert_allclose(np.asarray(got)[0], np_attention(q, k, v, g, kv), rtol=2e-5, atol=2e-5)


def test_per_channel_keys_fit_keys_with_outlier_channels_better_than_per_token():
    """Keys with a few outlier channels of consistently large magnitude (what KIVI observes in keys): one scale per
    channel over 64 positions errs far less than one per token, whose range the outliers stretch."""
    rng = np.random.default_rng(1)
    offset = np.zeros(64)
    offset[[3, 17, 40, 41]] = 15.0
    k = jnp.asarray(rng.normal(size=(1, 256, 1, 64)) + offset, jnp.float32)
    err = {}
    for name, cfg in {"token": KVCacheConfig("int4"), "channel": KVCacheConfig("int4", keys="channel")}.items():
        err[name] = float(jnp.mean((kvcache.fake_quant_kv(k, cfg, keys=True) - k) ** 2))
    assert err["channel"] < 0.2 * err["token"]


def test_bytes_per_token_count_block_scales_and_the_cache_holds_whole_blocks():
    cfg = LlamaConfig.tiny()  # 2 layers, 2 kv heads, head_dim 8
    kv = KVCacheConfig("int4", keys="channel", key_group=4)
    # keys: 4 code bytes + 8 channels x (2 + 1) bytes / 4 positions; values: 4 + (2 + 1) per head
    assert kvcache.kv_bytes_per_token(2, 2, 8, kv) == 2 * 2 * ((4 + 6) + (4 + 3))
    cache = init_kv_cache(cfg, 1, 10, kv)["layers_0"]
    assert cache["k"]["codes"].shape == (1, 12, 2, 4) and cache["k"]["scale"].shape == (1, 3, 2, 8)
    assert cache["k"]["recent"].shape == (1, 4, 2, 8) and cache["v"]["codes"].shape == (1, 12, 2, 4)
    assert kv.describe() == "int4 asym keys per channel /4"


def test_recipe_and_errors_name_the_value_and_the_fix():
    r = recipe_from_dict({"name": "k", "rules": [], "kv_cache": {"format": "int4", "keys": "channel",
                                                                 "key_group": 32}})
    assert r.kv_cache.per_channel_keys and r.kv_cache.key_group == 32
    with pytest.raises(ValueError, match="keys must be 'token'.*'channel'.*got 'chan'"):
        KVCacheConfig("int4", keys="chan")
    with pytest.raises(ValueError, match="key_group must be a positive.*got 0"):
        KVCacheConfig("int4", keys="channel", key_group=0)
    cfg = LlamaConfig.tiny()
    with pytest.raises(ValueError, match="key_group 3 must divide the sliding window \\(8 positions\\)"):
        init_kv_cache(cfg, 1, 16, KVCacheConfig("int4", keys="channel", key_group=3), window=lambda i: 8)
    assert not KVCacheConfig(None, keys="channel").per_channel_keys  # a float cache has nothing to quantize


def test_a_ring_of_per_channel_keys_never_overwrites_a_block_a_later_query_reads():
    """Decoding one token at a time through a ring of 8 slots (blocks of 4) equals attention over the window with
    the same quantization: the open block's slots are written only once it is complete."""
    g, w, t, d = 4, 8, 23, 8
    kv = KVCacheConfig("int4", keys="channel", key_group=g, scale_dtype="float32")
    cfg = LlamaConfig.tiny()
    rng = np.random.default_rng(2)
    q, k, v = (jnp.asarray(rng.normal(size=(1, t, 2, d)), jnp.float32) for _ in range(3))
    q = q.repeat(2, axis=2)  # 4 query heads over 2 kv heads
    positions = jnp.arange(t, dtype=jnp.int32)[None]
    full, _ = attend(q, k, v, positions, None, kv, jnp.float32, 0.3, window=w)
    cache = init_kv_cache(cfg, 1, 32, kv, window=lambda i: w)["layers_0"]
    step = jax.jit(lambda c, i: attend(jax.lax.dynamic_slice_in_dim(q, i, 1, 1),
                                       jax.lax.dynamic_slice_in_dim(k, i, 1, 1),
                                       jax.lax.dynamic_slice_in_dim(v, i, 1, 1), i[None, None], c, kv, jnp.float32,
                                       0.3, window=w))
    outs = []
    for i in range(t):
        o, cache = step(cache, jnp.int32(i))
        outs.append(o)
    np.testing.assert_allclose(np.concatenate(outs, 1), np.asarray(full), rtol=1e-5, atol=1e-5)
