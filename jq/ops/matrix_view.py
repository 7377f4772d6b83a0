"""N-D quantized weights as the 2-D matrices the kernels take, and einsum strings as dot_general dimension numbers —
so a DenseGeneral kernel [heads, head_dim, out...] or a model's `jnp.einsum("btd,dnh->btnh", x, w)` reaches the same
kernels as a Dense kernel [K, N], without moving any stored byte.

A QTensor whose contraction axes lead ([K1, .., Kc, N1, ..]) holds its codes, scales, zero points and tables in the
row-major order of the flattened matrix [K1·..·Kc, N1·..]: groups run along Kc inside each (K1, .., Kc−1) row block,
so they are consecutive rows of the flattened K, and packing along Kc packs consecutive rows. The view is a reshape
of every stored array (valid without padding of the group axis, flat groups, a permutation across several
contraction axes, or an online rotation over several axes). A weight whose contraction axes do not lead (an einsum
`w` [heads, d_model, head_dim] contracting d_model, a [N, K] matrix contracting K) is first transposed as stored —
packed codes, scales, zero points; a pass over 4 or 8 bits per weight instead of a dequantization to 16 or 32.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from jq.numbers.qtensor import Layout, QTensor

__all__ = ["matrix_view", "leading", "einsum_dimension_numbers"]


def _flat2(a: jax.Array | None, nc: int) -> jax.Array | None:
    """A scale-shaped array (first `nc` dims on the contraction side) as [prod of those, prod of the rest]."""
    if a is None or a.ndim == 0:
        return a
    return a.reshape(math.prod(a.shape[:nc]), math.prod(a.shape[nc:]))


def _tables2(t: jax.Array, scale_shape: tuple[int, ...], nc: int, nd: int) -> jax.Array | None:
    """Codebook tables (`table_shape + tail`) viewed for the 2-D layout, or None when a side mixes full and shared
    dims (no reshape holds it)."""
    tshape, tail = t.shape[:nd], t.shape[nd:]
    for part, full in ((tshape[:nc], scale_shape[:nc]), (tshape[nc:], scale_shape[nc:])):
        if tuple(part) != tuple(full) and any(d != 1 for d in part):
            return None
    return t.reshape((math.prod(tshape[:nc]), math.prod(tshape[nc:])) + tail)


def leading(rhs: QTensor, rc: tuple[int, ...]) -> QTensor | None:
    """rhs with its contraction axes `rc` (sorted, = its layout's axes) moved to the front, the others after them in
    order: every stored array transposed (packed codes stay packed along the group axis), nothing dequantized — an
    einsum weight [heads, d_model, head_dim] contracting d_model becomes [d_model, heads, head_dim]. None for
    stored forms a transpose does not carry (codebook tables, a dense-and-sparse term, an outer scale, flat
    groups), and rhs itself when its axes lead already."""
    lay, nd = rhs.layout, rhs.ndim
    if tuple(rc) != tuple(sorted(rc)) or tuple(lay.axes) != tuple(rc):
        return None
    perm = tuple(rc) + tuple(a for a in range(nd) if a not in rc)
    if perm == tuple(range(nd)):
        return rhs
    if (rhs.codebook is not None or rhs.sparse_index is not None or rhs.outer_scale is not None or lay.flat
            or (len(rc) > 1 and rhs.perm is not None)):
        return None
    t = lambda a: None if a is None or a.ndim == 0 else jnp.transpose(a, perm)  # noqa: E731
    new = Layout(tuple(lay.shape[a] for a in perm), tuple(range(len(rc))), lay.granularity, lay.group_size,
                 padded=lay.padded)
    q = dataclasses.replace(rhs, codes=jnp.transpose(rhs.codes, perm + tuple(range(nd, rhs.codes.ndim))),
                            scale=t(rhs.scale), zero=t(rhs.zero), layout=new)
    try:
        q.check("transposed view")
    except ValueError:
        return None
    return q


def matrix_view(lhs: jax.Array, rhs: QTensor, dimension_numbers) -> tuple[jax.Array, QTensor, tuple[int, ...]] | None:
    """(lhs [..., K], rhs as a QTensor [K, N] contracting axis 0, the result's shape) for `dot_general(lhs, rhs,
    dimension_numbers)` with an N-D rhs (no batch dims) — its contraction axes moved to the front first when they
    do not lead (`leading`); None where the view does not apply (a 2-D rhs already contracting axis 0, other
    contractions, padded / flat groups, a permutation or an online rotation over several axes, tables shared across
    part of a side)."""
    (lc, rc), (lb, rb) = dimension_numbers
    if lb or rb or not rc or len(rc) >= rhs.ndim:
        return None
    if tuple(rc) != tuple(range(len(rc))):  # contraction axes elsewhere: transpose the stored arrays
        order = sorted(range(len(rc)), key=lambda k: rc[k])
        moved = leading(rhs, tuple(rc[k] for k in order))
        if moved is None or moved is rhs:  # rhs: leading axes contracted out of order (not viewed, as before)
            return None
        lc, rc, rhs = tuple(lc[k] for k in order), tuple(range(len(rc))), moved
        if rhs.ndim == 2:  # [N, K] contracting K: the transposed [K, N] is what the kernels take
            x = jnp.moveaxis(lhs, tuple(lc), tuple(range(lhs.ndim - 1, lhs.ndim)))
            return x, rhs, x.shape[:-1] + (rhs.shape[1],)
    lay, nc, nd = rhs.layout, len(rc), rhs.ndim
    if tuple(rc) != tuple(range(nc)) or tuple(lay.axes) != tuple(rc):
        return None
    if nd == 2 or lay.flat or (lay.padded is not None and lay.padded != lay.shape[lay.group_axis]):
        return None
    if nc > 1 and (rhs.perm is not None or rhs.policy.rotation is not None):
        return None
    ss = lay.scale_shape
    tables = None if rhs.codebook is None else _tables2(rhs.codebook, ss, nc, nd)
    if rhs.codebook is not None and tables is None:
        return None
    k, n = math.prod(lay.shape[:nc]), math.prod(lay.shape[nc:])
    codes = rhs.codes
    codes = codes.reshape((math.prod(codes.shape[:nc]), math.prod(codes.shape[nc:nd])) + codes.shape[nd:])
    outer = rhs.outer_scale
    outer = outer if outer is None or outer.ndim == 0 else _flat2(outer, nc)
    q = dataclasses.replace(rhs, codes=codes, scale=_flat2(rhs.scale, nc), zero=_flat2(rhs.zero, nc),
                            codebook=tables, outer_scale=outer,
                            layout=Layout((k, n), (0,), lay.granularity, lay.group_size))
    try:  # packing that pads each row block (a packed length not dividing K) has no 2-D view
        q.check("matrix view")
    except ValueError:
        return None
    x = jnp.moveaxis(lhs, tuple(lc), tuple(range(lhs.ndim - nc, lhs.ndim)))
    free = x.shape[: lhs.ndim - nc]
    return x.reshape(free + (k,)), q, free + tuple(lay.shape[nc:])


def einsum_dimension_numbers(subscripts: str, lhs_ndim: int, rhs_ndim: int):
    """(dimension_numbers, permutation of the dot_general result into the output's order) of a two-operand einsum
    without ellipsis, repeated letters or summed-away free letters ("btd,dnh->btnh": contract d); None otherwise."""
    s = subscripts.replace(" ", "")
    if "." in s or "->" not in s or s.count(",") != 1:
        return None
    ins, out = s.split("->")
    a, b = ins.split(",")
    if len(a) != lhs_ndim or len(b) != rhs_ndim or any(len(set(t)) != len(t) for t in (a, b, out)):
        return None
    if any(c not in b and c not in out for c in a) or any(c not in a and c not in out for c in b):
        return None  # a letter summed over one operand alone: not a dot_general
    contract = sorted((c for c in b if c in a and c not in out), key=b.index)
    batch = [c for c in a if c in b and c in out]
    dn = ((tuple(a.index(c) for c in contract), tuple(b.index(c) for c in contract)),
          (tuple(a.index(c) for c in batch), tuple(b.index(c) for c in batch)))
    result = batch + [c for c in a if c not in b] + [c for c in b if c not in a]
    if sorted(result) != sorted(out):
        return None
    return dn, tuple(result.index(c) for c in out)
