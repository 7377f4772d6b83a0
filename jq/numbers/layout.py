"""Layout: how a quantized array's stored codes and scales map onto its logical shape.

A weight of logical `shape` is contracted over `axes` in its matmul (a Flax `Dense` kernel `(in, out)` has axes
`(0,)`; a `DenseGeneral` kernel `(heads, head_dim, out)` has `(0, 1)`). Granularity:

- "tensor": one scale for everything; scale shape is all ones (same rank).
- "channel": one scale per output element; scale has 1 at every contraction axis, e.g. `(1, out)`.
- "group": groups of `group_size` consecutive elements along the *group axis* (the last contraction axis).
  The scale replaces that axis by the number of groups, e.g. `(in // g, out)`. With `pad=True` the axis is
  zero-padded up to a multiple of `group_size` and codes are stored padded.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

__all__ = ["Layout", "GRANULARITIES"]

GRANULARITIES = ("tensor", "channel", "group")


@dataclasses.dataclass(frozen=True)
class Layout:
    """Static description of how a QTensor's codes and scales map onto the logical array.

    `flat=True` (groups only) forms groups from the weight flattened with the group axis innermost — PyTorch's
    `W.reshape(-1, g)` on an `(out, in)` weight — so a group may run from the end of one output channel into the
    next when g does not divide the axis. Codes are then stored as `(n_groups, g)`, scales as `(n_groups,)`.
    For an axis that g divides, flat and per-axis groups hold the same numbers.
    """

    shape: tuple[int, ...]
    axes: tuple[int, ...]
    granularity: str = "channel"
    group_size: int | None = None
    padded: int | None = None  # stored length of the group axis (>= shape[group_axis])
    flat: bool = False

    @property
    def granularity_label(self) -> str:
        """'g128' (with ' flat' for flat groups), 'channel' or 'tensor'."""
        if self.granularity != "group":
            return self.granularity
        return f"g{self.group_size}" + (" flat" if self.flat else "")

    @property
    def group_axis(self) -> int:
        """The axis groups run along and codes are packed along: the last contraction axis."""
        return max(self.axes) if self.axes else len(self.shape) - 1

    @property
    def _moved_shape(self) -> tuple[int, ...]:
        a = self.group_axis
        return self.shape[:a] + self.shape[a + 1 :] + (self.shape[a],)

    @property
    def stored_shape(self) -> tuple[int, ...]:
        """Shape of the (unpacked) codes as stored."""
        if self.flat:
            return (math.prod(self.shape) // self.group_size, self.group_size)
        s = list(self.shape)
        if self.padded is not None:
            s[self.group_axis] = self.padded
        return tuple(s)

    @property
    def pack_axis(self) -> int:
        """The axis of the stored codes that sub-byte codes are packed along."""
        return 1 if self.flat else self.group_axis

    @property
    def inner_axis(self) -> int:
        """For groups: the axis of the grouped view that runs within a group."""
        return 1 if self.flat else self.group_axis + 1

    @property
    def grouped_shape(self) -> tuple[int, ...]:
        """The stored array viewed with the group axis split into (n_groups, group_size)."""
        s = self.stored_shape
        if self.granularity != "group" or self.flat:
            return s
        a = self.group_axis
        return s[:a] + (s[a] // self.group_size, self.group_size) + s[a + 1 :]

    @property
    def reduce_axes(self) -> tuple[int, ...]:
        """Axes of the grouped view that one scale covers."""
        if self.granularity == "tensor":
            return tuple(range(len(self.grouped_shape)))
        if self.granularity == "channel":
            return tuple(self.axes)
        return (self.inner_axis,)

    @property
    def scale_shape(self) -> tuple[int, ...]:
        """Stored shape of scales / zero points (the grouped view with reduced axes dropped for groups)."""
        g = list(self.grouped_shape)
        for a in self.reduce_axes:
            g[a] = 1
        if self.granularity == "group":
            del g[self.inner_axis]
        return tuple(g)

    # -- views ----------------------------------------------------------------------------------------------
    def to_grouped(self, x: jnp.ndarray) -> jnp.ndarray:
        """Logical-shape array → grouped view (padding the group axis with zeros if the layout is padded)."""
        if self.flat:
            return jnp.moveaxis(x, self.group_axis, -1).reshape(self.grouped_shape)
        if self.padded is not None and self.padded != self.shape[self.group_axis]:
            pad = [(0, 0)] * x.ndim
            pad[self.group_axis] = (0, self.padded - self.shape[self.group_axis])
            x = jnp.pad(x, pad)
        return x.reshape(self.grouped_shape)

    def from_grouped(self, xg: jnp.ndarray, perm: jnp.ndarray | None = None) -> jnp.ndarray:
        """Grouped view → logical shape: undo the permutation of the group axis (`stored = W[perm]`), drop padding."""
        if self.flat:
            x = xg.reshape(self._moved_shape)
            if perm is not None:
                x = jnp.take(x, jnp.argsort(perm), axis=-1)
            return jnp.moveaxis(x, -1, self.group_axis)
        x = xg.reshape(self.stored_shape)
        if perm is not None:
            x = jnp.take(x, jnp.argsort(perm), axis=self.group_axis)
        if self.stored_shape != self.shape:
            x = jax.lax.slice_in_dim(x, 0, self.shape[self.group_axis], axis=self.group_axis)
        return x

    def valid_mask(self) -> jnp.ndarray | None:
        """1.0 for real weights, 0.0 for the zero padding of a padded group axis, in the grouped view (float32
        `grouped_shape`); None when nothing is padded."""
        if self.padded is None or self.padded == self.shape[self.group_axis]:
            return None
        return self.to_grouped(jnp.ones(self.shape, jnp.float32))

    def expand_scale(self, s: jnp.ndarray) -> jnp.ndarray:
        """Stored scale (`scale_shape`, e.g. [G, N]) → broadcastable against the grouped view ([G, 1, N])."""
        return jnp.expand_dims(s, self.inner_axis) if self.granularity == "group" else s

    def tables_fit(self, table_shape: tuple[int, ...]) -> bool:
        """Whether codebook tables of `table_shape` fit the scale positions: as many dims as `scale_shape`, each equal
        to or dividing it (one table per scale position, or one shared by each block of them)."""
        return len(table_shape) == len(self.scale_shape) and all(
            t >= 1 and s % t == 0 for s, t in zip(self.scale_shape, table_shape))

    def vector_tables(self, table_shape: tuple[int, ...], vec: int) -> jnp.ndarray:
        """Which table (row-major over `table_shape`, see `tables_fit`) each vector of `vec` stored weights reads:
        int32, the stored shape with the pack axis divided by `vec`."""
        tab = jnp.arange(math.prod(table_shape), dtype=jnp.int32).reshape(table_shape)
        for a, (s, t) in enumerate(zip(self.scale_shape, table_shape)):
            if s != t:
                tab = jnp.repeat(tab, s // t, axis=a)
        tab = jnp.broadcast_to(self.expand_scale(tab), self.grouped_shape).reshape(self.stored_shape)
        return jax.lax.slice_in_dim(tab, 0, None, stride=vec, axis=self.pack_axis)
