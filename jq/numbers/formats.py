"""Number formats: integer grids, fp8 / fp4 / NF4 value sets, rounding to them, and exact sub-byte packing.

A format knows how a real number `y` (already divided by its scale, plus the zero point for asymmetric integers)
becomes a *code*, and how a code becomes a value again. Scales, groups and layouts live in `qtensor` and `ranges`.

Codes are stored as:
- int formats: int8 (symmetric, two's complement) or uint8 (asymmetric, 0 .. 2^b-1), packed to `bits` per code;
- fp8: the float8 dtype itself (e4m3fn / e5m2), one byte per code, directly usable by fp8 matmuls;
- fp4 e2m1, fp6 e2m3 / e3m2 and NF4: the index into the format's value table (for the minifloats that index *is*
  the OCP bit pattern: sign, exponent, mantissa), packed two per byte (4 bits) or four per three bytes (6 bits);
  minifloats round to nearest, ties to even (as hardware and `ml_dtypes` casts do), saturating at ± max;
- microscaling presets (`mxfp4`, `mxfp6_e2m3`, `mxfp6_e3m2`, `mxfp8_e4m3`, `mxfp8_e5m2`, `mxint8`, `nvfp4`): the codes
  of their element format; the preset also fixes the block size and scale dtype (`jq.numbers.mx`);
- learned codebooks ("lut": `cb3`, `cb8x2`, …): a `bits`-bit index per vector of `vec` consecutive weights along
  the pack axis into a table the QTensor itself stores (one per channel / group: `jq.numbers.codebook`), packed;
- lattice codebooks ("lattice": `e8p`, `e8p3`, `e8p2`, `e8p5`, `e8p6`): a 16-bit (uint16), two-stage 24-bit (uint8
  [..., 3]) or 32-bit (uint32), or three-stage 40- or 48-bit (uint8 [..., 5 / 6]) code per vector of 8 consecutive
  weights into the fixed E8P table of `jq.numbers.lattice` (2-6 bits per weight, nothing stored beside the codes and
  scales);
- additive codebooks ("additive": `aq{B}x{M}`, AQLM): M indices of B bits per vector of 8 consecutive weights, each
  into its own learned table of 2^B vectors, the weight vector being the sum of the M entries (M·B / 8 bits per
  weight; codes uint8 [..., M], tables in the QTensor's `codebook`: `jq.numbers.additive`).
"""

from __future__ import annotations

import dataclasses
import functools
import statistics

import jax.numpy as jnp
import ml_dtypes
import numpy as np
from jax.typing import DTypeLike

from jq.numbers import additive, lattice

__all__ = [
    "Format",
    "LOOKUP_KINDS",
    "FORMATS",
    "get_format",
    "pack",
    "unpack",
    "packed_length",
]


LOOKUP_KINDS = ("lut", "lattice", "additive")  # vector codebooks: a weight is read from a table by its index


