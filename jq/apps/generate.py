"""Autoregressive generation with a (quantized) KV cache, for any model family that can decode (its record's
`init_cache` / `make_decode` / `cache_bytes_per_token`; the Llama family does).

One jitted prefill (per prompt length) fills the cache and samples the first new token; one jitted decode loop
(`lax.while_loop` over `decode_step`, per `max_new`) samples the rest, stopping early when every row has
produced `eos_id`. The start position is a traced argument, so prompts of different lengths reuse the decode
loop as long as the cache length is the same. Params may hold QTensors: the model runs through `jq.interop.apply`,
so quantized kernels reach `jq.ops` (and a registered kernel).

    from jq.apps.generate import generate
    new = generate(cfg, params, prompt_ids[None], max_new=32, kv=KVCacheConfig("int8"))   # [1, <= 32] int32

`generate_timed` returns the same tokens with prefill / decode / compile times (compile excluded from the
token rates), and `generate_text` runs it on a string with a tokenizer (the `jq generate` command).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jq.numbers.kvcache import KVCacheConfig
from jq.models import ModelFamily, family_of

__all__ = ["generate", "generate_timed", "generate_text", "GenerationResult", "check_lengths"]


@dataclasses.dataclass
class GenerationResult:
    """New tokens and timings of one generation.

    Attributes:
      tokens: int32 [B, n_new], the new tokens; a row that produced EOS early is padded with EOS after it.
      prompt_len: T, the prompt tokens per row.
      max_len: cache rows per row (T + max_new - 1 unless a larger max_len was asked).
      prefill_seconds / decode_seconds: run times (compile excluded); decode covers n_new - 1 steps.
      compile_seconds: tracing + XLA compile of prefill and decode together (0 when this process already
        compiled them for the same shapes).
      cache_bytes_per_token: KV-cache bytes per token over all layers (keys and values); past a sliding window,
        what each further token adds.
      cache_bytes: the cache as allocated for max_len rows (ring buffers of windowed layers included).
    """

    tokens: np.ndarray
    prompt_len: int
    max_len: int
    prefill_seconds: float
    decode_seconds: float
    compile_seconds: float
    cache_bytes_per_token: int
    cache_bytes: int = 0

    @property
    def n_new(self) -> int:
        """New tokens per row (`tokens` is [B, n_new])."""
        return int(self.tokens.shape[1])

    @property
    def prefill_tokens_per_s(self) -> float:
        """Prompt tokens per second of the prefill (batch rows × prompt_len / time)."""
        return self.tokens.shape[0] * self.prompt_len / max(self.prefill_seconds, 1e-12)

    @property
    def decode_tokens_per_s(self) -> float | None:
        """Tokens per second of the decode loop (batch rows × steps / time); None when there was no step."""
        steps = self.n_new - 1
        return self.tokens.shape[0] * steps / max(self.decode_seconds, 1e-12) if steps > 0 else None

    def summary(self) -> dict[str, Any]:
        """JSON-ready figures (no tokens)."""
        return {"batch": int(self.tokens.shape[0]), "prompt_tokens": self.prompt_len, "new_tokens": self.n_new,
                "max_len": self.max_len, "prefill_seconds": self.prefill_seconds,
                "prefill_tokens_per_s": self.prefill_tokens_per_s, "decode_seconds": self.decode_seconds,
                "decode_tokens_per_s": self.decode_tokens_per_s, "compile_seconds": self.compile_seconds,
                "kv_cache_bytes_per_token": self.cache_bytes_per_token, "kv_cache_bytes": self.cache_bytes}


def check_lengths(cfg: Any, prompt_len: int, max_new: int, max_len: int | None = None) -> int:
    """Validate lengths and return the cache length (default: prompt_len + max_new - 1, the rows written).

    Errors name the values and the fix: max_new < 1, an empty prompt, a prompt that does not fit max_len, or a
    cache longer than the model's context."""
    if isinstance(max_new, bool) or not isinstance(max_new, (int, np.integer)) or max_new < 1:
        raise ValueError(f"max_new must be an integer >= 1 (new tokens to generate), got {max_new!r}")
    if prompt_len < 1:
        raise ValueError("the prompt is empty: generation needs at least one prompt token")
    need = prompt_len + max_new - 1
    if max_len is None:
        max_len = need
    if prompt_len > max_len:
        raise ValueError(f"the prompt has {prompt_len} tokens, longer than max_len={max_len}; shorten the prompt or "
                         "raise max_len (--max-len)")
    if need > max_len:
        raise ValueError(f"prompt {prompt_len} + max_new {max_new} tokens need {need} cache rows, more than "
                         f"max_len={max_len}; lower max_new (--max-new) or raise max_len (--max-len)")
    if max_len > cfg.max_seq_len:
        raise ValueError(f"prompt {prompt_len} + max_new {max_new} tokens need a cache of {max_len} rows, beyond "
                         f"the model context max_seq_len={cfg.max_seq_len}; shorten the prompt or lower max_new")
    return int(max_len)


