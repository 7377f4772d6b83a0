"""What the Hugging Face pre-quantized formats share (docs/HF_QUANT.md): little-endian bit streams in int32 words,
the *unsigned view* of one linear layer that every format converts through, and act-order `g_idx` ↔ jq's `perm`.

The unsigned view of a linear layer with K inputs and N outputs (a Flax kernel (K, N)):

    u      uint8 [K, N]   codes 0 .. 2^b − 1, rows in the natural input order
    zero   uint8 [G, N]   zero points in code units (2^(b−1) everywhere for a symmetric layer)
    scale  float [G, N]   G = K / group_size, or 1 (one scale per output channel)
    perm   int32 [K] | None   jq's act-order permutation: row j of the stored codes is row perm[j] of W

and W[k, n] = (u[k, n] − zero[group(k), n]) · scale[group(k), n], where group(k) = position of k in perm // g.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from jq.numbers import formats
from jq.numbers.lowrank import is_lowrank
from jq.numbers.qtensor import Layout, QTensor

__all__ = ["Unsigned", "unpack_words", "pack_words", "perm_from_g_idx", "g_idx_from_perm", "to_qtensor",
           "unsigned_view", "need", "is_float"]


def need(ok: bool, where: str, what: str, fix: str) -> None:
    """ValueError '{where}: {what}; {fix}' unless `ok`: every check of a stored tensor names it, the value found and
    the fix."""
    if not ok:
        raise ValueError(f"{where}: {what}; {fix}")


def is_float(a: np.ndarray) -> bool:
    """Whether `a` holds floats (bfloat16, which NumPy files under kind "V", included)."""
    return a.dtype.kind == "f" or a.dtype.name == "bfloat16"


# -- bit streams ----------------------------------------------------------------------------------------------
def _as_bytes(words: np.ndarray) -> np.ndarray:
    """int32 words [..., m] → their little-endian bytes [..., 4m] (uint8 input is returned as is)."""
    w = np.ascontiguousarray(words)
    return w if w.dtype == np.uint8 else w.astype("<i4", copy=False).view(np.uint8)


def unpack_words(words: np.ndarray, bits: int, n: int, axis: int = 0) -> np.ndarray:
    """Codes of a little-endian bit stream along `axis`: int32 words [.., m, ..] → uint8 codes [.., n, ..].

    Code i occupies bits i·b .. i·b + b − 1 of the stream, word w holding stream bits 32w .. 32w + 31 (for b = 3 a
    code may straddle two words). Trailing padding codes are dropped; ValueError when the words hold fewer than n."""
    b = _as_bytes(np.moveaxis(np.asarray(words), axis, -1))
    if 8 % bits == 0:  # whole codes per byte: shifts, one byte of memory per code
        c = (b[..., None] >> (bits * np.arange(8 // bits, dtype=np.uint8))) & np.uint8((1 << bits) - 1)
        c = c.reshape(b.shape[:-1] + (-1,))
    else:
        s = np.unpackbits(b, axis=-1, bitorder="little")
        s = s[..., : s.shape[-1] // bits * bits].reshape(b.shape[:-1] + (-1, bits))
        c = np.packbits(s, axis=-1, bitorder="little")[..., 0]
    if c.shape[-1] < n:
        raise ValueError(f"{b.shape[-1] // 4} words of {bits}-bit codes hold {c.shape[-1]} codes, not {n}")
    return np.moveaxis(c[..., :n], -1, axis)


def pack_words(codes: np.ndarray, bits: int, axis: int = 0) -> np.ndarray:
    """Inverse of `unpack_words`: codes [.., n, ..] (low `bits` bits kept) → int32 words [.., ceil(n·b/32), ..],
    the stream zero-padded to whole words (for b = 3: to multiples of 32 codes, three words, as GPTQ packs)."""
    c = np.moveaxis(np.asarray(codes).astype(np.uint8), axis, -1)
    unit = 32 // bits if 32 % bits == 0 else 32
    c = np.pad(c, [(0, 0)] * (c.ndim - 1) + [(0, -c.shape[-1] % unit)])
    if 8 % bits == 0:
        per = 8 // bits
        by = c.reshape(c.shape[:-1] + (-1, per)) << (bits * np.arange(per, dtype=np.uint8))
        by = np.bitwise_or.reduce(by, axis=-1)
    else:
        s = np.unpackbits(c[..., None], axis=-1, bitorder="little")[..., :bits]
        by = np.packbits(s.reshape(c.shape[:-1] + (-1,)), axis=-1, bitorder="little")
    return np.ascontiguousarray(np.moveaxis(np.ascontiguousarray(by).view("<i4").astype(np.int32), -1, axis))


# -- act order ------------------------------------------------------------------------------------------------
def perm_from_g_idx(g_idx: np.ndarray, k: int, group_size: int | None, where: str) -> np.ndarray | None:
    """jq's `perm` for a `g_idx` [K] (the group of each input row): the stable argsort, when every group has
    exactly `group_size` rows (then the stored order's consecutive runs of g rows are the groups); None when that is
    the identity. ValueError naming `where` for a g_idx of another shape, values outside 0 .. G − 1, or groups of
    other sizes (a layout with no exact jq equivalent)."""
    g = np.asarray(g_idx)
    need(g.shape == (k,) and g.dtype.kind in "iu", where, f"g_idx has shape {g.shape} and dtype {g.dtype}",
         f"it must be an integer vector of the {k} input features (one group index per row)")
    n_groups, size = (1, k) if group_size is None else (k // group_size, group_size)
    bad = np.flatnonzero((g < 0) | (g >= n_groups))
    need(bad.size == 0, where, f"g_idx is not a permutation of groups: row {bad[:1].tolist()} has group "
         f"{g[bad[:1]].tolist()}, outside 0 .. {n_groups - 1}",
         f"every value must name one of the {n_groups} groups of {size} rows; the file is damaged or its "
         "group_size is wrong")
    counts = np.bincount(g, minlength=n_groups)
    odd = np.flatnonzero(counts != size)
    need(odd.size == 0, where, f"g_idx is not group-consistent: group {odd[0] if odd.size else 0} has "
         f"{counts[odd[0]] if odd.size else size} rows, expected {size}",
         "jq's act-order layout needs exactly group_size rows per group; re-quantize the model, or export it "
         "in a layout with whole groups")
    perm = np.argsort(g, kind="stable").astype(np.int32)
    return None if np.array_equal(perm, np.arange(k)) else perm


def g_idx_from_perm(perm: np.ndarray | None, k: int, group_size: int | None) -> np.ndarray:
    """The `g_idx` int32 [K] of a jq layout: row i's group is (its position in perm) // group_size."""
    if group_size is None:
        return np.zeros(k, np.int32)
    pos = np.arange(k) if perm is None else np.argsort(np.asarray(perm))
    return (pos // group_size).astype(np.int32)


# -- the unsigned view ----------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Unsigned:
    """One linear layer as unsigned codes (see the module docstring); `group_size` None means per channel."""

    u: np.ndarray
    zero: np.ndarray
    scale: np.ndarray
    perm: np.ndarray | None
    bits: int
    group_size: int | None
    symmetric: bool

    @property
    def g_idx(self) -> np.ndarray:
        """int32 [K]: the group of each input row."""
        return g_idx_from_perm(self.perm, self.u.shape[0], self.group_size)


def to_qtensor(v: Unsigned, where: str, dtype: str = "float32") -> QTensor:
    """The jq QTensor of `v`: (K, N) contracted over axis 0, codes permuted by `v.perm` and bit-packed along K;
    int8 two's complement codes without zero points when `v.symmetric` (its zeros must all be 2^(b−1)), else uint8
    codes with uint8 zeros. Scales keep their dtype. Exact: nothing is re-quantized."""
    k, n = v.u.shape
    half = 1 << (v.bits - 1)
    lay = Layout((k, n), (0,), "group", v.group_size) if v.group_size else Layout((k, n), (0,), "channel")
    codes = v.u if v.perm is None else v.u[v.perm]
    if v.symmetric:
        need(bool(np.all(v.zero == half)), where, "a symmetric layer has zero points other than "
             f"{half}", "read it as asymmetric")
        codes = (codes.astype(np.int16) - half).astype(np.int8)
    if v.bits < 8:
        codes = np.asarray(formats.pack(codes, v.bits, axis=0))
    q = QTensor(codes=codes, scale=np.asarray(v.scale), zero=None if v.symmetric else v.zero.astype(np.uint8),
                perm=None if v.perm is None else v.perm.astype(np.int32), fmt=f"int{v.bits}", layout=lay,
                symmetric=v.symmetric, dtype=dtype)
    q.check(where)
    return q


def unsigned_view(q: object, where: str, target: str, bits: tuple[int, ...]) -> Unsigned:
    """The unsigned view of a jq QTensor, or a ValueError naming `where`, why `target` (a format name) cannot hold
    it, and the fix: rotation / activation policies, LowRank corrections, non-int or other-width formats, float
    zero points, padded / flat groups and layouts that are not a (K, N) kernel contracted over axis 0. Per-tensor
    scales become per-channel (the same values)."""
    need(not is_lowrank(q), where, f"a LowRank leaf (quantized base + low-rank correction) cannot be stored in "
         f"{target}", "merge the correction (dequantize) or quantize without lowrank")
    need(isinstance(q, QTensor), where, f"{type(q).__name__} is not a QTensor", f"quantize it to store it in {target}")
    f, lay = q.format, q.layout
    need(q.sparse_index is None, where, f"a dense-and-sparse weight (float16 outliers beside the codes) cannot be "
         f"stored in {target}", "quantize without `outliers`, or dequantize the leaf")
    need(f.is_int and f.bits in bits, where, f"format {q.fmt} cannot be stored in {target}",
         f"{target} holds integer codes of {', '.join(map(str, bits))} bits; quantize with one of "
         f"{', '.join(f'int{b}' for b in bits)}")
    need(q.policy.rotation is None, where, f"the weight is stored rotated ({q.policy.rotation!r}), which {target} "
         "cannot describe", "quantize without the online rotation (a model-level QuaRot rotation is fine)")
    need(q.policy.act is None, where, f"activation quantization ({q.policy.act}) is an execution policy {target} "
         "cannot describe", "quantize weights only (drop `act` from the scheme)")
    need(len(lay.shape) == 2 and lay.axes == (0,), where, f"shape {lay.shape} contracted over axes {lay.axes} is "
         "not a linear (K, N) kernel contracted over axis 0", f"{target} stores linear layers only")
    need(not lay.flat, where, f"flat groups of {lay.group_size} (formed across output channels: {lay.group_size} does "
         f"not divide K = {lay.shape[0]})", f"{target} groups input rows within each output; use a group size that "
         f"divides {lay.shape[0]} (e.g. 32 or 64)")
    need(lay.padded in (None, lay.shape[0]), where, f"groups of {lay.group_size} are padded to {lay.padded} rows "
         f"(K = {lay.shape[0]})", f"{target} needs whole groups; use a group size that divides {lay.shape[0]}")
    need(not q.zero_min, where, "has offsets in weight units (zero_min: code·scale + min, GGUF Q4_1 style)",
         f"{target} stores zero points in code units, (code − zero)·scale; quantize with zero_point: int")
    need(q.outer_scale is None, where, "has a per-tensor outer scale over its scales",
         f"{target} has one level of scales; quantize without an outer scale")
    zero = None if q.zero is None else np.asarray(q.zero)
    need(zero is None or zero.dtype.kind in "iu", where, f"has float zero points ({getattr(zero, 'dtype', '')})",
         f"{target} stores integer zero points; quantize with zero_point: int")
    need(zero is None or int(zero.max(initial=0)) < 1 << f.bits, where, f"has a zero point {int(zero.max())} "
         f"outside the {f.bits}-bit code range" if zero is not None else "", "re-quantize the layer")
    k, n = lay.shape
    half = 1 << (f.bits - 1)
    stored = np.asarray(q.unpacked_codes())
    u = (stored.astype(np.int16) + half).astype(np.uint8) if q.symmetric else stored.astype(np.uint8)
    perm = None if q.perm is None else np.asarray(q.perm, np.int32)
    if perm is not None:
        u = u[np.argsort(perm)]
    g = lay.group_size if lay.granularity == "group" else None
    n_groups = 1 if g is None else k // g
    scale = np.broadcast_to(np.asarray(q.scale), (n_groups, n))
    zero = np.full((n_groups, n), half, np.uint8) if zero is None else np.broadcast_to(zero, (n_groups, n))
    return Unsigned(u, zero.astype(np.uint8), np.ascontiguousarray(scale), perm, f.bits, g, q.symmetric)
