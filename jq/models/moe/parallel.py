"""Expert parallelism: the stacked expert weights (float arrays or QTensors) split over one mesh axis on their
leading expert axis, everything else replicated. A jitted forward (or `jq.calibration.experts.capture_experts`)
on such params runs each expert's einsums on the devices holding it, and `jq.quantize_params` with per-expert
statistics quantizes each device's experts in place (`jq.algorithms.experts.quantize_stacked` runs under
`shard_map`)."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from jq.numbers.qtensor import is_qtensor
from jq.tree.paths import path_str

__all__ = ["is_expert_leaf", "shard_experts"]


def is_expert_leaf(path: str, leaf: Any) -> bool:
    """A stacked expert weight: a 3-D leaf (array or QTensor, logical shape [E, K, N]) under an `experts` scope."""
    return "experts" in path.split("/")[:-1] and getattr(leaf, "ndim", 0) == 3


def shard_experts(params: Any, mesh: Mesh, axis: str = "expert") -> Any:
    """`params` placed on `mesh`: every stacked expert weight split over `axis` on its expert axis (a QTensor's
    codes, scales and zero points alike; a permutation replicated), every other leaf replicated.

    The mesh's axes are used as `Auto` (XLA places the collectives of the combine), so a `jax.make_mesh` mesh
    works as is. Raises ValueError naming the leaf when `axis` is not in the mesh or does not divide E."""
    if axis not in mesh.axis_names:
        raise ValueError(f"shard_experts: mesh has axes {mesh.axis_names}, not {axis!r}; pass axis=one of them")
    mesh = Mesh(mesh.devices, mesh.axis_names, axis_types=(AxisType.Auto,) * len(mesh.axis_names))
    split, rep = NamedSharding(mesh, PartitionSpec(axis)), NamedSharding(mesh, PartitionSpec())
    size = mesh.shape[axis]

    def place(keypath, leaf):
        path = path_str(keypath)
        if not is_expert_leaf(path, leaf):
            return jax.device_put(leaf, rep)
        if leaf.shape[0] % size:
            raise ValueError(f"{path}: {leaf.shape[0]} experts do not split over mesh axis {axis!r} of size {size}; "
                             "use a mesh axis whose size divides the number of experts")
        if not is_qtensor(leaf):
            return jax.device_put(leaf, split)
        return dataclasses.replace(
            leaf, codes=jax.device_put(leaf.codes, split), scale=jax.device_put(leaf.scale, split),
            zero=None if leaf.zero is None else jax.device_put(leaf.zero, split),
            perm=None if leaf.perm is None else jax.device_put(leaf.perm, rep))

    return jax.tree_util.tree_map_with_path(place, params, is_leaf=is_qtensor)