def explicit_mesh(tree: Any) -> jax.sharding.Mesh | None:
    """The mesh of the first leaf of `tree` placed with a NamedSharding on a mesh that has an Explicit axis, else
    None. Params restored that way (e.g. `jq.checkpoint.load(mesh=jax.make_mesh(...))`, whose axes default to
    Explicit) carry their sharding in their types, and the model's reshapes would need an output sharding each."""
    for x in jax.tree_util.tree_leaves(tree):
        sh = getattr(x, "sharding", None)
        mesh = getattr(sh, "mesh", None)
        if isinstance(sh, jax.sharding.NamedSharding) and any(
                t == jax.sharding.AxisType.Explicit for t in getattr(mesh, "axis_types", ())):
            return mesh
    return None


def _decoder(cfg: Any, capability: str):
    """The decoding function `capability` of the family of `cfg`, or a ValueError naming what is missing."""
    family: ModelFamily = family_of(cfg)
    return family.needs(capability, "generation with a KV cache")


@functools.lru_cache(maxsize=32)
def _functions(cfg: Any, dtype_name: str, kv: KVCacheConfig | None, max_new: int,
               mesh: jax.sharding.Mesh | None = None):
    """Jitted (prefill, decode_loop) for one configuration (cached, so repeated calls reuse jit's cache).
    Temperature and EOS id are traced arguments: changing them does not recompile. With a `mesh` that has
    Explicit axes (see `explicit_mesh`) both run with its axes treated as Auto (`jax.sharding.auto_axes`): XLA
    propagates the weights' shardings through the model, and tokens and cache come out replicated. Call them
    under `jax.set_mesh(mesh)`."""
    prefill, step = _decoder(cfg, "make_decode")(cfg, jnp.dtype(dtype_name), kv)

    def sample(logits: jax.Array, temperature: jax.Array, key: jax.Array) -> jax.Array:
        """logits [B, V] -> tokens [B] int32: argmax at temperature 0, else softmax(logits / temperature)."""
        hot = jax.random.categorical(key, logits / jnp.maximum(temperature, 1e-6), axis=-1)
        return jnp.where(temperature > 0, hot, jnp.argmax(logits, axis=-1)).astype(jnp.int32)

    def run_prefill(params, cache, tokens, temperature, key):
        """tokens [B, T] -> (first new token [B], cache, key)."""
        logits, cache = prefill(params, cache, tokens)
        key, sub = jax.random.split(key)
        return sample(logits[:, -1], temperature, sub), cache, key

    def run_decode(params, cache, first, start, temperature, eos, key):
        """first [B] at position `start` -> (tokens [B, max_new] with first at column 0, columns filled).
        eos < 0: no EOS; else rows stop at it and are padded with it."""
        b = first.shape[0]
        pad = jnp.maximum(eos, 0)
        out = jnp.full((b, max_new), pad, jnp.int32).at[:, 0].set(first)

        def cond(state):
            i, _, _, _, done, _ = state
            return (i < max_new) & ~jnp.all(done)

        def body(state):
            i, tok, cache, out, done, key = state
            logits, cache = step(params, cache, tok, start + i - 1)
            key, sub = jax.random.split(key)
            nxt = jnp.where(done, pad, sample(logits, temperature, sub))
            out = jax.lax.dynamic_update_slice(out, nxt[:, None], (jnp.int32(0), i))
            return i + 1, nxt, cache, out, done | (nxt == eos), key

        state = (jnp.int32(1), first, cache, out, first == eos, key)
        i, _, _, out, _, _ = jax.lax.while_loop(cond, body, state)
        return out, i

    if mesh is not None:
        replicated = jax.sharding.PartitionSpec()
        run_prefill = jax.sharding.auto_axes(run_prefill, out_sharding=replicated)
        run_decode = jax.sharding.auto_axes(run_decode, out_sharding=replicated)
    return jax.jit(run_prefill), jax.jit(run_decode)


