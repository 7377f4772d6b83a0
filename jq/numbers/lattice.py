"""The E8P lattice codebook (format kind "lattice": `e8p`, `e8p3`, `e8p2`): a fixed 2^16-entry codebook of 8-dimensional
vectors from the E8 lattice, in the spirit of QuIP# (Tseng et al. 2024, "QuIP#: Even Better LLM Quantization with
Hadamard Incoherence and Lattice Codebooks").

E8 = D8 ∪ (D8 + ½), D8 the integer vectors of even sum; the half-integer coset D8 + ½ holds the vectors of
half-integers whose sum is even. E8P takes 256 *magnitude patterns* a ∈ (ℕ + ½)^8 — the 227 of norm² ≤ 10 and
the first 29 (in lexicographic order; QuIP#'s own choice of 29 differs) of norm² 12 — and every sign vector s with
s ⊙ a in D8 + ½ (half of the 256: the sign of the last coordinate follows from the others), shifted by ±¼:

    entry = s ⊙ a + t · 1,  t ∈ {+¼, −¼}        (all of them points of E8 + ¼: 2^16 entries, none repeated)

A code is 16 bits: bit 15 the shift (1: −¼), bits 7..14 the pattern, bits 0..6 the signs of coordinates 0..6
(1: negative). The table is never stored with a weight: `decode` is a lookup in this module's constant table.
`e8p2` stacks two stages (residual vector quantization, 4 bits per weight): code = stage-1 code | stage-2 code << 16,
vector = entry(stage 1) + RESIDUAL_SCALE · entry(stage 2). `e8p3` (3 bits per weight, QuIP#'s 3-bit construction:
E8P plus a 1-bit E8 stage on the residual) takes its second stage from the E8 shell (`shell`: the origin and E8's
240 roots), an 8-bit index: code = stage-1 code | shell index << 16, stored as its three little-endian bytes (uint8
[..., 3]: 24 bits per 8 weights, nothing padded), vector = entry(stage 1) + SHELL_SCALE · shell[index].

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

__all__ = ["VEC", "ENTRIES", "CODE_BITS", "RESIDUAL_SCALE", "SHELL_SCALE", "patterns", "table", "shell", "encode",
           "nearest_in_shell", "pack24", "unpack24", "decode", "quantize", "GAIN"]

VEC = 8
ENTRIES = 1 << 16
# e8p2's stage-2 weight: the stage-1 residual lies in E8's Voronoi cell, far smaller than the stage-1 entries; with
# GAIN[32] this pair minimises the two-stage error for Gaussian inputs (a grid search on 2^15 samples; the tests
# check it stays within 1% of the best). Part of the format: changing it changes every stored e8p2 weight.
RESIDUAL_SCALE = 0.26
CODE_BITS = (16, 24, 32)  # code bits per vector of 8 weights: e8p, e8p3, e8p2
# e8p3's stage-2 weight, found the same way (and as much part of the format).
SHELL_SCALE = 0.49
# How far unit-RMS weights are stretched onto the codebook (scale = RMS / gain), per code bits: the gain minimising
# E‖x − Q(κx)/κ‖² for x ~ N(0, I_8) (MSE per coordinate 0.0927 at 2 bits, 0.0300 at 3, 0.00846 at 4). Encoding only.
GAIN = {16: 1.03, 24: 0.975, 32: 0.875}
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


def pack24(codes: jax.Array) -> jax.Array:
    """e8p3 codes [...] (uint32 < 2^24) → their stored form, the three little-endian bytes uint8 [..., 3]."""
    c = codes.astype(jnp.uint32)
    return jnp.stack([(c >> s) & 0xFF for s in (0, 8, 16)], axis=-1).astype(jnp.uint8)


def unpack24(stored: jax.Array) -> jax.Array:
    """`pack24`'s inverse: uint8 [..., 3] → uint32 [...]."""
    b = stored.astype(jnp.uint32)
    return b[..., 0] | (b[..., 1] << 8) | (b[..., 2] << 16)


def decode(codes: jax.Array, bits: int = 16) -> jax.Array:
    """Stored codes → vectors [..., 8] (float32): uint16 [...] (`bits` 16, e8p), uint8 [..., 3] (24, e8p3) or
    uint32 [...] (32, e8p2)."""
    if bits not in CODE_BITS:
        raise ValueError(f"lattice codes of {bits} bits per vector; E8P formats have {CODE_BITS}")
    t = jnp.asarray(table())
    c = unpack24(codes) if bits == 24 else codes.astype(jnp.uint32)
    v = t[(c & 0xFFFF).astype(jnp.int32)]
    if bits == 24:
        v = v + SHELL_SCALE * jnp.asarray(shell())[(c >> 16).astype(jnp.int32)]
    elif bits == 32:
        v = v + RESIDUAL_SCALE * t[(c >> 16).astype(jnp.int32)]
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
    """(codes [...], vectors [..., 8]) of E8P with `bits` per vector for vectors y [..., 8]: a second stage encodes
    the stage-1 residual divided by its scale (RESIDUAL_SCALE in E8P at 32 bits, SHELL_SCALE in the shell at 24).
    Codes are uint16 (16 bits) or uint32 (24 and 32: not yet `pack24`ed for storage)."""
    if bits not in CODE_BITS:
        raise ValueError(f"lattice codes of {bits} bits per vector; E8P formats have {CODE_BITS}")
    c1 = encode(y)
    v = decode(c1.astype(jnp.uint16))
    if bits == 16:
        return c1.astype(jnp.uint16), v
    c2 = nearest_in_shell((y - v) / SHELL_SCALE) if bits == 24 else encode((y - v) / RESIDUAL_SCALE)
    codes = c1.astype(jnp.uint32) | (c2.astype(jnp.uint32) << 16)
    return codes, decode(pack24(codes) if bits == 24 else codes, bits)
