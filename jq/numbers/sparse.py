"""Dense-and-sparse weights (Kim et al. 2023, "SqueezeLLM"; Dettmers et al. 2023, "SpQR"): a few weights whose
quantization error matters most are kept in float16 beside the dense codes, so the codes (and a codebook fitted to
them) need not stretch to cover outliers.

A QTensor's sparse term is `sparse_index` int32 [nnz] (flat row-major positions in the logical shape, sorted) and
`sparse_value` float16 [nnz], *added* to the decoded dense weight: value = target − dense at that position, so the
sum is the target to float16 precision. Stored cost: 48 bits per kept weight (int32 position + float16 value),
counted by `QTensor.bits_per_weight` — 0.5% kept adds 0.24 bits per weight. nnz is static (a fraction of the
weights, rounded), so shapes stay jit-friendly.
"""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp
from jax import lax

from jq.numbers.qtensor import QTensor

__all__ = ["outlier_count", "top_positions", "position_mask", "with_sparse", "check_fraction"]


def check_fraction(fraction: float, where: str) -> None:
    """ValueError naming `where` unless 0 ≤ fraction < 0.5 (the share of weights kept sparse)."""
    if not isinstance(fraction, (int, float)) or isinstance(fraction, bool) or not 0 <= fraction < 0.5:
        raise ValueError(f"{where}: option 'outliers' has value {fraction!r}; use the share of weights kept sparse "
                         "in float16, in [0, 0.5) (SqueezeLLM keeps 0.0045; 0 turns it off)")


def outlier_count(size: int, fraction: float) -> int:
    """How many of `size` weights a share `fraction` keeps (rounded; at least 1 when fraction > 0)."""
    return 0 if fraction <= 0 else max(1, min(size, int(round(fraction * size))))


def top_positions(score: jnp.ndarray, nnz: int) -> jnp.ndarray:
    """Flat row-major positions (int32 [nnz], ascending) of the `nnz` largest entries of `score` (any shape; ties to
    the earlier position, so the choice is deterministic)."""
    _, pos = lax.top_k(jnp.ravel(jnp.asarray(score, jnp.float32)), nnz)
    return jnp.sort(pos).astype(jnp.int32)


def position_mask(positions: jnp.ndarray, shape: tuple[int, ...]) -> jnp.ndarray:
    """Boolean array of `shape`, True at the flat `positions`."""
    return jnp.zeros(math.prod(shape), bool).at[positions].set(True).reshape(shape)


def with_sparse(q: QTensor, target: jnp.ndarray, positions: jnp.ndarray) -> QTensor:
    """q with the sparse term that restores `target` (logical shape, in the codes' domain: before any online
    rotation's inverse) at the flat `positions`: value = target − q's dense decode there, stored float16."""
    dense = q.unrotated().dense_part().dequantize(jnp.float32).reshape(-1)
    value = jnp.asarray(target, jnp.float32).reshape(-1)[positions] - dense[positions]
    out = dataclasses.replace(q, sparse_index=jnp.asarray(positions, jnp.int32),
                              sparse_value=value.astype(jnp.float16))
    out.check("dense-and-sparse QTensor")
    return out
