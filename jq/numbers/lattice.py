"""The E8P lattice codebook (format kind "lattice": `e8p`, `e8p3`, `e8p2`, `e8p5`, `e8p6`): a fixed 2^16-entry codebook
of 8-dimensional vectors from the E8 lattice, in the spirit of QuIP# (Tseng et al. 2024, "QuIP#: Even Better LLM
Quantization with Hadamard Incoherence and Lattice Codebooks").

E8 = D8 ∪ (D8 + ½), D8 the integer vectors of even sum; the half-integer coset D8 + ½ holds the vectors of
half-integers whose sum is even. E8P takes 256 *magnitude patterns* a ∈ (ℕ + ½)^8 — the 227 of norm² ≤ 10 and
the first 29 (in lexicographic order; QuIP#'s own choice of 29 differs) of norm² 12 — and every sign vector s with
s ⊙ a in D8 + ½ (half of the 256: the sign of the last coordinate follows from the others), shifted by ±¼:

    entry = s ⊙ a + t · 1,  t ∈ {+¼, −¼}        (all of them points of E8 + ¼: 2^16 entries, none repeated)

A code is 16 bits: bit 15 the shift (1: −¼), bits 7..14 the pattern, bits 0..6 the signs of coordinates 0..6
(1: negative). The table is never stored with a weight: `decode` is a lookup in this module's constant table.
Wider formats add stages on the residual (residual vector quantization): vector = entry(stage 1) + Σ_k scale_k ·
table_k[code_k], each stage's code the nearest entry of its table to what the stages before left, divided by its scale
(`STAGES`: the tables and scales per code width). `e8p3` (3 bits per weight, QuIP#'s 3-bit construction: E8P plus a
1-bit E8 stage) takes its second stage from the E8 shell (`shell`: the origin and E8's 240 roots, an 8-bit index);
`e8p2` (4 bits) from E8P again; `e8p5` (5 bits) is `e8p2` plus a shell stage, `e8p6` (6 bits) three E8P stages.
Stored codes (`storage`): uint16 [...] (e8p), uint32 [...] (e8p2: stage-1 code | stage-2 code << 16) and otherwise the
stage codes' little-endian bytes one after another, uint8 [..., bytes] (an E8P code two bytes, a shell index one:
e8p3 [..., 3], e8p5 [..., 5], e8p6 [..., 6]; nothing padded).

`encode` finds the nearest entry exactly using the structure: for each shift and pattern the best signs are those
of the input, and when they break the parity the coordinate cheapest to flip is flipped (cost 4·|z_i|·a_i): 2 × 256
candidates of 8 coordinates per vector instead of 65536.
"""

from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["VEC", "ENTRIES", "CODE_BITS", "STAGES", "GAIN", "patterns", "table", "shell", "stage_tables", "storage",
           "split", "join", "encode", "nearest_in_shell", "decode", "quantize"]

VEC = 8
ENTRIES = 1 << 16
# The stages after the first, per code bits per vector of 8 weights: (table, scale on the stage-1 entries' units).
# The scales were fitted with GAIN (a grid search on Gaussian inputs, the tests check they stay within 1% of the
# best there) and are part of the formats: changing one changes every stored weight of that width.
STAGES = {
    16: (),  # e8p
    24: (("shell", 0.49),),  # e8p3
    32: (("e8p", 0.26),),  # e8p2: the stage-1 residual lies in E8's Voronoi cell, far smaller than the entries
    40: (("e8p", 0.26), ("shell", 0.13)),  # e8p5
    48: (("e8p", 0.26), ("e8p", 0.07)),  # e8p6
}
CODE_BITS = tuple(STAGES)
# How far unit-RMS weights are stretched onto the codebook (scale = RMS / gain), per code bits: the gain minimising
# E‖x − Q(κx)/κ‖² for x ~ N(0, I_8) (MSE per coordinate 0.0927 at 2 bits, 0.0300 at 3, 0.00846 at 4, 0.00272 at 5,
# 0.00080 at 6). Encoding only.
GAIN = {16: 1.03, 24: 0.975, 32: 0.875, 40: 0.83, 48: 0.8}
_STAGE_BYTES = {"e8p": 2, "shell": 1}
_CHUNK = 2048  # vectors per step of `encode` on large inputs ([chunk, 256, 8] float32 = 16 MB)


