"""Number formats: integer grids, fp8 / fp4 / NF4 value sets, rounding to them, and exact sub-byte packing.

A format knows how a real number `y` (already divided by its scale, plus the zero point for asymmetric integers)
becomes a *code*, and how a code becomes a value again. Scales, groups and layouts live in `qtensor` and `ranges`.

Codes are stored as:
- int formats: int8 (symmetric, two's complement) or uint8 (asymmetric, 0 .. 2^b-1), packed to `bits` per code;
- fp8: the float8 dtype itself (e4m3fn / e5m2), one byte per code, directly usable by fp8 matmuls;
- fp4 e2m1 and NF4: the 4-bit index into the format's 16-value table (for fp4 that index *is* the e2m1 bit
  pattern), packed two per byte;
- learned codebooks ("lut": `cb3`, `cb8x2`, …): a `bits`-bit index per vector of `vec` consecutive weights along
  the pack axis into a table the QTensor itself stores (one per channel / group: `jq.numbers.codebook`), packed.
"""

from __future__ import annotations

import dataclasses
import functools
import statistics

import jax.numpy as jnp
import ml_dtypes
import numpy as np
from jax.typing import DTypeLike

__all__ = [
    "Format",
    "FORMATS",
    "get_format",
    "pack",
    "unpack",
    "packed_length",
]


@dataclasses.dataclass(frozen=True)
class Format:
    """A number format. `kind` is "int", "float" (fp8, cast by dtype), "codebook" (a fixed 2^bits value table) or
    "lut" (a learned table of 2^bits vectors of length `vec` that each QTensor stores: `jq.numbers.codebook`).

    Attributes:
      name: registry name, e.g. "int4", "fp8_e4m3", "nf4", "cb3", "cb8x2".
      kind: "int" | "float" | "codebook" | "lut".
      bits: storage bits per code (before packing); for "lut", per index (one index per `vec` weights).
      vec: weights per code (1 but for vector codebooks).
      max: largest representable magnitude of a code's value (for int: 2^(bits-1)-1 in the signed view; for
        "lut": 1, the stored tables being normalised to [-1, 1] by their scale).
    """

    name: str
    kind: str
    bits: int
    dtype_name: str | None = None  # fp8 storage dtype
    table: tuple[float, ...] | None = None  # codebook values indexed by code
    vec: int = 1  # weights per code (vector codebooks)

    @property
    def is_int(self) -> bool:
        """Whether this is an integer format."""
        return self.kind == "int"

    @property
    def max(self) -> float:
        """The largest magnitude of a code's value (int: 2^(bits-1)-1; float: the dtype's max; codebook: max |v|)."""
        if self.kind == "int":
            return float(2 ** (self.bits - 1) - 1)
        if self.kind == "float":
            return float(ml_dtypes.finfo(self.dtype).max)
        if self.kind == "lut":
            return 1.0
        return float(max(abs(v) for v in self.table))

    @property
    def dtype(self) -> type[np.generic] | None:
        """The fp8 storage dtype (an ml_dtypes scalar type), None for other formats."""
        return getattr(ml_dtypes, self.dtype_name) if self.dtype_name else None

    @property
    def packs(self) -> bool:
        """Whether codes are bit-packed (everything under 8 bits)."""
        return self.bits < 8

    def int_range(self, symmetric: bool, restricted: bool = False) -> tuple[int, int]:
        """Code range of an int format: signed two's complement if symmetric, else unsigned.

        `restricted` drops the most negative code so the grid is symmetric about zero (-7..7 for int4).
        """
        if not self.is_int:
            raise ValueError(f"format {self.name!r} is not an integer format; it has no integer code range")
        if symmetric:
            hi = 2 ** (self.bits - 1) - 1
            return (-hi if restricted else -hi - 1), hi
        return 0, 2**self.bits - 1

    # -- rounding -------------------------------------------------------------------------------------------
    @property
    def bits_per_weight(self) -> float:
        """Index bits per logical weight (`bits / vec`), before scales and tables."""
        return self.bits / self.vec

    def _no_fixed_values(self, what: str) -> ValueError:
        return ValueError(f"format {self.name!r} is a learned codebook (one table per channel / group, fitted to the "
                          f"weights), so it has no fixed values to {what}; quantize with method: kmeans")

    def encode(self, y: jnp.ndarray, *, symmetric: bool = True, restricted: bool = False) -> jnp.ndarray:
        """Round scaled values `y` to codes (int8/uint8, fp8 dtype, or uint8 table indices). Shape preserved."""
        if self.kind == "lut":
            raise self._no_fixed_values("round to")
        if self.kind == "int":
            lo, hi = self.int_range(symmetric, restricted)
            dt = jnp.int8 if symmetric else jnp.uint8
            return jnp.clip(jnp.round(y), lo, hi).astype(dt)
        if self.kind == "float":
            m = self.max
            return jnp.clip(y, -m, m).astype(self.dtype)
        values, order, mids = _codebook_search(self.table)
        idx = jnp.searchsorted(jnp.asarray(mids), y.astype(jnp.float32), side="left")
        return jnp.asarray(order)[idx]

    def decode(self, codes: jnp.ndarray, dtype: DTypeLike = jnp.float32) -> jnp.ndarray:
        """Code → value of the format (before scale / zero point), in `dtype`. Shape preserved."""
        if self.kind == "codebook":
            return jnp.asarray(np.asarray(self.table, np.float32))[codes.astype(jnp.int32)].astype(dtype)
        if self.kind == "lut":
            raise self._no_fixed_values("decode to (QTensor.dequantize reads its stored table)")
        return codes.astype(dtype)

    def values(self, symmetric: bool = True, restricted: bool = False) -> np.ndarray:
        """All finite values the format can produce, sorted, float32 [n] (for tests and MSE searches)."""
        if self.kind == "int":
            lo, hi = self.int_range(symmetric, restricted)
            return np.arange(lo, hi + 1, dtype=np.float32)
        if self.kind == "float":
            allv = np.arange(256, dtype=np.uint8).view(self.dtype).astype(np.float32)
            return np.unique(allv[np.isfinite(allv)])
        if self.kind == "lut":
            raise self._no_fixed_values("list")
        return np.unique(np.asarray(self.table, np.float32))


