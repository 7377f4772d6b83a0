"""The E8P lattice codebook (format kind "lattice": `e8p`, `e8p2`): a fixed 2^16-entry codebook of 8-dimensional
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
vector = entry(stage 1) + RESIDUAL_SCALE · entry(stage 2).

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

__all__ = ["VEC", "ENTRIES", "RESIDUAL_SCALE", "patterns", "table", "encode", "decode", "quantize", "GAIN"]

VEC = 8
ENTRIES = 1 << 16
# e8p2's stage-2 weight: the stage-1 residual lies in E8's Voronoi cell, far smaller than the stage-1 entries; with
# GAIN[2] this pair minimises the two-stage error for Gaussian inputs (a grid search on 2^15 samples; the tests
# check it stays within 1% of the best). Part of the format: changing it changes every stored e8p2 weight.
RESIDUAL_SCALE = 0.26
# How far unit-RMS weights are stretched onto the codebook (scale = RMS / gain), per number of stages: the gain
# minimising E‖x − Q(κx)/κ‖² for x ~ N(0, I_8) (MSE per coordinate 0.0927 at 2 bits, 0.00846 at 4). Encoding
# only.
GAIN = {1: 1.03, 2: 0.875}
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


def decode(codes: jax.Array, stages: int = 1) -> jax.Array:
    """Codes [...] (uint16 for one stage, uint32 for two) → vectors [..., 8] (float32)."""
    t = jnp.asarray(table())
    c = codes.astype(jnp.uint32)
    v = t[(c & 0xFFFF).astype(jnp.int32)]
    if stages == 2:
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


def quantize(y: jax.Array, stages: int = 1) -> tuple[jax.Array, jax.Array]:
    """(codes [...], vectors [..., 8]) of `stages`-stage E8P for vectors y [..., 8]: stage 2 encodes the stage-1
    residual divided by RESIDUAL_SCALE. Codes are uint16 (one stage) or uint32 (two)."""
    c1 = encode(y)
    v = decode(c1.astype(jnp.uint16))
    if stages == 1:
        return c1.astype(jnp.uint16), v
    c2 = encode((y - v) / RESIDUAL_SCALE)
    codes = c1.astype(jnp.uint32) | (c2.astype(jnp.uint32) << 16)
    return codes, decode(codes, 2)