_COMPILED: dict = {}


def _compiled(fn, *args) -> tuple[Any, float]:
    """(fn compiled ahead of time for these arguments' shapes, dtypes and tree structure, compile seconds); a
    second call with the same signature returns the cached executable and 0.0."""
    leaves, treedef = jax.tree_util.tree_flatten(args)
    sig = (fn, treedef, tuple((tuple(x.shape), str(x.dtype)) for x in leaves))
    if sig not in _COMPILED:
        if len(_COMPILED) >= 64:
            _COMPILED.clear()
        t0 = time.perf_counter()
        _COMPILED[sig] = fn.lower(*args).compile()
        return _COMPILED[sig], time.perf_counter() - t0
    return _COMPILED[sig], 0.0


def _prepare(cfg, tokens, max_new, max_len, temperature, key):
    tokens = jnp.asarray(tokens, jnp.int32)
    if tokens.ndim == 1:
        tokens = tokens[None]
    if tokens.ndim != 2:
        raise ValueError(f"tokens must be [T] or [B, T] int token ids, got shape {tuple(tokens.shape)}")
    if not temperature >= 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    max_len = check_lengths(cfg, int(tokens.shape[1]), max_new, max_len)
    key = jax.random.key(0) if key is None else key
    return tokens, max_len, jnp.float32(temperature), key


def generate(model_cfg: Any, params: Any, tokens: Any, max_new: int, kv: KVCacheConfig | None = None,
             temperature: float = 0.0, key: jax.Array | None = None, *, eos_id: int | None = None,
             max_len: int | None = None, dtype: Any = jnp.float32) -> jax.Array:
    """Generate up to `max_new` tokens after `tokens` ([T] or [B, T] int, every row the same length).

    Args:
      model_cfg: the decoder's config (its family, e.g. `LlamaConfig` for Llama, decodes).
      params: float or quantized (QTensor) parameter tree of the family's module.
      kv: KV-cache quantization (None: float cache in `dtype`).
      temperature: 0 = greedy argmax, else sampling from softmax(logits / temperature) with `key`.
      eos_id: stop when every row has produced it (rows that finished are padded with it).
      max_len: cache rows (default prompt length + max_new - 1).
    Returns: int32 [B, n] new tokens, n <= max_new (n < max_new only when all rows hit `eos_id`).
    """
    tokens, max_len, temperature, key = _prepare(model_cfg, tokens, max_new, max_len, temperature, key)
    mesh = explicit_mesh(params)
    prefill, decode = _functions(model_cfg, jnp.dtype(dtype).name, kv, int(max_new), mesh)
    with _mesh_context(mesh):
        cache = _decoder(model_cfg, "init_cache")(model_cfg, tokens.shape[0], max_len, kv, dtype)
        first, cache, key = prefill(params, cache, tokens, temperature, key)
        eos = jnp.int32(-1 if eos_id is None else eos_id)
        out, n = decode(params, cache, first, jnp.int32(tokens.shape[1]), temperature, eos, key)
    return out[:, : int(n)]


