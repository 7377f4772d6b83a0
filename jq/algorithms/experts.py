"""Stacked expert weights (mixture-of-experts layers): any method applied to each expert on its own statistics.

A mixture-of-experts layer stores its experts stacked, `w [E, K, N]` (contraction axis 1, groups along it, so a
group never spans two experts), and its calibration statistics stacked the same way (`LayerStats` with `hessian
[E, K, K]`, `act_* [E, K]`, `count [E]`: what `jq.calibration.experts` captures from the tokens routed to each
expert). `quantize_stacked` runs a method record (GPTQ, RTN, AWQ clip, …) on every expert by `jax.vmap` over the
expert axis — one compilation, no Python loop over experts — and returns one QTensor of logical shape [E, K, N]
whose codes / scales / zero points carry the expert axis first.

Expert parallel: when `w` is sharded over a mesh axis on its expert axis (a `NamedSharding` whose spec starts with
that axis), the vmapped method runs under `jax.shard_map`, each device quantizing its own experts with no
communication, and the QTensor's arrays come back sharded the same way.

An expert no calibration token was routed to (`count == 0`) is quantized with RTN instead (codebook formats, which
have no RTN grid: the method with H = I), with a warning naming the layer and the expert index, as a layer no token
reached is (`jq.tree.quantize.quantize_leaf`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from jq.algorithms.rtn import RTN
from jq.algorithms.stats import LayerStats
from jq.numbers.qtensor import Layout, QTensor
from jq.numbers.scheme import Scheme

__all__ = ["is_stacked", "expert_layout", "stack_qtensors", "quantize_stacked"]


def is_stacked(stats: LayerStats | None) -> bool:
    """Whether `stats` are per-expert statistics stacked on a leading axis (`count [E]` or `hessian [E, K, K]`)."""
    if stats is None:
        return False
    if stats.count is not None:
        return jnp.ndim(stats.count) == 1
    return stats.hessian is not None and jnp.ndim(stats.hessian) == 3


def expert_layout(layout: Layout, scheme: Scheme, path: str) -> Layout:
    """The layout of one expert's weight [K, N] cut from the stacked layout [E, K, N] (axes shifted down by one).
    Raises ValueError naming `path` for layouts that cannot be split per expert (the expert axis contracted, flat
    groups, one tensor-wide scale)."""
    if len(layout.shape) < 3 or 0 in layout.axes:
        raise ValueError(f"{path}: a stacked expert weight [E, K, N] is contracted over axis 1 (per expert), but "
                         f"its layout has shape {layout.shape} and axes {layout.axes}; set axes: [1] in the rule (or "
                         "leave axes unset for a leaf under an 'experts' scope)")
    if layout.flat or layout.granularity == "tensor":
        raise ValueError(f"{path}: {'flat groups' if layout.flat else 'one tensor-wide scale'} cannot be split per "
                         "expert; use granularity: channel or a group_size without flat_groups for expert weights")
    return scheme.layout(tuple(layout.shape[1:]), tuple(a - 1 for a in layout.axes), path)


def stack_qtensors(per_expert: QTensor, layout: Layout, path: str = "<experts>") -> QTensor:
    """The QTensor of the stacked weight (logical `layout.shape` [E, K, N]) from a QTensor whose arrays carry the
    expert axis first (a vmapped method's result, or `jax.tree.map(jnp.stack, *qs)`), checked against `layout`."""
    if per_expert.perm is not None:
        raise ValueError(f"{path}: act_order with groups stores a permutation per expert, which a stacked expert "
                         "QTensor cannot hold (one permutation of the group axis); set static_groups: true (codes "
                         "stay in order) or act_order: false")
    q = dataclasses.replace(per_expert, layout=layout)
    if q.sparse_index is not None:  # per-expert flat positions [E, nnz] → positions in the stacked weight [E·nnz]
        per = math.prod(layout.shape[1:])
        idx = q.sparse_index + (jnp.arange(q.sparse_index.shape[0], dtype=jnp.int32) * per)[:, None]
        q = dataclasses.replace(q, sparse_index=idx.reshape(-1), sparse_value=q.sparse_value.reshape(-1))
    q.check(path)
    return q


@functools.lru_cache(maxsize=None)
def _vmapped(record: Any, scheme: Scheme, inner: Layout, info: bool, mesh: Any = None, axis: str | None = None):
    """jit(vmap(record.quantize[_with_info])) over the expert axis, under `shard_map` when a mesh axis is given."""
    run = record.quantize_with_info if info else record.quantize
    fn = jax.vmap(lambda w, st: run(w, scheme, inner, st))
    if mesh is not None:
        spec = PartitionSpec(axis)
        fn = jax.shard_map(fn, mesh=mesh, in_specs=(spec, spec), out_specs=spec, check_vma=False)
    return jax.jit(fn)


def _expert_axis(w: Any) -> tuple[Any, str | None]:
    """(mesh, axis name) when `w` is sharded over one mesh axis on its leading (expert) axis, else (None, None)."""
    sh = getattr(w, "sharding", None)
    if not isinstance(sh, NamedSharding) or not len(sh.spec) or sh.spec[0] is None:
        return None, None
    axis = sh.spec[0]
    if isinstance(axis, tuple):
        if len(axis) != 1:
            return None, None
        axis = axis[0]
    if w.shape[0] % sh.mesh.shape[axis]:
        return None, None
    return sh.mesh, axis


def _stats_for_experts(stats: LayerStats, n: int, path: str) -> LayerStats:
    """The stacked statistics with every field checked to lead with the expert axis; `count` defaulted to ones."""
    for f in dataclasses.fields(LayerStats):
        a = getattr(stats, f.name)
        if a is not None and (jnp.ndim(a) < 1 or jnp.shape(a)[0] != n):
            raise ValueError(f"{path}: per-expert statistics field {f.name!r} has shape {jnp.shape(a)}, but the "
                             f"weight stacks {n} experts; capture them with jq.calibration.experts for this layer")
    count = stats.count if stats.count is not None else jnp.ones((n,), jnp.float32)
    return dataclasses.replace(stats, count=jnp.asarray(count, jnp.float32))


def quantize_stacked(path: str, w: jax.Array, record: Any, scheme: Scheme, layout: Layout,
                     stats: LayerStats | None, *, method: str = "rtn", reports_info: bool = False) -> QTensor:
    """Quantize the stacked expert weight `w` [E, K, N] (`layout` its validated stacked layout, contraction axis
    1) expert by expert with the method `record`, each expert on its own slice of the stacked `stats` (hessian
    [E, K, K], act_* [E, K], count [E]; None for methods without data).

    Experts with `count == 0` get RTN instead (warned, naming `path` and the expert indices); with
    `reports_info`, damping increases, Cholesky fallbacks and dead inputs are warned per expert (outside jit).
    Returns a QTensor of logical shape [E, K, N] (its arrays expert-first, sharded like `w` when `w` is sharded
    on its expert axis)."""
    n = int(w.shape[0])
    inner = expert_layout(layout, scheme, path)
    mesh, axis = _expert_axis(w)
    traced = isinstance(w, jax.core.Tracer)
    if stats is None:
        stats = LayerStats(count=jnp.ones((n,), jnp.float32))
    stats = _stats_for_experts(stats, n, path)
    want_info = reports_info and not traced
    out = _vmapped(record, scheme, inner, want_info, mesh, axis)(w, stats)
    q, info = out if want_info else (out, None)
    empty = None if isinstance(stats.count, jax.core.Tracer) else np.asarray(stats.count) <= 0
    if empty is not None and empty.any() and not isinstance(record, RTN):
        codebook = scheme.fmt.is_lookup  # no RTN grid: the method itself on H = I
        instead = f"unweighted {method}" if codebook else "RTN"
        warnings.warn(f"{path}: no calibration token was routed to expert(s) {np.flatnonzero(empty).tolist()} of "
                      f"{n}; quantized them with {instead} instead of {method!r}. Calibrate on more or other data so "
                      "that every expert is used", stacklevel=3)
        if codebook:
            k = inner.shape[inner.axes[0]]
            eye = LayerStats(hessian=jnp.broadcast_to(jnp.eye(k, dtype=jnp.float32), (n, k, k)), count=stats.count)
            fallback = _vmapped(record, scheme, inner, False, mesh, axis)(w, eye)
        else:
            fallback = _vmapped(RTN(), scheme, inner, False, mesh, axis)(w, stats)
        keep = jnp.asarray(empty)

        def pick(a, b):
            return jnp.where(keep.reshape((n,) + (1,) * (a.ndim - 1)), b, a)

        q = jax.tree_util.tree_map(pick, q, fallback)
    if info is not None:
        _warn_experts(path, method, info, empty)
    return stack_qtensors(q, layout, path)


def _warn_experts(path: str, method: str, info: dict, empty: np.ndarray | None) -> None:
    """Per-expert warnings from a vmapped method's info (experts without tokens were warned about already)."""
    skip = np.zeros(0, bool) if empty is None else empty

    def experts(key: str, test) -> list[int]:
        if key not in info:
            return []
        bad = np.atleast_1d(test(np.asarray(info[key])))
        if skip.size:
            bad = bad & ~skip
        return np.flatnonzero(bad).tolist()

    no_data = experts("no_data", lambda a: a.astype(bool))
    if no_data:
        warnings.warn(f"{path}: the inputs routed to expert(s) {no_data} were zero on every calibration token, so "
                      f"{method} had nothing to fit and they were quantized with RTN", stacklevel=4)
    failed = experts("fallback", lambda a: a.astype(bool) & ~np.asarray(info.get("no_data", False), bool))
    if failed:
        warnings.warn(f"{path}: {method} failed for expert(s) {failed} even after raising the damping (Hessian not "
                      "positive definite); they fell back to RTN", stacklevel=4)
    dead = experts("dead", lambda a: a > 0)
    dead = [e for e in dead if e not in no_data]
    if dead:
        warnings.warn(f"{path}: some input channels of expert(s) {dead} never fired on the tokens routed to them; "
                      f"{method} rounded their weights without error feedback. Calibrate on more data so that "
                      "they fire, or quantize these experts with method: rtn", stacklevel=4)
