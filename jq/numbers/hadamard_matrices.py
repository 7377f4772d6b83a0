"""Hadamard matrices and fast Hadamard transforms for any size n = 2^k · b that has a construction.

A Hadamard matrix H of order n has entries ±1 and H Hᵀ = n I, so H / √n is orthogonal. Rotating a weight or an
activation by it (QuaRot, Ashkboos et al. 2024; QuIP#, Tseng et al. 2024) spreads outlier channels evenly over
all channels before quantization, and the rotation costs O(n log n) instead of a dense n × n matmul.

Sizes. n is split as n = 2^k · b with H_n = H_{2^k} ⊗ H_b (row / column index = i_{2^k} · b + i_b):

* H_{2^k} is Sylvester's matrix, (H_{2^k})_{ij} = (−1)^{popcount(i & j)} (symmetric; H_2^{⊗k}).
* b is the smallest order m · 2^i (m the odd part of n, 2^i ≤ the power of two in n) that one of the
  constructions below gives; b = 1 for powers of two. Hidden sizes of real models need b ∈ {12, 20, 28, 36, 52,
  60, 108, 140, 156, 172} (e.g. 11008 = 64 · 172, 14336 = 512 · 28, 13824 = 128 · 108).

Constructions of the base order b (all generated here; no tables are stored):

* Paley I (b = q + 1, q ≡ 3 mod 4 a prime power): with the quadratic character χ of GF(q) and the Jacobsthal
  matrix Q_xy = χ(x − y) (skew, Q Qᵀ = qI − J, Q J = 0), S = [[0, 1ᵀ], [−1, Q]] is skew with S Sᵀ = qI, and
  H = I + S. Gives 4, 8, 12, 20, 24, 28 (GF(27)), 32, 44, 48, 60, 68, 72, 80, 84, 104, 108, 128, 132, 140, ...
* Paley II (b = 2(q + 1), q ≡ 1 mod 4 a prime power): Q is symmetric, C = [[0, 1ᵀ], [1, Q]] is a symmetric
  conference matrix (C Cᵀ = qI) and H = C ⊗ [[1, 1], [1, −1]] + I ⊗ [[1, −1], [−1, −1]]. Gives 12, 20, 28, 36,
  52 (GF(25)), 60, 76, 100 (GF(49)), 108, 124, ...
* Goethals–Seidel array (b = 4w): four circulant ±1 matrices X_1..X_4 of order w with Σ X_i X_iᵀ = 4w I and the
  back-diagonal R give
      [[ X1,     X2 R,    X3 R,    X4 R  ],
       [−X2 R,   X1,      X4ᵀR,  −X3ᵀR  ],
       [−X3 R,  −X4ᵀR,   X1,      X2ᵀR  ],
       [−X4 R,   X3ᵀR,  −X2ᵀR,   X1     ]].
  The X_i come from Williamson matrices: symmetric circulants A, B, C, D with A² + B² + C² + D² = 4w I, i.e.
  first rows whose periodic autocorrelations sum to 0 at every shift s ≠ 0. Rows that are constant on the orbits
  of a multiplier group M ∋ −1 of Z_w^* have M-invariant autocorrelations, so the search space shrinks to
  2^(#orbits) rows per matrix and one meet-in-the-middle pass over pairs of rows (exact integer autocorrelations,
  deterministic, milliseconds) finds a quadruple:
    - w = 43 with M = ⟨−1, 6⟩ (6³ ≡ 1 mod 43; Williamson's 1944 "automorphism of order 3"): 7 orbits, 128 rows
      → order 172.
    - w = 13 with M = ⟨−1⟩ (plain symmetric rows): 64 rows.
  For 156 = 12 · 13 (no Paley order; the multiplier search finds no Williamson quadruple of order 39) the X_i of
  order 39 are the Cooper–Wallis combination of the T-matrices of order 3 (T_j = the j-th shift, T_4 = 0;
  Σ T_j T_jᵀ = 3I, disjoint supports) with the Williamson matrices W of order 13,
      X_1 = T1⊗A + T2⊗B + T3⊗C + T4⊗D,     X_2 = −T1⊗B + T2⊗A − T3⊗D + T4⊗C,
      X_3 = −T1⊗C + T2⊗D + T3⊗A − T4⊗B,    X_4 = −T1⊗D − T2⊗C + T3⊗B + T4⊗A,
  (the rows of Williamson's array; the cross terms cancel because A..D are symmetric and commute, leaving
  Σ X_i X_iᵀ = (Σ T_j T_jᵀ) ⊗ (A² + B² + C² + D²) = 4 · 39 I), which are circulant of order 39 by the Chinese
  remainder theorem Z_39 ≅ Z_3 × Z_13.
  Order rule: Paley I, then Paley II, then Goethals–Seidel; every base matrix is checked (H Hᵀ = bI) when built.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import numpy as np
from numpy.typing import DTypeLike

__all__ = ["Decomposition", "decompose", "supported", "hadamard_matrix", "base_matrix", "sylvester", "SMALL_ORDERS"]

# Williamson quadruples searched for: order w -> multiplier g (the rows are constant on the orbits of ⟨−1, g⟩).
_WILLIAMSON: dict[int, int] = {13: 1, 43: 6}
# T-matrices (first rows of T_1..T_4) for the Cooper–Wallis product with Williamson matrices: order t -> rows.
_T_MATRICES: dict[int, tuple[tuple[int, ...], ...]] = {3: ((1, 0, 0), (0, 1, 0), (0, 0, 1), (0, 0, 0))}
# The non-power-of-two orders real models need (all constructed; see `decompose(n).construction`).
SMALL_ORDERS: tuple[int, ...] = (1, 2, 4, 12, 20, 28, 36, 40, 52, 60, 108, 140, 156, 172)


class Decomposition(NamedTuple):
    """How H_n is built: H_n = H_{pow2} (Sylvester) ⊗ H_{base} (`construction`)."""

    n: int
    pow2: int
    base: int
    construction: str


# -- number theory ---------------------------------------------------------------------------------------------


def _prime_power(q: int) -> tuple[int, int] | None:
    """(p, e) with q = p^e, p prime, e ≥ 1; None if q is not a prime power."""
    if q < 2:
        return None
    p = next((d for d in range(2, math.isqrt(q) + 1) if q % d == 0), q)
    e = 0
    while q % p == 0:
        q //= p
        e += 1
    return (p, e) if q == 1 else None


def _split2(n: int) -> tuple[int, int]:
    """(k, m) with n = 2^k · m, m odd."""
    k = (n & -n).bit_length() - 1
    return k, n >> k


def _base_construction(b: int) -> str | None:
    """Name of the construction that gives a Hadamard matrix of order b here, or None."""
    if b in (1, 2):
        return "sylvester"
    if b % 4:
        return None
    pp = _prime_power(b - 1)
    if pp is not None and (b - 1) % 4 == 3:
        return f"paley1(q={b - 1})"
    pp = _prime_power(b // 2 - 1)
    if pp is not None and (b // 2 - 1) % 4 == 1:
        return f"paley2(q={b // 2 - 1})"
    if b // 4 in _WILLIAMSON:
        return f"goethals-seidel(williamson w={b // 4})"
    for t in _T_MATRICES:
        if b % (4 * t) == 0 and b // (4 * t) in _WILLIAMSON:
            return f"goethals-seidel(T{t} x williamson w={b // (4 * t)})"
    return None


@functools.lru_cache(maxsize=None)
def decompose(n: int) -> Decomposition:
    """Split n = pow2 · base with the smallest constructible base order (see the module docstring).

    Raises ValueError (naming n, its factorization and the supported base orders) when no construction applies.
    """
    if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 1:
        raise ValueError(f"hadamard: the size must be a positive int, got {n!r}")
    n = int(n)
    k, m = _split2(n)
    for i in range(k + 1):
        c = _base_construction(m << i)
        if c is not None:
            return Decomposition(n, 1 << (k - i), m << i, c)
    smallest = next(((m << i, c) for i in range(2, 40) if (c := _base_construction(m << i))), None)
    if smallest is not None:
        need = (f"its odd part {m} needs a base matrix of order {smallest[0]} = 2^{_split2(smallest[0])[0]}·{m} "
                f"({smallest[1]}), so n must be a multiple of {smallest[0]}")
    else:
        need = f"no construction here covers its odd part {m}"
    why = "a Hadamard matrix exists only for n = 1, 2 or a multiple of 4; " if n > 2 and n % 4 else ""
    bases = sorted({next(m2 << i for i in range(40) if _base_construction(m2 << i)) for m2 in range(1, 52, 2)})
    raise ValueError(
        f"hadamard: no Hadamard construction for n={n} = 2^{k}·{m}: {why}{need}. Supported: n = 2^j·b with b one "
        f"of {SMALL_ORDERS} (and generally b = q+1, q ≡ 3 mod 4 a prime power (Paley I); b = 2(q+1), q ≡ 1 mod 4 a "
        f"prime power (Paley II); b = 4w or 12w, w in {sorted(_WILLIAMSON)} (Williamson, Goethals–Seidel)); the "
        f"base orders used for the odd parts 1..51 are {bases}")


def supported(n: int) -> bool:
    """Whether `hadamard_matrix(n)` / `hadamard_transform` along a size-n axis are available."""
    try:
        decompose(n)
    except ValueError:
        return False
    return True


# -- finite fields ---------------------------------------------------------------------------------------------


def _poly_mod(a: list[int], f: list[int], p: int) -> list[int]:
    """a mod f over GF(p); polynomials as coefficient lists, lowest degree first, f monic."""
    a = list(a)
    d = len(f) - 1
    for i in range(len(a) - 1, d - 1, -1):
        c = a[i] % p
        if c:
            for j in range(d + 1):
                a[i - d + j] = (a[i - d + j] - c * f[j]) % p
    return [c % p for c in a[:d]] + [0] * max(0, d - len(a))


def _irreducible(p: int, e: int) -> list[int]:
    """The first monic irreducible polynomial of degree e over GF(p) (lowest degree first)."""
    for code in range(p**e):
        f = [(code // p**j) % p for j in range(e)] + [1]
        if f[0] == 0:
            continue
        reducible = False
        for d in range(1, e // 2 + 1):
            for gc in range(p**d):
                g = [(gc // p**j) % p for j in range(d)] + [1]
                if not any(_poly_mod(f, g, p)):
                    reducible = True
                    break
            if reducible:
                break
        if not reducible:
            return f
    raise AssertionError(f"no irreducible polynomial of degree {e} over GF({p})")


@functools.lru_cache(maxsize=None)
def _jacobsthal(q: int) -> np.ndarray:
    """Q [q, q] int8 with Q_xy = χ(x − y), elements of GF(q) numbered by their base-p digits (polynomial basis)."""
    p, e = _prime_power(q)
    digits = (np.arange(q)[:, None] // p ** np.arange(e)[None, :]) % p  # [q, e]
    if e == 1:
        sq = (np.arange(1, q) ** 2) % q
    else:
        f = _irreducible(p, e)
        sq = []
        for x in digits[1:]:
            prod = [0] * (2 * e - 1)
            for i in range(e):
                for j in range(e):
                    prod[i + j] += int(x[i]) * int(x[j])
            sq.append(sum(c * p**j for j, c in enumerate(_poly_mod(prod, f, p))))
    chi = -np.ones(q, np.int8)
    chi[0] = 0
    chi[np.asarray(sq)] = 1
    diff = ((digits[:, None, :] - digits[None, :, :]) % p) @ (p ** np.arange(e))  # index of x − y
    return chi[diff]


def _paley1(q: int) -> np.ndarray:
    Q = _jacobsthal(q).astype(np.int32)
    S = np.zeros((q + 1, q + 1), np.int32)
    S[0, 1:], S[1:, 0], S[1:, 1:] = 1, -1, Q
    return S + np.eye(q + 1, dtype=np.int32)


def _paley2(q: int) -> np.ndarray:
    Q = _jacobsthal(q).astype(np.int32)
    C = np.zeros((q + 1, q + 1), np.int32)
    C[0, 1:], C[1:, 0], C[1:, 1:] = 1, 1, Q
    return np.kron(C, [[1, 1], [1, -1]]) + np.kron(np.eye(q + 1, dtype=np.int32), [[1, -1], [-1, -1]])


# -- Williamson / Goethals–Seidel --------------------------------------------------------------------------------


def _circulant(a: np.ndarray) -> np.ndarray:
    w = len(a)
    return a[(np.arange(w)[None, :] - np.arange(w)[:, None]) % w]


@functools.lru_cache(maxsize=None)
def _williamson(w: int, g: int) -> np.ndarray:
    """First rows [4, w] (int32 ±1) of Williamson matrices of order w, constant on the orbits of ⟨−1, g⟩ on Z_w."""
    orbits, seen = [], {0}
    for x in range(1, w):
        if x not in seen:
            orb, todo = {x}, [x]
            while todo:
                y = todo.pop()
                for z in ((-y) % w, (g * y) % w):
                    if z not in orb:
                        orb.add(z)
                        todo.append(z)
            seen |= orb
            orbits.append(sorted(orb))
    r = len(orbits)
    rows = np.ones((2**r, w), np.int32)  # a_0 = 1 (negating a matrix keeps the property)
    for j, orb in enumerate(orbits):
        rows[:, orb] = (1 - 2 * ((np.arange(2**r) >> j) & 1))[:, None]
    # periodic autocorrelations at one shift per orbit (they are ⟨−1, g⟩-invariant), exact integers
    paf = np.stack([np.sum(rows * np.roll(rows, -orb[0], axis=1), axis=1) for orb in orbits], axis=1)
    i, j = np.triu_indices(2**r)
    pair = paf[i] + paf[j]
    first: dict[bytes, int] = {}
    for idx, v in enumerate(pair):
        first.setdefault(v.tobytes(), idx)
    for idx, v in enumerate(pair):
        other = first.get((-v).tobytes())
        if other is not None:
            return np.stack([rows[i[idx]], rows[j[idx]], rows[i[other]], rows[j[other]]])
    raise AssertionError(f"no Williamson quadruple of order {w} with multiplier {g}")


# Williamson's array: X_k = Σ_j sign · T_j ⊗ W_which (row k of [[A, B, C, D], [−B, A, −D, C], ...])
_WILLIAMSON_ARRAY = (((1, 0), (1, 1), (1, 2), (1, 3)),
                     ((-1, 1), (1, 0), (-1, 3), (1, 2)),
                     ((-1, 2), (1, 3), (1, 0), (-1, 1)),
                     ((-1, 3), (-1, 2), (1, 1), (1, 0)))


def _cooper_wallis(t_rows: np.ndarray, w_rows: np.ndarray) -> np.ndarray:
    """First rows [4, t·w] of the circulants X_k = Σ_j ±T_j ⊗ W_(k,j) (via Z_tw ≅ Z_t × Z_w, gcd(t, w) = 1)."""
    t, w = t_rows.shape[1], w_rows.shape[1]
    assert math.gcd(t, w) == 1
    idx = np.arange(t * w)
    out = np.zeros((4, t * w), np.int32)
    for k, row in enumerate(_WILLIAMSON_ARRAY):
        for j, (sign, which) in enumerate(row):
            out[k] += sign * t_rows[j][idx % t] * w_rows[which][idx % w]
    return out


def _goethals_seidel(rows: np.ndarray) -> np.ndarray:
    """The Goethals–Seidel array of four circulants (first rows [4, w], Σ X Xᵀ = 4w I): order 4w."""
    A, B, C, D = (_circulant(r) for r in rows)
    R = np.eye(rows.shape[1], dtype=np.int32)[::-1]
    return np.block([[A, B @ R, C @ R, D @ R],
                     [-B @ R, A, D.T @ R, -C.T @ R],
                     [-C @ R, -D.T @ R, A, B.T @ R],
                     [-D @ R, C.T @ R, -B.T @ R, A]])


@functools.lru_cache(maxsize=None)
def base_matrix(b: int) -> np.ndarray:
    """The ±1 Hadamard matrix [b, b] of base order b (int8, read-only), built by `_base_construction(b)` and
    checked."""
    c = _base_construction(b)
    if c is None:
        raise ValueError(f"hadamard: no construction for base order {b}")
    if c == "sylvester":
        h = sylvester(b).astype(np.int32)
    elif c.startswith("paley1"):
        h = _paley1(b - 1)
    elif c.startswith("paley2"):
        h = _paley2(b // 2 - 1)
    elif b // 4 in _WILLIAMSON:
        h = _goethals_seidel(_williamson(b // 4, _WILLIAMSON[b // 4]))
    else:
        t = next(t for t in _T_MATRICES if b % (4 * t) == 0 and b // (4 * t) in _WILLIAMSON)
        w = b // (4 * t)
        h = _goethals_seidel(_cooper_wallis(np.asarray(_T_MATRICES[t], np.int32), _williamson(w, _WILLIAMSON[w])))
    hf = h.astype(np.float64)
    if h.shape != (b, b) or not np.all(np.abs(h) == 1) or not np.array_equal(hf @ hf.T, b * np.eye(b)):
        raise AssertionError(f"hadamard: construction {c} did not give a Hadamard matrix of order {b}")
    out = h.astype(np.int8)
    out.flags.writeable = False
    return out


@functools.lru_cache(maxsize=None)
def sylvester(n: int) -> np.ndarray:
    """Sylvester's H_n (n a power of two), int8: H_2n = [[H_n, H_n], [H_n, −H_n]], (H)_ij = (−1)^popcount(i & j)."""
    h = np.ones((1, 1), np.int8)
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    h.flags.writeable = False
    return h


def hadamard_matrix(n: int, dtype: DTypeLike = np.float32) -> np.ndarray:
    """The unnormalised Hadamard matrix H_n = H_{2^k} ⊗ H_b [n, n] (entries ±1, H Hᵀ = n I) in `dtype`.

    The same matrix `hadamard_transform` applies (x @ H_n / √n). Raises ValueError when n has no construction.
    """
    d = decompose(n)
    s, b = sylvester(d.pow2).astype(dtype), base_matrix(d.base).astype(dtype)
    return (s[:, None, :, None] * b[None, :, None, :]).reshape(n, n)  # np.kron, without its copies