@functools.lru_cache(maxsize=None)
def _codebook_search(table: tuple[float, ...]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sorted distinct values, the code of each, and the midpoints between neighbours (for searchsorted)."""
    arr = np.asarray(table, np.float32)
    values, first = np.unique(arr, return_index=True)  # keeps the first code of a repeated value (+0 over -0)
    mids = (values[1:] + values[:-1]) / 2
    return values, first.astype(np.uint8), mids


def _fp4_e2m1_table() -> tuple[float, ...]:
    codes = np.arange(16, dtype=np.uint8).view(ml_dtypes.float4_e2m1fn)
    return tuple(float(v) for v in codes.astype(np.float32))


def _nf4_table(offset: float = 0.9677083) -> tuple[float, ...]:
    """NormalFloat4 (QLoRA, Dettmers et al. 2023): quantiles of N(0, 1), 8 positive, 7 negative and an exact zero,
    normalised to [-1, 1]. `offset` is the paper's (1 - 1/(2·15) + 1 - 1/(2·16)) / 2."""
    nd = statistics.NormalDist()
    pos = [nd.inv_cdf(p) for p in np.linspace(offset, 0.5, 9)[:-1]]
    neg = [-nd.inv_cdf(p) for p in np.linspace(offset, 0.5, 8)[:-1]]
    vals = np.sort(np.asarray(pos + [0.0] + neg, np.float64))
    vals = vals / np.abs(vals).max()
    return tuple(float(v) for v in vals)


FORMATS: dict[str, Format] = {
    **{f"int{b}": Format(f"int{b}", "int", b) for b in range(2, 9)},
    "fp8_e4m3": Format("fp8_e4m3", "float", 8, dtype_name="float8_e4m3fn"),
    "fp8_e5m2": Format("fp8_e5m2", "float", 8, dtype_name="float8_e5m2"),
    "fp4_e2m1": Format("fp4_e2m1", "codebook", 4, table=_fp4_e2m1_table()),
    "nf4": Format("nf4", "codebook", 4, table=_nf4_table()),
    # learned codebooks: cb{b} = a b-bit index per weight; cb{b}x{d} = a b-bit index per vector of d weights
    **{f"cb{b}": Format(f"cb{b}", "lut", b) for b in range(2, 9)},
    **{f"cb{b}x{d}": Format(f"cb{b}x{d}", "lut", b, vec=d) for d in (2, 4) for b in range(2, 9)},
}


def get_format(name: str) -> Format:
    """Look a format up by name; the error lists every known name."""
    try:
        return FORMATS[name]
    except KeyError:
        raise ValueError(f"unknown format {name!r}; choose one of {sorted(FORMATS)}") from None


# -- packing ------------------------------------------------------------------------------------------------
# Codes of `bits` bits are packed densely along one axis, little-endian: 8 codes fill exactly `bits` bytes, the
# first code in the lowest bits. For 4 bits this is "two per byte, low nibble first"; for 2 bits four per byte;
# 3 bits packs 8 codes into 3 bytes. The axis is zero-padded to a multiple of 8 codes (except for 8 bits).


def packed_length(n: int, bits: int) -> int:
    """Bytes along the packed axis for `n` codes of `bits` bits (8-bit codes are stored one per byte, unpadded)."""
    if bits == 8:
        return n
    return -(-n // 8) * bits


def pack(codes: jnp.ndarray, bits: int, axis: int = -1) -> jnp.ndarray:
    """Pack integer codes (any int dtype; only the low `bits` bits are kept) into uint8 along `axis`.

    codes: [..., n, ...] → uint8 [..., packed_length(n, bits), ...]. Exact: `unpack(pack(c)) == c & (2^bits-1)`.
    """
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8 to pack, got {bits}")
    c = jnp.moveaxis(jnp.asarray(codes), axis, -1)
    if bits == 8:
        return jnp.moveaxis(c.astype(jnp.uint8), -1, axis)
    n = c.shape[-1]
    pad = -n % 8
    c = jnp.pad(c.astype(jnp.uint8), [(0, 0)] * (c.ndim - 1) + [(0, pad)])
    if bits == 4:  # the same bit stream, two codes a byte (low nibble first): fewer ops for the common width
        c = (c & jnp.uint8(0xF)).reshape(c.shape[:-1] + (-1, 2))
        return jnp.moveaxis(c[..., 0] | (c[..., 1] << jnp.uint8(4)), -1, axis)
    c = c.reshape(c.shape[:-1] + ((n + pad) // 8, 8))
    bit = (c[..., None] >> jnp.arange(bits, dtype=jnp.uint8)) & 1  # [..., n/8, 8, bits]
    bit = bit.reshape(c.shape[:-1] + (bits, 8))  # the 8*bits stream cut into bytes
    out = jnp.sum(bit << jnp.arange(8, dtype=jnp.uint8), axis=-1, dtype=jnp.uint8)
    out = out.reshape(out.shape[:-2] + (-1,))
    return jnp.moveaxis(out, -1, axis)


def unpack(packed: jnp.ndarray, bits: int, n: int, axis: int = -1, signed: bool = False) -> jnp.ndarray:
    """Inverse of `pack`: uint8 [..., packed_length(n, bits), ...] → codes [..., n, ...] (uint8, or int8 with sign
    extension when `signed`)."""
    p = jnp.moveaxis(jnp.asarray(packed), axis, -1)
    if p.shape[-1] != packed_length(n, bits):
        raise ValueError(f"packed axis has {p.shape[-1]} bytes; {n} codes of {bits} bits need {packed_length(n, bits)}")
    if bits == 8:
        out = p.astype(jnp.int8 if signed else jnp.uint8)
        return jnp.moveaxis(out, -1, axis)
    if bits == 4:
        c = jnp.stack([p & jnp.uint8(0xF), p >> jnp.uint8(4)], axis=-1).reshape(p.shape[:-1] + (-1,))[..., :n]
    else:
        p = p.reshape(p.shape[:-1] + (-1, bits))  # [..., n/8, bits bytes]
        bit = (p[..., None] >> jnp.arange(8, dtype=jnp.uint8)) & 1  # [..., n/8, bits, 8]
        bit = bit.reshape(p.shape[:-1] + (8, bits))
        c = jnp.sum(bit << jnp.arange(bits, dtype=jnp.uint8), axis=-1, dtype=jnp.uint8)
        c = c.reshape(c.shape[:-2] + (-1,))[..., :n]
    if signed:
        sign = jnp.uint8(1 << (bits - 1))
        c = ((c ^ sign).astype(jnp.int16) - sign.astype(jnp.int16)).astype(jnp.int8)
    return jnp.moveaxis(c, -1, axis)
