"""Shardings for a sharded restore: a spec given for the logical weight, fitted to each stored array of a leaf
(codes, scales and zero points share the weight's rank; dims the mesh axes do not divide stay replicated)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec, Sharding, SingleDeviceSharding

from jq.checkpoint.format import FIELDS, QUANTIZED_KINDS, leaf_arrays, stored_specs
from jq.numbers.lowrank import LowRank
from jq.numbers.qtensor import QTensor
from jq.tree.paths import path_str

__all__ = ["leaf_shardings", "spec_lookup", "is_spec"]


def is_spec(x: Any) -> bool:
    """A leaf of a shardings tree: a spec, None, a target QTensor (or LowRank), or a per-field dict {"codes": ...}."""
    return x is None or isinstance(x, (PartitionSpec, Sharding, QTensor, LowRank)) or (
        isinstance(x, Mapping) and "codes" in x and set(x) <= set(FIELDS))


def _fit(spec: PartitionSpec, shape: tuple[int, ...], mesh: jax.sharding.Mesh) -> PartitionSpec:
    """`spec` for an array of `shape`: entries for dims the mesh axes do not divide (or that it lacks) dropped."""
    out = []
    for i, dim in enumerate(shape):
        e = spec[i] if i < len(spec) else None
        if e is not None:
            names = e if isinstance(e, tuple) else (e,)
            size = int(np.prod([mesh.shape[n] for n in names]))
            if dim % size:
                e = None
        out.append(e)
    return PartitionSpec(*out)


def leaf_shardings(path: str, entry: Mapping[str, Any], spec: Any,
                   mesh: jax.sharding.Mesh | None) -> dict[str, Sharding]:
    """Per stored array of one leaf: the sharding to restore it with.

    `spec` is for the logical weight: a PartitionSpec (needs `mesh`) or a Sharding; for a QTensor a
    NamedSharding applies to codes / scale / zero (same rank as the weight; dims its mesh axes do not divide are
    replicated), while `perm`, a sparse term and flat layouts are replicated; another Sharding is used as is. A dict
    {field: spec} (or a target QTensor) sets a QTensor's arrays one by one. None: replicated over `mesh`, else
    this process's first device.
    """
    default = NamedSharding(mesh, PartitionSpec()) if mesh is not None else SingleDeviceSharding(jax.local_devices()[0])
    if isinstance(spec, (QTensor, LowRank)):  # a target leaf whose arrays carry shardings (a LowRank's: base + factors)
        spec = {f: getattr(a, "sharding", None) for f, a in leaf_arrays(spec).items()}
    per_field = isinstance(spec, Mapping)
    flat = entry["kind"] in QUANTIZED_KINDS and bool(entry["layout"].get("flat", False))
    out = {}
    for field, s in stored_specs(entry).items():
        sp = spec.get(field) if per_field else spec
        if sp is None:
            out[field] = default
            continue
        if isinstance(sp, PartitionSpec):
            if mesh is None:
                raise ValueError(f"{path}: a PartitionSpec ({sp}) needs a mesh; pass load(..., mesh=Mesh(...))")
            sp = NamedSharding(mesh, sp)
        if not isinstance(sp, Sharding):
            raise ValueError(f"{path}: sharding {sp!r} is not a jax Sharding, a PartitionSpec or None")
        if not isinstance(sp, NamedSharding):
            out[field] = sp
        elif not per_field and (field in ("perm", "sparse_index", "sparse_value") or flat):
            out[field] = NamedSharding(sp.mesh, PartitionSpec())
        else:
            out[field] = NamedSharding(sp.mesh, _fit(sp.spec, tuple(s["shape"]), sp.mesh))
    return out


def spec_lookup(shardings: Any, target_leaves: Mapping[str, Any] | None) -> Callable[[str, Any], Any]:
    """path, abstract leaf -> the spec `load` was given for it (from a callable, a tree / flat dict, or the
    target's own shardings)."""
    if callable(shardings) and not isinstance(shardings, (Sharding, PartitionSpec)):
        return shardings
    table: dict[str, Any] = {}
    if shardings is not None:
        flat, _ = jax.tree_util.tree_flatten_with_path(shardings, is_leaf=is_spec)
        table = {path_str(kp): v for kp, v in flat}
    elif target_leaves:
        table = {p: (x if isinstance(x, QTensor) else getattr(x, "sharding", None)) for p, x in target_leaves.items()}
    return lambda path, _abstract: table.get(path)
