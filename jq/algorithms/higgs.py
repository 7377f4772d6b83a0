"""HIGGS-style data-free codebooks (Malinovskii et al. 2024, "Pushing the Limits of Large Language Model
Quantization via the Linearity Theorem").

After a Hadamard rotation of the input axis (`rotate: hadamard` on the rule, or a model rotation), the weights of a
group of rows in one column are close to i.i.d. Gaussian. Each group and column is scaled by its RMS, and every
vector of d consecutive rows is rounded to the nearest point of one fixed grid: the MSE-optimal 2^b-point grid for
the standard Gaussian in d dimensions (`gaussian_grid`: Lloyd's algorithm on a fixed sample — Lloyd-Max for d = 1,
the CLVQ grids of the paper for d = 2, 4). No calibration data; the grid is stored once per tensor as a shared
table ([1, 1, 2^b, d], `jq.numbers.codebook`), the scales per group and column.

Bits per weight = b / d + 16 / R (R = group_size, or K per channel) + 16 · 2^b · d / (K · N).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jq.algorithms.kmeans import assign, lloyd
from jq.algorithms.registry import register
from jq.algorithms.stats import LayerStats
from jq.numbers import codebook as cbk
from jq.numbers.qtensor import Layout, QTensor
from jq.numbers.scheme import Scheme

__all__ = ["gaussian_grid", "higgs"]

_SAMPLES_PER_ENTRY = 512
_SAMPLES = 1 << 16  # at least


@functools.lru_cache(maxsize=None)
def gaussian_grid(bits: int, d: int, iters: int = 60) -> np.ndarray:
    """The 2^bits-point grid [2^bits, d] (float32, rounded through float16) minimising E‖x − nearest(x)‖² for
    x ~ N(0, I_d): Lloyd's algorithm on max(2^16, 512 · 2^bits) deterministic samples (seed 0, each with its
    negative). Computed once per (bits, d)."""
    entries = 2**bits
    half = np.random.default_rng(0).standard_normal((max(_SAMPLES // 2, _SAMPLES_PER_ENTRY * entries // 2), d))
    x = np.concatenate([half, -half]).astype(np.float32)  # antithetic: the grid comes out symmetric
    with jax.ensure_compile_time_eval():  # concrete even when first asked for inside a jit trace
        return np.asarray(cbk.as_stored(lloyd(jnp.asarray(x), jnp.ones_like(jnp.asarray(x)), entries, iters)))


@register("higgs")
@cbk.on_leading_matrix
def higgs(w: jnp.ndarray, scheme: Scheme, layout: Layout, stats: LayerStats | dict | None = None) -> QTensor:
    """Round a kernel w [K, N] to the Gaussian grid of its format (`cb{b}` or `cb{b}x{d}`) after scaling each group
    of rows (`group_size`, or all K per channel) and column by its RMS; `stats` is ignored (data-free). Rotate the
    input axis first (`rotate: hadamard`) so that the groups are near Gaussian."""
    f = scheme.fmt
    cbk.check_shared_layout(f, layout, "higgs", fitted=False)
    K, N = layout.shape
    rows, d = cbk.rows_per_group(layout), f.vec
    grid = jnp.asarray(gaussian_grid(f.bits, d))  # [C, d]
    wg = jnp.asarray(w, jnp.float32).reshape(K // rows, rows, N)
    s = cbk.rms_scales(wg, axis=1)  # [G, N], as stored
    x = (wg / s[:, None]).reshape(K // d, d, N).transpose(0, 2, 1).reshape(-1, d)  # [K/d · N, d]
    idx = assign(x, jnp.ones_like(x), grid).reshape(K // d, N)
    return cbk.stored_codebook_qtensor(idx, grid[None, None], s, layout, scheme.format, w.dtype,
                                       policy=scheme.policy)
