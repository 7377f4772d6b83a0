"""Learned codebooks (format kind "lut": `cb2`…`cb8`, `cb{b}x{d}`): how a weight is cut into *tables* and
*vectors*, and how a fitted codebook becomes a QTensor.

A layout's scale positions are the tables: per output channel ("channel"), per group of `group_size` rows and
output channel ("group"), or one ("tensor"). Each table serves the weights one scale serves, cut into vectors of
`vec` consecutive weights along the pack axis (the input axis of a Dense kernel: GPTVQ's "d consecutive columns"
of the PyTorch (out, in) weight). A table holds 2^bits vectors; each vector of weights stores a `bits`-bit index.

Stored (QTensor fields): `codes` = indices packed along the pack axis (stored length K / vec), `scale` = float16
[scale_shape] (the largest |entry| of the table), `codebook` = float16 [scale_shape + (2^bits, vec)], entries
normalised to [-1, 1]; a weight = codebook[table][index] · scale. Bits per weight = bits / vec + 16 · (2^bits · vec
+ 1) / (weights per table), all counted by `QTensor.bits_per_weight`.

Units view (what fitting works on): `to_units` turns the grouped view into [U, n, vec] (U tables in the row-major
order of `scale_shape`, n vectors each); `from_units` takes [U, n] indices back to the stored index layout.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable

import jax.numpy as jnp
import numpy as np
from jax.typing import DTypeLike

from jq.numbers import formats
from jq.numbers.qtensor import ExecPolicy, Layout, QTensor

__all__ = ["vector_axis", "vectors_per_table", "check_codebook_layout", "to_units", "from_units", "normalise",
           "make_codebook_qtensor", "stored_codebook_qtensor", "rows_per_group", "check_shared_layout", "as_stored",
           "rms_scales", "leading_matrix", "from_matrix", "on_leading_matrix", "contraction_order", "transposed"]


def vector_axis(layout: Layout) -> int:
    """The axis of the grouped view that vectors run along: within a group, else the pack axis."""
    return layout.inner_axis if layout.granularity == "group" else layout.pack_axis


def vectors_per_table(layout: Layout, vec: int) -> int:
    """How many vectors of `vec` weights one table serves (padding included)."""
    g = layout.grouped_shape
    return math.prod(g[a] for a in layout.reduce_axes) // vec


def check_codebook_layout(fmt: formats.Format, layout: Layout, path: str | None = None, per_table: bool = True,
                          kinds: tuple[str, ...] = ("lut",)) -> None:
    """ValueError naming `path` unless `fmt` (a format of `kinds`: "lut", or also "lattice") fits `layout`: vectors
    tile the vector axis (and each group) and (`per_table`: a learned table per scale position) a table has at least
    as many vectors as entries."""
    at = f"{path}: " if path else ""
    if fmt.kind not in kinds:
        raise ValueError(f"{at}format {fmt.name!r} is not a learned codebook; use cb2..cb8 or cb{{b}}x{{d}} "
                         "(e.g. cb3, cb8x2)")
    va = vector_axis(layout)
    n = layout.grouped_shape[va]
    if n % fmt.vec:
        what = f"groups of {n}" if layout.granularity == "group" else f"axis {layout.pack_axis} of length {n}"
        fix = (f"a group_size that is a multiple of {fmt.vec}, or another format for this leaf"
               if fmt.kind in ("lattice", "additive") else f"a vector length that divides it (cb{fmt.bits} is scalar)")
        raise ValueError(f"{at}vectors of {fmt.vec} weights (format {fmt.name}) do not divide {what} (shape "
                         f"{layout.shape}); choose {fix}")
    per = vectors_per_table(layout, fmt.vec)
    if per_table and fmt.kind == "lut" and 2**fmt.bits > per:
        raise ValueError(f"{at}a codebook of {2**fmt.bits} entries ({fmt.bits}-bit indices, format {fmt.name}) for "
                         f"only {per} vectors per {layout.granularity_label} table (shape {layout.shape}); use fewer "
                         "bits" + (", a larger group_size, or granularity: channel"
                                   if layout.granularity == "group" else ""))


def rows_per_group(layout: Layout) -> int:
    """Rows of a 2-D kernel [K, N] that one shared table (and one scale per column) serves: the group size, or all
    K rows for `granularity: channel`."""
    return layout.group_size if layout.granularity == "group" else layout.shape[0]


def as_stored(x: jnp.ndarray) -> jnp.ndarray:
    """x (float32) rounded through float16, the dtype tables and scales are stored in."""
    return jnp.asarray(x, jnp.float32).astype(jnp.float16).astype(jnp.float32)


def rms_scales(x: jnp.ndarray, axis: int) -> jnp.ndarray:
    """Root mean square of x over `axis` (float32, rounded as stored), 1 where it is 0: the per-group-and-column
    scales of the shared-table methods (`gptvq`, `higgs`)."""
    s = jnp.sqrt(jnp.mean(jnp.asarray(x, jnp.float32) ** 2, axis=axis))
    return as_stored(jnp.where(s > 0, s, 1.0))


def check_shared_layout(fmt: formats.Format, layout: Layout, method: str, fitted: bool = True,
                        kind: str = "lut") -> None:
    """ValueError saying what does not fit a method with one table per group of rows shared by all output channels
    (`quantize_leaf` prefixes the leaf's path): a format of `kind` ("lut": learned, "lattice": E8P, "additive":
    AQLM's summed tables) on a 2-D kernel
    [K, N] contracting axis 0, groups (or channels) without padding that the vectors tile (`check_codebook_layout`)
    and (`fitted`: tables fitted to the weights) at least as many vectors per group as table entries."""
    if fmt.kind != kind:
        what, takes = {"lut": ("learned", "cb{b}x{d} (e.g. cb6x2: 3 bits per weight) or cb{b}"),
                       "lattice": ("lattice", "e8p (2 bits per weight), e8p3 (3), e8p2 (4), e8p5 (5) or e8p6 (6)"),
                       "additive": ("additive", "aq{B}x{M} (e.g. aq8x2: 2 bits per weight, aq8x3: 3)")}[kind]
        raise ValueError(f"format {fmt.name!r} is not a {what} codebook; {method} takes {takes}")
    if len(layout.shape) != 2 or layout.axes != (0,) or layout.flat or layout.valid_mask() is not None \
            or layout.granularity == "tensor":
        raise ValueError(f"{method} needs a kernel [K, N] contracting axis 0 (or an N-D kernel contracting axes in "
                         "increasing order) with granularity group (a group_size dividing K) or channel, without flat "
                         f"or padded groups; got shape {layout.shape}, axes {layout.axes}, "
                         f"{layout.granularity_label}{' padded' if layout.padded else ''}: choose such a group_size, "
                         "or method: kmeans for this leaf")
    check_codebook_layout(fmt, layout, per_table=False, kinds=(kind,))  # vectors tile the groups
    rows, n = rows_per_group(layout), layout.shape[1]
    if fitted and 2**fmt.bits > rows * n // fmt.vec:
        raise ValueError(f"{method}: a codebook of {2**fmt.bits} entries for only {rows * n // fmt.vec} vectors per "
                         f"group (format {fmt.name}, shape {layout.shape}, {rows} rows); use fewer bits or a larger "
                         "group_size" + (" (or granularity: channel)" if rows < layout.shape[0] else ""))


def to_units(xg: jnp.ndarray, layout: Layout, vec: int) -> jnp.ndarray:
    """Grouped view (`layout.grouped_shape`) → [U, n, vec]: U tables (row-major over `scale_shape`), n vectors each."""
    va = vector_axis(layout)
    red = set(layout.reduce_axes)
    keep = [a for a in range(xg.ndim) if a not in red]
    order = keep + [a for a in sorted(red) if a != va] + [va]
    u = math.prod(xg.shape[a] for a in keep)
    return jnp.transpose(xg, order).reshape(u, -1, vec)


def from_units(idx: jnp.ndarray, layout: Layout, vec: int) -> jnp.ndarray:
    """[U, n] indices (the order of `to_units`) → the stored index array: `layout.stored_shape` with the pack axis
    divided by `vec`."""
    g = list(layout.grouped_shape)
    va = vector_axis(layout)
    red = set(layout.reduce_axes)
    keep = [a for a in range(len(g)) if a not in red]
    order = keep + [a for a in sorted(red) if a != va] + [va]
    g[va] //= vec
    x = idx.reshape([g[a] for a in order])
    x = jnp.transpose(x, [order.index(a) for a in range(len(g))])
    stored = list(layout.stored_shape)
    stored[layout.pack_axis] //= vec
    return x.reshape(stored)


def normalise(centroids: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Centroids [U, C, vec] (float32) → (tables float16 [U, C, vec] in [-1, 1], scale float16 [U]) with
    tables · scale ≈ centroids; an all-zero table gets scale 1."""
    amax = jnp.max(jnp.abs(centroids), axis=(1, 2))
    scale = amax.astype(jnp.float16)
    scale = jnp.where(scale > 0, scale, jnp.ones_like(scale))
    return (centroids / scale.astype(jnp.float32)[:, None, None]).astype(jnp.float16), scale


def make_codebook_qtensor(idx: jnp.ndarray, tables: jnp.ndarray, scale: jnp.ndarray, layout: Layout, fmt: str,
                          dtype: DTypeLike, perm: jnp.ndarray | None = None,
                          policy: ExecPolicy = ExecPolicy()) -> QTensor:
    """Assemble a codebook QTensor from indices [U, n] (order of `to_units`), float16 tables [U, 2^bits, vec] and
    scales [U] (`normalise`); `dtype` is what it dequantizes to."""
    f = formats.get_format(fmt)
    if f.kind != "lut":
        raise ValueError(f"format {fmt!r} is not a learned codebook; use cb2..cb8 or cb{{b}}x{{d}}")
    if tables.shape[-2:] != (2**f.bits, f.vec):
        raise ValueError(f"tables of shape {tuple(tables.shape)} do not fit format {fmt} ({f.bits}-bit indices "
                         f"address {2**f.bits} entries of {f.vec} weights); fit {2**f.bits} centroids")
    return stored_codebook_qtensor(from_units(idx, layout, f.vec),
                                   tables.reshape(layout.scale_shape + tables.shape[-2:]),
                                   scale.reshape(layout.scale_shape), layout, fmt, dtype, perm, policy)


def stored_codebook_qtensor(idx: jnp.ndarray, codebook: jnp.ndarray, scale: jnp.ndarray, layout: Layout, fmt: str,
                            dtype: DTypeLike, perm: jnp.ndarray | None = None,
                            policy: ExecPolicy = ExecPolicy()) -> QTensor:
    """Assemble a codebook QTensor from indices in the stored layout (`layout.stored_shape` with the pack axis
    divided by vec), tables `table_shape + (2^bits, vec)` (table dims equal to or dividing `layout.scale_shape`;
    stored float16, or int8 as given) and scales `layout.scale_shape`; checked like a loaded leaf."""
    f = formats.get_format(fmt)
    codes = idx.astype(jnp.uint8)
    if f.packs:
        codes = formats.pack(codes, f.bits, axis=layout.pack_axis)
    tables = codebook if codebook.dtype == jnp.int8 else codebook.astype(jnp.float16)  # int8: step in the scales
    q = QTensor(codes=codes, scale=scale.astype(jnp.float16), perm=perm, codebook=tables,
                fmt=fmt, layout=layout, symmetric=True, dtype=jnp.dtype(dtype).name, policy=policy)
    q.check("codebook QTensor")
    return q


def leading_matrix(layout: Layout) -> Layout | None:
    """The 2-D layout [K, N] of an N-D kernel whose contraction axes lead (K = their product, N = the rest; a
    DenseGeneral kernel [heads, head_dim, out] contracting (0, 1)), or None when `layout` is 2-D or has other axes.
    Groups along the last contraction axis are consecutive rows of the flattened K, so both layouts hold the same
    groups and vectors."""
    nd, nc = len(layout.shape), len(layout.axes)
    if nd <= 2 or layout.flat or layout.padded is not None or tuple(layout.axes) != tuple(range(nc)) or nc == nd:
        return None
    return Layout((math.prod(layout.shape[:nc]), math.prod(layout.shape[nc:])), (0,), layout.granularity,
                  layout.group_size)


def from_matrix(q: QTensor, layout: Layout) -> QTensor:
    """The QTensor of the N-D `layout` (contraction axes leading) holding the same weights as q, a QTensor of its
    `leading_matrix` layout: codes, scales and tables reshaped (codes repacked along the last contraction axis)."""
    f, nc = q.format, len(layout.axes)
    codes = q.codes
    if f.packs:
        codes = formats.unpack(codes, f.bits, q.layout.stored_shape[0] // f.vec, axis=0)
    stored = list(layout.stored_shape)
    stored[layout.pack_axis] //= f.vec
    codes = codes.reshape(tuple(stored) + codes.shape[2:])  # additive codes keep their trailing M axis
    if f.packs:
        codes = formats.pack(codes, f.bits, axis=layout.pack_axis)
    ss, tables = layout.scale_shape, q.codebook
    if tables is not None:
        gt, nt = tables.shape[:2]
        tshape = (ss[:nc] if gt > 1 else (1,) * nc) + (ss[nc:] if nt > 1 else (1,) * (len(ss) - nc))
        tables = tables.reshape(tshape + tables.shape[2:])
    out = dataclasses.replace(q, codes=codes, scale=q.scale.reshape(ss), codebook=tables, layout=layout)
    out.check("codebook QTensor")
    return out


def contraction_order(layout: Layout) -> tuple[int, ...] | None:
    """The axis order that puts a kernel's contraction axes first (in order, then the others: an einsum kernel
    [heads, d_model, head_dim] contracting axis 1 → (1, 0, 2)), or None when they already lead or the layout does not
    transpose (flat or padded groups, axes out of order)."""
    axes, nc = tuple(layout.axes), len(layout.axes)
    if axes == tuple(range(nc)) or layout.flat or layout.padded is not None or list(axes) != sorted(axes):
        return None
    return axes + tuple(a for a in range(len(layout.shape)) if a not in axes)


def transposed(q: QTensor, order: tuple[int, ...], layout: Layout) -> QTensor:
    """The QTensor of `layout` holding the same weights as q, a QTensor of `layout` with its axes in `order`
    (`contraction_order`): codes (repacked along the group axis), scales, tables and a sparse term moved back."""
    f, nd = q.format, len(order)
    inv = tuple(int(i) for i in np.argsort(order))
    codes = q.codes
    if f.packs:
        codes = formats.unpack(codes, f.bits, q.layout.stored_shape[q.layout.pack_axis] // f.vec,
                               axis=q.layout.pack_axis)
    codes = jnp.transpose(codes, inv + tuple(range(nd, codes.ndim)))  # additive codes keep their trailing M axis
    if f.packs:
        codes = formats.pack(codes, f.bits, axis=layout.pack_axis)
    tables = None if q.codebook is None else jnp.transpose(q.codebook, inv + tuple(range(nd, q.codebook.ndim)))
    extra = {}
    if q.sparse_index is not None:  # flat positions in the transposed shape → in the layout's
        at = jnp.unravel_index(q.sparse_index, q.layout.shape)
        idx = jnp.ravel_multi_index(tuple(at[j] for j in inv), layout.shape, mode="clip").astype(jnp.int32)
        order_idx = jnp.argsort(idx)
        extra = dict(sparse_index=idx[order_idx], sparse_value=q.sparse_value[order_idx])
    out = dataclasses.replace(q, codes=codes, scale=jnp.transpose(q.scale, inv), codebook=tables, layout=layout,
                              **extra)
    out.check("codebook QTensor")
    return out


def on_leading_matrix(method: Callable[..., QTensor]) -> Callable[..., QTensor]:
    """`method(w, scheme, layout, stats, **options)` for 2-D kernels [K, N], extended to N-D kernels: contraction axes
    that do not lead are moved first (an einsum kernel [heads, d_model, head_dim] contracting d_model; statistics,
    over the contraction axes alone, stay as they are), then the kernel runs reshaped to [K, N] (statistics over the
    flattened K) and the result is reshaped and transposed back."""

    @functools.wraps(method)
    def run(w, scheme, layout, stats=None, **options):
        order = contraction_order(layout)
        if order is not None:
            lt = Layout(tuple(layout.shape[a] for a in order), tuple(range(len(layout.axes))), layout.granularity,
                        layout.group_size)
            return transposed(run(jnp.transpose(w, order), scheme, lt, stats, **options), order, layout)
        mat = leading_matrix(layout)
        if mat is None:
            return method(w, scheme, layout, stats, **options)
        if options.get("act_order"):
            raise ValueError(f"act_order on an N-D kernel (shape {layout.shape}) would permute rows across its "
                             "contraction axes; set act_order: false for this leaf")
        return from_matrix(method(jnp.reshape(w, mat.shape), scheme, mat, stats, **options), layout)

    return run