@dataclasses.dataclass(frozen=True)
class Format:
    """A number format. `kind` is "int", "float" (fp8, cast by dtype), "codebook" (a fixed 2^bits value table),
    "lut" (a learned table of 2^bits vectors of length `vec` that each QTensor stores: `jq.numbers.codebook`) or
    "lattice" (the fixed E8P vector codebook, `jq.numbers.lattice`) or "additive" (M learned tables whose entries
    are summed, AQLM: `jq.numbers.additive`).

    Attributes:
      name: registry name, e.g. "int4", "fp8_e4m3", "nf4", "cb3", "cb8x2".
      kind: "int" | "float" | "codebook" | "lut" | "lattice" | "additive".
      bits: storage bits per code (before packing); for "lut" and "lattice", per index (one per `vec` weights); for
        "additive", per index of one of its `books` tables (each stored in a byte).
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
    minifloat: tuple[int, int] | None = None  # (mantissa bits, min normal exponent): codebook of an OCP minifloat
    element: str | None = None  # microscaling preset: the element format's name (`jq.numbers.mx`)
    block: int | None = None  # microscaling preset: elements per shared scale along the contraction axis
    scale_dtype_name: str | None = None  # microscaling preset: "float8_e8m0fnu" (MX) or "float8_e4m3fn" (NVFP4)
    books: int = 1  # additive codebooks: tables summed per vector (one `bits`-bit index each)

    @property
    def is_int(self) -> bool:
        """Whether this is an integer format."""
        return self.kind == "int"

    @property
    def is_lookup(self) -> bool:
        """Whether codes are indices into a codebook of vectors (`LOOKUP_KINDS`: learned tables, the E8P lattice,
        summed tables), decoded by the QTensor's lookup, with no fixed per-code values to round to."""
        return self.kind in LOOKUP_KINDS

    @property
    def max(self) -> float:
        """The largest magnitude of a code's value (int: 2^(bits-1)-1; float: the dtype's max; codebook: max |v|)."""
        if self.kind == "int":
            return float(2 ** (self.bits - 1) - 1)
        if self.kind == "float":
            return float(ml_dtypes.finfo(self.dtype).max)
        if self.kind in ("lut", "additive"):
            return 1.0
        if self.kind == "lattice":
            tables = lattice.stage_tables()
            return float(np.abs(tables["e8p"]).max()
                         + sum(scale * np.abs(tables[name]).max() for name, scale in lattice.STAGES[self.bits]))
        return float(max(abs(v) for v in self.table))

    @property
    def dtype(self) -> type[np.generic] | None:
        """The fp8 storage dtype (an ml_dtypes scalar type), None for other formats."""
        return getattr(ml_dtypes, self.dtype_name) if self.dtype_name else None

    @property
    def is_mx(self) -> bool:
        """Whether this is a block-scaled microscaling preset (MX or NVFP4): element format + block + scale dtype."""
        return self.block is not None

    @property
    def packs(self) -> bool:
        """Whether codes are bit-packed (everything under 8 bits but additive indices, a byte each)."""
        return self.bits < 8 and self.kind != "additive"

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
        """Index bits per logical weight (`bits · books / vec`), before scales and tables (and byte padding)."""
        return self.bits * self.books / self.vec

    def _no_fixed_values(self, what: str) -> ValueError:
        if self.kind == "lattice":
            return ValueError(f"format {self.name!r} is a vector codebook (one code per {self.vec} weights), so it "
                              f"has no scalar values to {what}; quantize with method: quip")
        if self.kind == "additive":
            return ValueError(f"format {self.name!r} is an additive codebook (sums of {self.books} learned vectors of "
                              f"{self.vec}), so it has no scalar values to {what}; quantize with method: aqlm")
        return ValueError(f"format {self.name!r} is a learned codebook (one table per channel / group, fitted to the "
                          f"weights), so it has no fixed values to {what}; quantize with method: kmeans")

    def encode(self, y: jnp.ndarray, *, symmetric: bool = True, restricted: bool = False) -> jnp.ndarray:
        """Round scaled values `y` to codes (int8/uint8, fp8 dtype, or uint8 table indices). Shape preserved."""
        if self.is_lookup:
            raise self._no_fixed_values("round to")
        if self.kind == "int":
            lo, hi = self.int_range(symmetric, restricted)
            dt = jnp.int8 if symmetric else jnp.uint8
            return jnp.clip(jnp.round(y), lo, hi).astype(dt)
        if self.kind == "float":
            m = self.max
            return jnp.clip(y, -m, m).astype(self.dtype)
        if self.minifloat is not None:
            return _minifloat_codes(y, self.bits, *self.minifloat, self.max)
        values, order, mids = _codebook_search(self.table)
        idx = jnp.searchsorted(jnp.asarray(mids), y.astype(jnp.float32), side="left")
        return jnp.asarray(order)[idx]

    def decode(self, codes: jnp.ndarray, dtype: DTypeLike = jnp.float32) -> jnp.ndarray:
        """Code → value of the format (before scale / zero point), in `dtype`. Shape preserved."""
        if self.kind == "codebook":
            return jnp.asarray(np.asarray(self.table, np.float32))[codes.astype(jnp.int32)].astype(dtype)
        if self.is_lookup:
            raise self._no_fixed_values("decode to (QTensor.dequantize reads its table)")
        return codes.astype(dtype)

    def values(self, symmetric: bool = True, restricted: bool = False) -> np.ndarray:
        """All finite values the format can produce, sorted, float32 [n] (for tests and MSE searches)."""
        if self.kind == "int":
            lo, hi = self.int_range(symmetric, restricted)
            return np.arange(lo, hi + 1, dtype=np.float32)
        if self.kind == "float":
            allv = np.arange(256, dtype=np.uint8).view(self.dtype).astype(np.float32)
            return np.unique(allv[np.isfinite(allv)])
        if self.is_lookup:
            raise self._no_fixed_values("list")
        return np.unique(np.asarray(self.table, np.float32))