@functools.lru_cache(maxsize=None)
def patterns() -> np.ndarray:
    """The 256 magnitude patterns [256, 8] (float32, half-integers): norm² ≤ 10 (227), then norm² 12 (29), each
    group in lexicographic order."""
    half = [0.5, 1.5, 2.5, 3.5]
    pats = [p for p in itertools.product(half, repeat=VEC) if sum(x * x for x in p) <= 12]
    low = sorted(p for p in pats if sum(x * x for x in p) <= 10)
    twelve = sorted(p for p in pats if sum(x * x for x in p) == 12)
    assert len(low) == 227, len(low)
    return np.asarray(low + twelve[:29], np.float32)


def _last_sign_negative(a: np.ndarray, neg7: np.ndarray) -> np.ndarray:
    """Whether coordinate 7 is negative so that s ⊙ a has an even sum: Σ s⊙a ≡ Σa − n_neg (mod 2)."""
    total = a.sum(axis=-1).astype(np.int64)  # Σ a is an integer (8 half-integers)
    return (total - neg7.sum(axis=-1)) % 2 == 1


@functools.lru_cache(maxsize=None)
def table() -> np.ndarray:
    """All 2^16 entries [65536, 8] (float32), indexed by code."""
    code = np.arange(ENTRIES)
    a = patterns()[(code >> 7) & 255]
    neg7 = ((code[:, None] >> np.arange(7)) & 1).astype(np.int64)
    neg = np.concatenate([neg7, _last_sign_negative(a, neg7)[:, None]], axis=1)
    shift = np.where(code >> 15, -0.25, 0.25)[:, None]
    return (np.where(neg, -a, a) + shift).astype(np.float32)


@functools.lru_cache(maxsize=None)
def shell() -> np.ndarray:
    """e8p3's stage-2 table [256, 8] (float32): the origin, then E8's 240 roots (norm² 2) in lexicographic order — the
    112 integer ones (two coordinates ±1) and the 128 of ±½ with an even number of minus signs; the 15 codes left
    decode to the origin too (the encoder never writes them)."""
    ints = [v for v in itertools.product((-1, 0, 1), repeat=VEC) if sum(x * x for x in v) == 2]
    halves = [v for v in itertools.product((-0.5, 0.5), repeat=VEC) if sum(x < 0 for x in v) % 2 == 0]
    roots = sorted(ints) + sorted(halves)
    assert len(roots) == 240, len(roots)
    return np.asarray([(0.0,) * VEC] + roots + [(0.0,) * VEC] * 15, np.float32)


@functools.lru_cache(maxsize=None)
def stage_tables() -> dict[str, np.ndarray]:
    """The tables a stage may read, by the name `STAGES` gives it: "e8p" (`table`) and "shell" (`shell`)."""
    return {"e8p": table(), "shell": shell()}


def _check(bits: int) -> tuple[str, ...]:
    if bits not in STAGES:
        raise ValueError(f"lattice codes of {bits} bits per vector; E8P formats have {CODE_BITS}")
    return ("e8p",) + tuple(name for name, _ in STAGES[bits])


