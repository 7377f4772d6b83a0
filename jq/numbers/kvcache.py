"""KV-cache quantization: the `KVCacheConfig` a recipe carries, and the array maths of a quantized key/value cache.

Keys and values are quantized per token, per kv head, in groups of `group_size` consecutive elements along
`head_dim` (default: one group = the whole head). Arrays are `[B, T, H, D]` (batch, tokens, kv heads, head_dim);
a quantized entry is a dict of arrays with the same leading `[B, T, H]`:

    codes  uint8 [B, T, H, D]      int8 asymmetric: 0..255 (int8 symmetric: int8 -128..127)
           uint8 [B, T, H, D/2]    int4 (head_dim % 8 == 0): `jq.numbers.formats.pack(codes, 4)`, two codes per
                                   byte, low nibble first; symmetric codes are signed nibbles (two's complement)
    scale  scale_dtype [B, T, H, D/group_size]   (float16 by default)
    zero   uint8 [B, T, H, D/group_size]         asymmetric only: integer zero point in code units

The arithmetic is the library's weight convention (`jq.numbers.scheme`): asymmetric widens the range to contain 0,
scale = (max − min) / (2^b − 1), zero = round(−min / scale), code = clip(round(x / scale) + zero, 0, 2^b − 1),
x̂ = (code − zero) · scale; symmetric scale = absmax / ((2^b − 1) / 2), code in [−2^(b−1), 2^(b−1) − 1].
The scale is rounded to `scale_dtype` before the codes are computed, so the stored scale and codes agree.

Bytes per token (one layer, keys + values): `2 · H · (code bytes + groups · (scale bytes + zero bytes))`, see
`kv_bytes_per_token`. SmolLM2-135M (30 layers, 3 kv heads, head_dim 64): bf16 23 040 B/token, int8 12 060,
int4 g64 6 300.

This module knows only arrays: the rotation (`rotate`, as `KVCacheConfig.rotation`) is applied by the model.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from jq.numbers.formats import pack, packed_length, unpack
from jq.numbers.grid import Grid
from jq.numbers.hadamard import Rotation

__all__ = ["KVCacheConfig", "KV_FORMATS", "quantize_kv", "dequantize_kv", "fake_quant_kv", "empty_kv", "write_kv",
           "write_kv_rows", "ring_slots", "read_kv", "kv_bytes_per_token"]

KV_FORMATS = ("int8", "int4")
_SCALE_DTYPES = ("float16", "bfloat16", "float32")


@dataclasses.dataclass(frozen=True)
class KVCacheConfig:
    """How the key/value cache (and, in the full-sequence forward, k and v before attention) is quantized.

    Attributes:
      format: "int8" | "int4", or None for a float cache (useful with `rotate` alone).
      group_size: elements of head_dim sharing one scale (must divide head_dim); None = head_dim (one per head).
      symmetric: signed codes and no zero point (default False: asymmetric, integer zero point).
      rotate: rotate q and k after RoPE by the same orthogonal matrix (`rotation`: true for the normalized
        Hadamard transform, "hadamard(seed=N)" for a randomized one): q·k is unchanged, outlier channels of k are
        spread before k is quantized.
      scale_dtype: "float16" (default) | "bfloat16" | "float32", the stored scale's dtype.
      keys: "token" (default: keys grouped along head_dim like values) | "channel" (KIVI: one scale and zero per
        key channel for each aligned block of `key_group` positions; the block still being filled stays float,
        so a query reads its own block's keys exact and every earlier block quantized).
      key_group: positions sharing a key channel's scale when keys are per channel (default 64).
    """

    format: str | None = "int8"
    group_size: int | None = None
    symmetric: bool = False
    rotate: bool | str = False
    scale_dtype: str = "float16"
    keys: str = "token"
    key_group: int = 64

    def __post_init__(self) -> None:
        if self.keys not in ("token", "channel"):
            raise ValueError(f"kv_cache keys must be 'token' (scales along head_dim) or 'channel' (KIVI: scales "
                             f"per channel over key_group positions), got {self.keys!r}")
        if isinstance(self.key_group, bool) or not isinstance(self.key_group, int) or self.key_group <= 0:
            raise ValueError(f"kv_cache key_group must be a positive number of positions, got {self.key_group!r}")
        if self.format is not None and self.format not in KV_FORMATS:
            raise ValueError(f"kv_cache format {self.format!r} is not supported; choose one of {list(KV_FORMATS)}")
        if self.group_size is not None and (isinstance(self.group_size, bool) or not isinstance(self.group_size, int)
                                            or self.group_size <= 0):
            raise ValueError(f"kv_cache group_size must be a positive integer dividing head_dim (or null for one "
                             f"group per head), got {self.group_size!r}")
        if not isinstance(self.symmetric, bool):
            raise ValueError(f"kv_cache symmetric must be true or false, got {self.symmetric!r}")
        if not isinstance(self.rotate, bool):  # a rotation's string form ("hadamard(seed=3)") or a Rotation
            try:
                rot = Rotation.parse(self.rotate)
            except ValueError:
                raise ValueError(f"kv_cache rotate must be true, false, 'hadamard' or 'hadamard(seed=N)', got "
                                 f"{self.rotate!r}") from None
            object.__setattr__(self, "rotate", False if rot is None else str(rot))
        if self.scale_dtype not in _SCALE_DTYPES:
            raise ValueError(f"kv_cache scale_dtype {self.scale_dtype!r} is not supported; choose one of "
                             f"{list(_SCALE_DTYPES)}")

    @property
    def rotation(self) -> Rotation | None:
        """The rotation of q and k (`rotate`), as the one `Rotation` type jq uses everywhere."""
        return Rotation.parse(self.rotate)

    @property
    def quantized(self) -> bool:
        """Whether k/v are quantized (False: a float cache, possibly rotated)."""
        return self.format is not None

    @property
    def bits(self) -> int:
        """Code width of the quantized cache (8 or 4); ValueError for a float cache."""
        if self.format is None:
            raise ValueError("a float kv cache (format None) has no code width")
        return int(self.format[3:])

    def groups(self, head_dim: int) -> int:
        """Scale groups per head; errors when group_size does not divide head_dim."""
        g = self.group_size or head_dim
        if head_dim % g:
            raise ValueError(f"kv_cache group_size {g} does not divide head_dim {head_dim}; pick a divisor "
                             f"(e.g. {head_dim // 2 if head_dim % 2 == 0 else head_dim}) or null for one group per "
                             "head")
        return head_dim // g

    def describe(self) -> str:
        """Short human-readable form, e.g. 'int4 asym g64 rot'."""
        if self.format is None:
            return "float" + (" rot" if self.rotate else "")
        g = f" g{self.group_size}" if self.group_size else ""
        keys = f" keys per channel /{self.key_group}" if self.per_channel_keys else ""
        return f"{self.format} {'sym' if self.symmetric else 'asym'}{g}{keys}" + (" rot" if self.rotate else "")

    @property
    def per_channel_keys(self) -> bool:
        """Whether keys are quantized per channel over blocks of `key_group` positions (KIVI)."""
        return self.quantized and self.keys == "channel"


def _grouped(x: jax.Array, n_groups: int) -> jax.Array:
    """[..., D] -> [..., n_groups, D / n_groups]."""
    return x.reshape(x.shape[:-1] + (n_groups, x.shape[-1] // n_groups))


def _grid(kv: KVCacheConfig) -> Grid:
    """The library's weight grid for this cache (integer zero point, scale in `scale_dtype`)."""
    return Grid(format=kv.format, symmetric=kv.symmetric, scale_dtype=kv.scale_dtype)


def quantize_kv(x: jax.Array, kv: KVCacheConfig, keys: bool = False) -> dict[str, jax.Array]:
    """Quantize keys or values. x: [..., D] float (usually [B, T, H, D]) -> {"codes", "scale"[, "zero"]} as in
    the module docstring (codes [..., D] or [..., D/2] for int4; scale/zero [..., D/group_size]).

    keys=True with per-channel keys (`kv.keys == "channel"`): x is [..., T, H, D] with T a multiple of
    `kv.key_group`, grouped along T instead: scale/zero [..., T/key_group, H, D], codes as above."""
    d = x.shape[-1]
    if kv.bits == 4 and d % 8:
        raise ValueError(f"an int4 kv cache packs codes eight at a time (`jq.numbers.formats.pack`) and needs a "
                         f"head_dim divisible by 8, got {d}; use int8")
    sch = _grid(kv)
    if keys and kv.per_channel_keys:
        xg, axis = _blocks(x.astype(jnp.float32), kv.key_group), -3                      # [..., T/G, G, H, D]
    else:
        xg, axis = _grouped(x.astype(jnp.float32), kv.groups(d)), -1                     # [..., n, g]
    scale, zero = sch.scale_zero(jnp.min(xg, axis=axis, keepdims=True), jnp.max(xg, axis=axis, keepdims=True))
    codes = sch.encode(xg, scale, zero).reshape(x.shape)
    out = {} if zero is None else {"zero": jnp.squeeze(zero, axis).astype(jnp.uint8)}
    out["codes"] = pack(codes, 4) if kv.bits == 4 else codes
    out["scale"] = jnp.squeeze(scale, axis).astype(kv.scale_dtype)
    return out


def dequantize_kv(q: dict[str, jax.Array], kv: KVCacheConfig, dtype: Any = jnp.float32,
                  keys: bool = False) -> jax.Array:
    """Inverse of `quantize_kv` (same `keys`): {"codes", "scale"[, "zero"]} -> [..., D] in `dtype`."""
    codes = q["codes"]
    if kv.bits == 4:
        codes = unpack(codes, 4, 2 * codes.shape[-1], signed=kv.symmetric)  # head_dim % 8 == 0: no padding
    if keys and kv.per_channel_keys:
        grouped, axis = _blocks(codes, kv.key_group), -3
    else:
        grouped, axis = _grouped(codes, q["scale"].shape[-1]), -1
    zero = None if kv.symmetric else jnp.expand_dims(q["zero"], axis).astype(jnp.float32)
    x = _grid(kv).decode(grouped, jnp.expand_dims(q["scale"], axis).astype(jnp.float32), zero)
    return x.reshape(codes.shape).astype(dtype)


def _blocks(x: jax.Array, g: int) -> jax.Array:
    """[..., T, H, D] -> [..., T/g, g, H, D] (T a multiple of g)."""
    *lead, t, h, d = x.shape
    if t % g:
        raise ValueError(f"per-channel keys quantize blocks of key_group={g} positions; got {t} rows")
    return x.reshape(*lead, t // g, g, h, d)


def fake_quant_kv(x: jax.Array, kv: KVCacheConfig | None, keys: bool = False) -> jax.Array:
    """dequantize(quantize(x)) in x's dtype; x unchanged when `kv` is None or a float cache. x: [..., D]; with
    keys=True and per-channel keys x is [..., T, H, D], T a multiple of key_group (blocks from row 0)."""
    if kv is None or not kv.quantized:
        return x
    return dequantize_kv(quantize_kv(x, kv, keys), kv, x.dtype, keys)


def empty_kv(shape: tuple[int, ...], kv: KVCacheConfig | None, dtype: Any = jnp.float32) -> jax.Array | dict:
    """A zero cache entry for keys or values of `shape` = (B, max_len, H, D): a float array in `dtype`, or the
    quantized dict (zero codes, unit scales) when `kv` quantizes."""
    if kv is None or not kv.quantized:
        return jnp.zeros(shape, dtype)
    *lead, d = shape
    n = kv.groups(d)
    code_d = packed_length(d, kv.bits)
    out = {"codes": jnp.zeros((*lead, code_d), jnp.int8 if kv.symmetric and kv.bits == 8 else jnp.uint8),
           "scale": jnp.ones((*lead, n), jnp.dtype(kv.scale_dtype))}
    if not kv.symmetric:
        out["zero"] = jnp.zeros((*lead, n), jnp.uint8)
    return out


def kv_bytes_per_token(n_layers: int, n_kv_heads: int, head_dim: int, kv: KVCacheConfig | None,
                       dtype: Any = jnp.float32) -> int:
    """Cache bytes one token occupies over all layers, keys and values (float cache: in `dtype`; per-channel keys:
    their block scales spread over the block's positions, rounded up; the one open block per layer is not
    counted)."""
    if kv is None or not kv.quantized:
        return 2 * n_layers * n_kv_heads * head_dim * jnp.dtype(dtype).itemsize
    param_bytes = jnp.dtype(kv.scale_dtype).itemsize + (0 if kv.symmetric else 1)
    code = packed_length(head_dim, kv.bits)
    values = code + kv.groups(head_dim) * param_bytes
    keys = code + -(-head_dim * param_bytes // kv.key_group) if kv.per_channel_keys else values
    return n_layers * n_kv_heads * (keys + values)


def _write(entry: jax.Array | dict, new: jax.Array, kv: KVCacheConfig | None,
           put: Callable[[jax.Array, jax.Array], jax.Array]) -> jax.Array | dict:
    """`new` (quantized first when `kv` quantizes) written into every array of the entry by `put(buf, val)`."""
    if kv is None or not kv.quantized:
        return put(entry, new.astype(entry.dtype))
    q = quantize_kv(new, kv)
    return {name: put(entry[name], q[name].astype(entry[name].dtype)) for name in entry}


def write_kv(entry: jax.Array | dict, new: jax.Array, start: jax.Array | int,
             kv: KVCacheConfig | None) -> jax.Array | dict:
    """Write `new` [B, T, H, D] into the cache entry at rows start .. start + T - 1 (quantizing it first when `kv`
    quantizes); every array of a quantized entry is updated at the same rows. `start` may be traced.

    Like `lax.dynamic_update_slice`, a start past max_len - T is clamped: callers check lengths beforehand."""
    zero, start = jnp.zeros((), jnp.int32), jnp.asarray(start, jnp.int32)
    return _write(entry, new, kv, lambda buf, val: jax.lax.dynamic_update_slice(
        buf, val, (zero, start) + (zero,) * (buf.ndim - 2)))


def write_kv_rows(entry: jax.Array | dict, new: jax.Array, rows: jax.Array, kv: KVCacheConfig | None
                  ) -> jax.Array | dict:
    """Write `new` [B, T, H, D] into the cache entry at the T distinct rows `rows` (int [T], may be traced; a ring
    buffer's slots), quantizing it first when `kv` quantizes."""
    return _write(entry, new, kv, lambda buf, val: buf.at[:, rows].set(val))


def ring_slots(start: jax.Array | int, t: int, length: int) -> tuple[jax.Array, jax.Array]:
    """Where T new rows at positions start … start + T − 1 go in a ring of `length` slots: (positions of the rows
    that can still be read later — the last min(T, length) — and their slots, position mod length), both int32."""
    span = min(t, length)
    new_pos = jnp.asarray(start, jnp.int32) + jnp.arange(t - span, t, dtype=jnp.int32)
    return new_pos, new_pos % length


def read_kv(entry: jax.Array | dict, kv: KVCacheConfig | None, dtype: Any = jnp.float32) -> jax.Array:
    """The whole cache entry as a float array [B, L, H, D] in `dtype` (dequantized when quantized)."""
    if kv is None or not kv.quantized:
        return entry.astype(dtype)
    return dequantize_kv(entry, kv, dtype)