@functools.lru_cache(maxsize=None)
def _codebook_search(table: tuple[float, ...]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sorted distinct values, the code of each, and the midpoints between neighbours (for searchsorted)."""
    arr = np.asarray(table, np.float32)
    values, first = np.unique(arr, return_index=True)  # keeps the first code of a repeated value (+0 over -0)
    mids = (values[1:] + values[:-1]) / 2
    return values, first.astype(np.uint8), mids


def round_minifloat(y: jnp.ndarray, mbits: int, emin: int, vmax: float) -> jnp.ndarray:
    """Round float32 `y` (any shape) to the nearest value of a minifloat with `mbits` mantissa bits, smallest normal
    exponent `emin` (subnormals below it) and largest magnitude `vmax`: round half to even, saturating at ± vmax
    (OCP MX v1.0's conversion; NaN stays NaN). Exact: the quantum 2^(max(e, emin) − mbits) is a power of two."""
    y = jnp.clip(y.astype(jnp.float32), -vmax, vmax)
    _, e = jnp.frexp(y)  # |y| = m · 2^e, m in [0.5, 1): floor(log2 |y|) = e − 1
    q = jnp.ldexp(jnp.float32(1.0), jnp.maximum(e - 1, emin) - mbits)
    return jnp.round(y / q) * q


def _minifloat_codes(y: jnp.ndarray, bits: int, mbits: int, emin: int, vmax: float) -> jnp.ndarray:
    """Bit patterns (uint8, y's shape) of `y` rounded to a sign-magnitude minifloat of `bits` bits."""
    v = round_minifloat(y, mbits, emin, vmax)
    pos = jnp.asarray(_minifloat_magnitudes(bits, mbits, emin))  # value of magnitude code m, increasing in m
    mag = jnp.searchsorted(pos, jnp.abs(v)).astype(jnp.uint8)  # exact match: v is on the grid
    return mag | (jnp.signbit(v).astype(jnp.uint8) << (bits - 1))


@functools.lru_cache(maxsize=None)
def _minifloat_magnitudes(bits: int, mbits: int, emin: int) -> np.ndarray:
    """The 2^(bits−1) non-negative values of a minifloat without inf / NaN (OCP fp4 / fp6): code → value."""
    m = np.arange(2 ** (bits - 1))
    exp, man = m >> mbits, m & (2**mbits - 1)
    frac = np.where(exp > 0, 1.0 + man / 2**mbits, man / 2**mbits)
    return (frac * np.exp2(np.maximum(exp, 1) - 1 + emin)).astype(np.float32)


def _minifloat(name: str, bits: int, mbits: int, emin: int) -> Format:
    """An OCP minifloat without inf / NaN (fp4 e2m1, fp6 e2m3 / e3m2) as a codebook indexed by its bit pattern."""
    pos = _minifloat_magnitudes(bits, mbits, emin)
    table = tuple(float(v) for v in np.concatenate([pos, -pos]))
    return Format(name, "codebook", bits, table=table, minifloat=(mbits, emin))


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
    "fp4_e2m1": _minifloat("fp4_e2m1", 4, 1, 0),
    "fp6_e2m3": _minifloat("fp6_e2m3", 6, 3, 0),
    "fp6_e3m2": _minifloat("fp6_e3m2", 6, 2, -2),
    "nf4": Format("nf4", "codebook", 4, table=_nf4_table()),
    # learned codebooks: cb{b} = a b-bit index per weight; cb{b}x{d} = a b-bit index per vector of d weights
    **{f"cb{b}": Format(f"cb{b}", "lut", b) for b in range(2, 9)},
    **{f"cb{b}x{d}": Format(f"cb{b}x{d}", "lut", b, vec=d) for d in (2, 4) for b in range(2, 9)},
    # the E8P lattice codebook: a 16-bit code per 8 weights (2 bits per weight); a second stage from E8's shell of
    # roots (3 bits) or from E8P again (4 bits); a third stage from the shell (5 bits) or E8P (6 bits)
    "e8p": Format("e8p", "lattice", 16, vec=8),
    "e8p3": Format("e8p3", "lattice", 24, vec=8),
    "e8p2": Format("e8p2", "lattice", 32, vec=8),
    "e8p5": Format("e8p5", "lattice", 40, vec=8),
    "e8p6": Format("e8p6", "lattice", 48, vec=8),
    # additive codebooks (AQLM): aq{B}x{M} = M tables of 2^B entries of 8 weights summed, M·B / 8 bits per weight
    **{f"aq{b}x{m}": Format(f"aq{b}x{m}", "additive", b, vec=additive.VEC, books=m)
       for b in additive.BITS for m in additive.BOOKS},
}



def _preset(name: str, element: str, block: int = 32, scale: str = "float8_e8m0fnu") -> Format:
    """A microscaling preset: `element`'s codes, `block` elements per `scale`-dtype scale (`jq.numbers.mx`)."""
    return dataclasses.replace(FORMATS[element], name=name, element=element, block=block, scale_dtype_name=scale)


# OCP MX v1.0 (blocks of 32, e8m0 scales; MXINT8's implicit 2^-6 lives in its stored scale) and NVIDIA's NVFP4
# (blocks of 16, e4m3 scales, a float32 per-tensor scale)
FORMATS.update({n: _preset(n, e) for n, e in (("mxfp4", "fp4_e2m1"), ("mxfp6_e2m3", "fp6_e2m3"),
                                              ("mxfp6_e3m2", "fp6_e3m2"), ("mxfp8_e4m3", "fp8_e4m3"),
                                              ("mxfp8_e5m2", "fp8_e5m2"), ("mxint8", "int8"))})
FORMATS["nvfp4"] = _preset("nvfp4", "fp4_e2m1", 16, "float8_e4m3fn")


def get_format(name: str) -> Format:
    """Look a format up by name; the error lists every known name."""
    try:
        return FORMATS[name]
    except KeyError:
        additive.check_name(name)  # a specific error for aq{B}x{M} out of range
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