def storage(bits: int) -> tuple[jnp.dtype, tuple[int, ...]]:
    """(dtype, trailing shape) of the stored codes of `bits` per vector: (uint16, ()), (uint32, ()) or
    (uint8, (bits / 8,))."""
    _check(bits)
    return {16: (jnp.dtype(jnp.uint16), ()), 32: (jnp.dtype(jnp.uint32), ())}.get(bits, (jnp.dtype(jnp.uint8),
                                                                                            (bits // 8,)))


def split(stored: jax.Array, bits: int) -> list[jax.Array]:
    """Stored codes → the stage codes, int32 [...] each (an E8P code < 2^16, a shell index < 2^8)."""
    names = _check(bits)
    c = stored.astype(jnp.uint32)
    if bits in (16, 32):
        return [(c & 0xFFFF).astype(jnp.int32)] + ([(c >> 16).astype(jnp.int32)] if bits == 32 else [])
    out, at = [], 0
    for name in names:
        if _STAGE_BYTES[name] == 2:
            out.append((c[..., at] | (c[..., at + 1] << 8)).astype(jnp.int32))
        else:
            out.append(c[..., at].astype(jnp.int32))
        at += _STAGE_BYTES[name]
    return out


def join(stage_codes: list[jax.Array], bits: int) -> jax.Array:
    """`split`'s inverse: the stage codes [...] → the stored codes (`storage(bits)`)."""
    names = _check(bits)
    c = [x.astype(jnp.uint32) for x in stage_codes]
    if bits == 16:
        return c[0].astype(jnp.uint16)
    if bits == 32:
        return c[0] | (c[1] << 16)
    parts = []
    for name, x in zip(names, c):
        parts += [x & 0xFF, (x >> 8) & 0xFF] if _STAGE_BYTES[name] == 2 else [x & 0xFF]
    return jnp.stack(parts, axis=-1).astype(jnp.uint8)


def decode(codes: jax.Array, bits: int = 16) -> jax.Array:
    """Stored codes (`storage(bits)`) → vectors [..., 8] (float32): entry(stage 1) + Σ_k scale_k · table_k[code_k]."""
    c, tables = split(codes, bits), stage_tables()
    v = jnp.asarray(tables["e8p"])[c[0]]
    for (name, scale), ck in zip(STAGES[bits], c[1:]):
        v = v + scale * jnp.asarray(tables[name])[ck]
    return v


def _encode_block(y: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Nearest entries of vectors y [V, 8]: (codes int32 [V], squared distances [V])."""
    a = jnp.asarray(patterns())  # [256, 8]
    parity = (jnp.sum(a, axis=-1).astype(jnp.int32) % 2)[None]  # [1, 256]
    best = None
    for bit, t in ((0, 0.25), (1, -0.25)):
        z = y - t
        az, neg = jnp.abs(z), (z < 0)
        d = (jnp.sum(az * az, -1, keepdims=True) - 2 * jnp.matmul(az, a.T, precision=jax.lax.Precision.HIGHEST)
             + jnp.sum(a * a, -1)[None])  # [V, 256]: ‖|z| − a‖²
        odd = (jnp.sum(neg, -1, keepdims=True, dtype=jnp.int32) + parity) % 2 == 1  # signs break the parity
        cost = az[:, None, :] * a[None]  # [V, 256, 8]: flipping coordinate i adds 4 |z_i| a_i
        flip = jnp.argmin(cost, axis=-1)
        d = d + jnp.where(odd, 4 * jnp.min(cost, axis=-1), 0.0)
        p = jnp.argmin(d, axis=-1)  # [V]
        dist = jnp.take_along_axis(d, p[:, None], axis=-1)[:, 0]
        f = jnp.take_along_axis(flip, p[:, None], axis=-1)[:, 0]
        o = jnp.take_along_axis(odd, p[:, None], axis=-1)[:, 0]
        neg = neg ^ (o[:, None] & (jnp.arange(VEC)[None] == f[:, None]))
        code = (bit << 15) | (p.astype(jnp.int32) << 7) | jnp.sum(neg[:, :7].astype(jnp.int32) << jnp.arange(7), -1)
        best = (code, dist) if best is None else (jnp.where(dist < best[1], code, best[0]),
                                                   jnp.minimum(dist, best[1]))
    return best


def encode(y: jax.Array) -> jax.Array:
    """Codes int32 [...] of the entries nearest (Euclidean) to the vectors y [..., 8] (exact; ties to the first shift
    and pattern)."""
    lead = y.shape[:-1]
    flat = jnp.asarray(y, jnp.float32).reshape(-1, VEC)
    n = flat.shape[0]
    if n <= _CHUNK:
        return _encode_block(flat)[0].reshape(lead)
    pad = -n % _CHUNK
    chunks = jnp.pad(flat, ((0, pad), (0, 0))).reshape(-1, _CHUNK, VEC)
    return jax.lax.map(lambda c: _encode_block(c)[0], chunks).reshape(-1)[:n].reshape(lead)


def nearest_in_shell(y: jax.Array) -> jax.Array:
    """Indices int32 [...] of the `shell` entries nearest to the vectors y [..., 8] (a search over its 241 points)."""
    t = jnp.asarray(shell()[:241])
    flat = jnp.asarray(y, jnp.float32).reshape(-1, VEC)
    d = jnp.sum(t * t, -1)[None] - 2 * jnp.matmul(flat, t.T, precision=jax.lax.Precision.HIGHEST)
    return jnp.argmin(d, axis=-1).astype(jnp.int32).reshape(y.shape[:-1])


def quantize(y: jax.Array, bits: int = 16) -> tuple[jax.Array, jax.Array]:
    """(stored codes, vectors [..., 8]) of E8P with `bits` per vector for vectors y [..., 8]: each stage after the
    first encodes what the stages before left, divided by its scale (`STAGES`)."""
    _check(bits)
    nearest, tables = {"e8p": encode, "shell": nearest_in_shell}, stage_tables()
    c = [encode(y)]
    v = jnp.asarray(tables["e8p"])[c[0]]
    for name, scale in STAGES[bits]:  # the same sum, in the same order, as `decode`
        c.append(nearest[name]((y - v) / scale))
        v = v + scale * jnp.asarray(tables[name])[c[-1]]
    return join(c, bits), v
