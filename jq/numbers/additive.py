"""Additive codebooks (format kind "additive": `aq{B}x{M}`), as in AQLM (Egiazarian et al. 2024, "Extreme
Compression of Large Language Models via Additive Quantization").

A weight is cut into vectors of VEC = 8 consecutive weights along the pack axis (the input rows of a Dense kernel
[K, N], within one output column). Each vector is the SUM of M codewords, one from each of M learned tables of 2^B
entries of length 8, times the scale of its position:

    w[8j : 8j+8, n] = scale[g, n] · Σ_m codebook[t, m, codes[j, n, m], :]      (t: the table of the vector's scale)

Stored (QTensor fields):
  codes     uint8 `layout.stored_shape` with the pack axis divided by 8, plus a trailing axis of M (one byte per
            B-bit index, unpacked: B < 8 is stored, and counted, as 8 bits);
  codebook  float16 `table_shape + (M, 2^B, 8)`, the table shape the scale shape or dims dividing it (`[1, 1]`:
            one set of M tables for the whole kernel; `[G, 1]`: one per group of rows shared by every column);
  scale     float16 `layout.scale_shape` (per output channel, or per group of rows and channel).
Bits per weight = 8·M / 8 (codes) + 16·(tables + scales) / weights, all counted by `QTensor.bits_per_weight`.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp

from jq.numbers.layout import Layout

__all__ = ["VEC", "BITS", "BOOKS", "check_name", "codes_shape", "table_problem", "sum_codewords", "lookup"]

VEC = 8
BITS = (4, 5, 6, 7, 8)  # B: bits per index (tables of 2^B entries); uint8 codes hold up to 8
BOOKS = (1, 2, 3, 4)  # M: tables summed per vector


def check_name(name: str) -> None:
    """ValueError naming B or M and the allowed range when `name` looks like `aq{B}x{M}` but is out of range; no-op
    for other names (the caller raises its own "unknown format")."""
    m = re.fullmatch(r"aq(\d+)x(\d+)", str(name))
    if m is None:
        return
    b, books = int(m.group(1)), int(m.group(2))
    if b not in BITS:
        raise ValueError(f"format {name!r}: B = {b} bits per codebook index is out of range; use B in "
                         f"{BITS[0]}..{BITS[-1]} (aq{{B}}x{{M}}: tables of 2^B entries; e.g. aq8x2, 2 bits per weight)")
    if books not in BOOKS:
        raise ValueError(f"format {name!r}: M = {books} codebooks per vector is out of range; use M in "
                         f"{BOOKS[0]}..{BOOKS[-1]} (aq{{B}}x{{M}}: M·B / 8 bits per weight; e.g. aq8x3, 3 bits)")


def codes_shape(layout: Layout, books: int) -> tuple[int, ...]:
    """The stored codes' shape: `layout.stored_shape` with the pack axis divided by VEC, plus (books,)."""
    s = list(layout.stored_shape)
    s[layout.pack_axis] //= VEC
    return tuple(s) + (books,)


def table_problem(cb_shape: tuple[int, ...], layout: Layout, bits: int, books: int) -> str | None:
    """Why a codebook of `cb_shape` does not fit (table dims fitting `layout.tables_fit`, then (books, 2^bits,
    VEC)), or None when it does."""
    entry = (books, 2**bits, VEC)
    if tuple(cb_shape[-3:]) == entry and layout.tables_fit(tuple(cb_shape[:-3])):
        return None
    return (f"codebook shape {tuple(cb_shape)} != {tuple(layout.scale_shape) + entry} (scale shape, or dims dividing "
            f"it, + ({books} tables, {2**bits} entries for {bits}-bit indices, vector length {VEC}))")


def sum_codewords(codes: jax.Array, tables: jax.Array) -> jax.Array:
    """Codes [..., M] (integers) into one set of tables [M, E, VEC] → the summed vectors [..., VEC] (float32)."""
    t = jnp.asarray(tables, jnp.float32)
    c = jnp.asarray(codes).astype(jnp.int32)
    return sum(t[m][c[..., m]] for m in range(t.shape[0]))


def lookup(codes: jax.Array, codebook: jax.Array, layout: Layout, bits: int) -> jax.Array:
    """The unscaled weights in the stored shape (float32): each vector's M codewords, from the tables of its scale
    position, summed and laid along the pack axis. codes: `codes_shape`; codebook: `table_shape + (M, 2^B, VEC)`."""
    books, entries = codebook.shape[-3], 2**bits
    tab = layout.vector_tables(tuple(codebook.shape[:-3]), VEC)
    flat = codebook.astype(jnp.float32).reshape(-1, VEC)
    idx = codes.astype(jnp.int32)
    vals = sum(flat[(tab * books + m) * entries + idx[..., m]] for m in range(books))  # [..., VEC]
    return jnp.moveaxis(vals, -1, layout.pack_axis + 1).reshape(layout.stored_shape)
