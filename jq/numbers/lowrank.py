"""A weight plus a low-rank term: W = base + scale · Â B, the stored form of a LoRA adapter beside a (quantized)
base, of a LoRC / HQQ+ correction of quantization error, and of QA-LoRA's group-pooled adapter.

Shapes (a kernel [*K, *N] whose first `in_ndim` axes are contracted by the matmul): `a` [*K, r], `b` [r, *N].
With `pool` = G > 1 (QA-LoRA; one contraction axis), `a` is [⌈K / G⌉, r] and Â repeats each row of `a` over G
consecutive input rows (the last group may be short, as a padded quantization group is), so Â B is constant within
each group of G rows — the matmul sums the input over each group and multiplies the result by `a`: x Â = pool(x) a.

A `LowRank` is a leaf like a QTensor: `jq.ops.qdot_general` runs base and low-rank parts side by side (x·base +
scale·(x a) b, never forming Â B), the Flax interop routes layers whose kernel is one, and `dequantize` merges it
into a dense array. `key` (training only) is a PRNG key for dropout on the adapter's input (rate `dropout`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jq.numbers.qtensor import QTensor

__all__ = ["LowRank", "is_lowrank", "is_weight_leaf", "dense_base"]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LowRank:
    """base + scale · Â b (see the module docstring). Array fields are pytree children; the rest is static.

    Attributes:
      base: the weight [*K, *N]: a QTensor or a float array.
      a: [*K, r] (or [⌈K / pool⌉, r]); b: [r, *N].
      key: a PRNG key for dropout on the adapter input while training, or None (no dropout: evaluation).
      scale: the multiplier of the product (LoRA's alpha / r).
      in_ndim: how many leading axes of the weight the matmul contracts.
      pool: rows of the weight each row of `a` stands for (QA-LoRA's group size; 1 = plain LoRA).
      dropout: the dropout rate applied to the adapter's input when `key` is given.
    """

    base: Any
    a: jax.Array
    b: jax.Array
    key: jax.Array | None = None
    scale: float = dataclasses.field(default=1.0, metadata=dict(static=True))
    in_ndim: int = dataclasses.field(default=1, metadata=dict(static=True))
    pool: int = dataclasses.field(default=1, metadata=dict(static=True))
    dropout: float = dataclasses.field(default=0.0, metadata=dict(static=True))

    @property
    def shape(self) -> tuple[int, ...]:
        """The logical shape of the weight (the base's)."""
        return tuple(self.base.shape)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def dtype(self) -> Any:
        """The logical dtype (the base's)."""
        return self.base.dtype

    @property
    def rank(self) -> int:
        return int(self.a.shape[-1])

    def describe(self) -> str:
        """'int4 asym g128 + rank 16' (the base's grid and the adapter's rank; 'pooled g128' for QA-LoRA)."""
        base = self.base.describe() if isinstance(self.base, QTensor) else f"float ({jnp.dtype(self.base.dtype).name})"
        return f"{base} + rank {self.rank}" + (f" pooled g{self.pool}" if self.pool > 1 else "")

    def __repr__(self) -> str:
        return f"LowRank({self.describe()}, shape={self.shape}, scale={self.scale})"

    def __getitem__(self, key):
        """Only `x[...]` (how NNX reads a variable's value): the leaf itself."""
        if key is Ellipsis:
            return self
        raise TypeError(f"{self!r} cannot be indexed by {key!r}; call .dequantize() first")

    def expanded_a(self) -> jax.Array:
        """Â [*K, r]: `a` with each row repeated over its `pool` input rows."""
        return self.a if self.pool == 1 else jnp.repeat(self.a, self.pool, axis=0)[: self.shape[0]]

    def delta(self, dtype: Any = jnp.float32) -> jax.Array:
        """scale · Â b [*K, *N] in `dtype`."""
        prod = jnp.tensordot(self.expanded_a().astype(jnp.float32), self.b.astype(jnp.float32), axes=1)
        return (self.scale * prod).astype(dtype)

    def dequantize(self, dtype: Any = None) -> jax.Array:
        """The merged dense weight base + scale · Â b of the logical shape, in `dtype` (default: the base's)."""
        dtype = jnp.dtype(dtype or self.dtype)
        return (dense_base(self.base, jnp.float32) + self.delta(jnp.float32)).astype(dtype)

    def check(self, where: str = "LowRank") -> None:
        """Raise ValueError naming `where` if the factors do not fit the base (a damaged file or a wrong resume)."""
        k, n = self.shape[: self.in_ndim], self.shape[self.in_ndim :]
        want_a = ((-(-k[0] // self.pool),) + k[1:] if self.pool > 1 else k) + (self.rank,)
        problems = []
        if self.pool > 1 and self.in_ndim != 1:
            problems.append(f"pool {self.pool} needs one contraction axis, not {self.in_ndim}")
        if tuple(self.a.shape) != want_a:
            problems.append(f"a shape {tuple(self.a.shape)} != {want_a}")
        if tuple(self.b.shape) != (self.rank,) + n:
            problems.append(f"b shape {tuple(self.b.shape)} != {(self.rank,) + n}")
        if problems:
            raise ValueError(f"{where}: {self!r} is inconsistent: " + "; ".join(problems))
        if isinstance(self.base, QTensor):
            self.base.check(where)

    @property
    def nbytes(self) -> int:
        """Stored bytes: the base's (packed codes and scales for a QTensor) plus both factors."""
        base = self.base.nbytes if isinstance(self.base, QTensor) else int(np.prod(self.shape)) * jnp.dtype(
            self.base.dtype).itemsize
        return base + sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize for x in (self.a, self.b))

    @property
    def bits_per_weight(self) -> float:
        """Stored bits (base and factors) per logical weight: the honest cost of the adapter."""
        return 8.0 * self.nbytes / self.size


def is_lowrank(x: Any) -> bool:
    """Whether `x` is a LowRank leaf."""
    return isinstance(x, LowRank)


def is_weight_leaf(x: Any) -> bool:
    """Whether `x` is a stored weight jq keeps whole in a tree (a QTensor or a LowRank): the `is_leaf` of tree maps
    that must not descend into them."""
    return isinstance(x, (QTensor, LowRank))


def dense_base(base: Any, dtype: Any = None) -> jax.Array:
    """A base weight as a dense array: a QTensor dequantized, an array as it is (cast to `dtype` if given)."""
    if isinstance(base, QTensor):
        return base.dequantize(dtype)
    return jnp.asarray(base) if dtype is None else jnp.asarray(base, dtype)
