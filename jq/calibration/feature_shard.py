"""Calibration statistics of a layer too wide for one device: the Hessian H = Σ xᵀx [K, K] accumulated with its rows
sharded over a mesh axis (feature sharding), so each device holds K/n rows: for K = 28672 (a 70B-class MLP's
down_proj input) H is 28672² × 4 B = 3.3 GB, 411 MB per device on 8 devices.

Each device computes its rows x[:, rows]ᵀ x of every batch (the batch x [T, K], T tokens, is replicated: T × K × 4 B,
117 MB for 1024 tokens at K = 28672, much less than H) and adds them to its shard; no collective is needed. The
per-channel vectors (|x| sums, x² sums, max |x|) are sharded the same way.

GPTQ itself (`jq.algorithms.gptq`) needs the whole H: its Cholesky factor and its channel loop are a sequential
dependency over K. `gather_stats` brings the finalized statistics to one place — a device with room for H, its
factor and the loop's working copies (about 3–4 × H: 10–13 GB at K = 28672, fine on one 80 GB accelerator), or the
host (`device=jax.devices("cpu")[0]`), where GPTQ then runs on the CPU backend.
"""

from __future__ import annotations

from collections.abc import Iterable

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jq.algorithms.stats import LayerStats, StatSums

__all__ = ["feature_sharded_sums", "gather_stats"]


def _shardings(mesh: Mesh, axis: str) -> StatSums:
    rows, vec = NamedSharding(mesh, P(axis, None)), NamedSharding(mesh, P(axis))
    return StatSums(rows, vec, vec, vec, NamedSharding(mesh, P()))


def feature_sharded_sums(batches: Iterable[jax.Array], mesh: Mesh, axis: str | None = None) -> StatSums:
    """`StatSums` of layer inputs `batches` (each [..., K]) with the Hessian's rows [K/n, K] and the per-channel
    sums [K/n] sharded over mesh axis `axis` (default: the mesh's first axis; K must divide by its size).
    Same values as `StatSums.of` + `merge` on one device (up to float summation order)."""
    axis = mesh.axis_names[0] if axis is None else axis
    n = mesh.shape[axis]
    out = _shardings(mesh, axis)
    of = jax.jit(StatSums.of, out_shardings=out)
    merge = jax.jit(StatSums.merge, out_shardings=out)
    acc = None
    for x in batches:
        k = x.shape[-1]
        if k % n:
            raise ValueError(f"feature sharding: {k} input features do not split over mesh axis {axis!r} of size {n}; "
                             "use an axis whose size divides K (or data parallelism, capture's mesh=)")
        x = jax.device_put(x, NamedSharding(mesh, P()))  # every device reads the whole batch, writes its rows of H
        st = of(x)
        acc = st if acc is None else merge(acc, st)
    if acc is None:
        raise ValueError("feature_sharded_sums: no batches")
    return acc


def gather_stats(stats: LayerStats, device: jax.Device | None = None) -> LayerStats:
    """The (sharded) statistics whole on `device` (default: the first device), for GPTQ's Cholesky and channel
    loop, which need all of H; pass `jax.devices("cpu")[0]` to run them on the host."""
    device = jax.devices()[0] if device is None else device
    return jax.tree.map(lambda a: jax.device_put(a, device) if isinstance(a, jax.Array) else a, stats)