def _mesh_context(mesh):
    return jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext()


def generate_timed(model_cfg: Any, params: Any, tokens: Any, max_new: int, kv: KVCacheConfig | None = None,
                   temperature: float = 0.0, key: jax.Array | None = None, *, eos_id: int | None = None,
                   max_len: int | None = None, dtype: Any = jnp.float32, warmup: int = 0) -> GenerationResult:
    """`generate` with the prefill and the decode loop compiled ahead of time and timed separately.
    Arguments as for `generate` (tokens [T] or [B, T] int), plus `warmup` untimed runs before the timed one; returns
    a `GenerationResult` (tokens as numpy, int32 [B, n_new])."""
    tokens, max_len, temperature, key = _prepare(model_cfg, tokens, max_new, max_len, temperature, key)
    mesh = explicit_mesh(params)
    with _mesh_context(mesh):
        prefill, decode = _functions(model_cfg, jnp.dtype(dtype).name, kv, int(max_new), mesh)
        params = jax.block_until_ready(jax.device_put(params))
        cache = jax.block_until_ready(_decoder(model_cfg, "init_cache")(model_cfg, tokens.shape[0], max_len, kv, dtype))
        start, eos = jnp.int32(tokens.shape[1]), jnp.int32(-1 if eos_id is None else eos_id)

        prefill_c, compile_prefill = _compiled(prefill, params, cache, tokens, temperature, key)
        first_s, cache_s, key_s = jax.eval_shape(prefill, params, cache, tokens, temperature, key)
        decode_c, compile_decode = _compiled(decode, params, cache_s, first_s, start, temperature, eos, key_s)
        compile_s = compile_prefill + compile_decode

        for _ in range(warmup):
            f, c, k = prefill_c(params, cache, tokens, temperature, key)
            jax.block_until_ready(decode_c(params, c, f, start, temperature, eos, k))
        t0 = time.perf_counter()
        first, cache, key = jax.block_until_ready(prefill_c(params, cache, tokens, temperature, key))
        t1 = time.perf_counter()
        out, n = jax.block_until_ready(decode_c(params, cache, first, start, temperature, eos, key))
        t2 = time.perf_counter()
        return GenerationResult(
            tokens=np.asarray(out)[:, : int(n)], prompt_len=int(tokens.shape[1]), max_len=max_len,
            prefill_seconds=t1 - t0, decode_seconds=t2 - t1, compile_seconds=compile_s,
            cache_bytes_per_token=_decoder(model_cfg, "cache_bytes_per_token")(model_cfg, kv, dtype),
            cache_bytes=sum(int(x.nbytes) for x in jax.tree.leaves(cache)),
        )


def generate_text(cfg: Any, params: Any, tokenizer: Any, prompt: str, max_new: int,
                  kv: KVCacheConfig | None = None, temperature: float = 0.0, seed: int = 0,
                  max_len: int | None = None, dtype: Any = jnp.float32) -> tuple[str, GenerationResult]:
    """Encode `prompt`, generate (stopping at the tokenizer's EOS), and decode the new tokens up to the EOS.
    Returns (text, result)."""
    ids = tokenizer.encode(prompt)
    if not ids:
        raise ValueError("the prompt encodes to no tokens; pass a non-empty --prompt")
    r = generate_timed(cfg, params, np.asarray([ids], np.int32), max_new, kv, temperature, jax.random.key(seed),
                       eos_id=tokenizer.eos_id, max_len=max_len, dtype=dtype)
    new = [int(t) for t in r.tokens[0]]
    if tokenizer.eos_id is not None and tokenizer.eos_id in new:
        new = new[: new.index(tokenizer.eos_id)]
    return tokenizer.decode(new), r
