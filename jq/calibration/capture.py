"""Calibration statistics from running an unmodified linen model: per routable layer (Dense, DenseGeneral), the
input's second moment and per-channel magnitudes, accumulated by streaming over batches.

Statistics of a kernel at path `P` (the same path `quantize_params` sees), with x the layer input flattened to
[tokens, K] (K = the contracted features):

    hessian      [K, K] float32   Σ xᵀx / n        (GPTQ, AWQ's output-error objective)
    act_absmean  [K]    float32   Σ |x| / n        (AWQ scales)
    act_sq       [K]    float32   Σ x² / n         (data-aware clip search)
    act_absmax   [K]    float32   max |x|          (SmoothQuant, LLM.int8 outliers)
    count        []     float32   n                (tokens seen; 0 marks a layer no token reached)

Streaming: one jitted step adds a batch's sums to the running sums (donated), so memory is the size of the
statistics, not of the data. Data parallel: pass a `mesh`; batches are sharded over its first axis and XLA reduces
the sums with a collective, giving the single-device result.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from jax.sharding import NamedSharding, PartitionSpec

from jq.interop.layers import LayerCall, layer_interceptor
from jq.interop.linen import apply
from jq.numbers.qtensor import is_qtensor

__all__ = ["capture", "capture_fns", "accumulate", "finalize", "layer_inputs_stats", "STAT_KEYS"]

STAT_KEYS = ("hessian", "abs_sum", "sq_sum", "act_absmax", "count")


def layer_inputs_stats(x: jax.Array, k: int) -> dict[str, jax.Array]:
    """Sums for one batch of layer inputs x [..., K] (contracted features last)."""
    x = x.reshape(-1, k).astype(jnp.float32)
    return {
        "hessian": jnp.einsum("tk,tl->kl", x, x, precision=jax.lax.Precision.HIGHEST),
        "abs_sum": jnp.sum(jnp.abs(x), axis=0),
        "sq_sum": jnp.sum(x * x, axis=0),
        "act_absmax": jnp.max(jnp.abs(x), axis=0),
        "count": jnp.asarray(x.shape[0], jnp.float32),
    }


def _merge(a: dict, b: dict) -> dict:
    return {
        "hessian": a["hessian"] + b["hessian"],
        "abs_sum": a["abs_sum"] + b["abs_sum"],
        "sq_sum": a["sq_sum"] + b["sq_sum"],
        "act_absmax": jnp.maximum(a["act_absmax"], b["act_absmax"]),
        "count": a["count"] + b["count"],
    }


def _merge_all(acc: dict, new: dict) -> dict:
    return {p: _merge(acc[p], new[p]) if p in acc else new[p] for p in {**acc, **new}}


def finalize(sums: dict[str, dict]) -> dict[str, dict]:
    """Running sums → the documented statistics (means). Layers with no tokens keep count 0 and zero stats."""
    out = {}
    for path, s in sums.items():
        n = jnp.maximum(s["count"], 1.0)
        out[path] = {
            "hessian": s["hessian"] / n,
            "act_absmean": s["abs_sum"] / n,
            "act_sq": s["sq_sum"] / n,
            "act_absmax": s["act_absmax"],
            "count": s["count"],
        }
    return out


def recorder(paths: set[str] | None, found: dict) -> Callable:
    """An interceptor that stores the input sums of Dense / DenseGeneral layers with a float kernel (whose kernel
    path is in `paths`, or all), their contracted axes moved last and flattened."""

    def record(c: LayerCall):
        if not c.is_einsum and (paths is None or c.path in paths) and not is_qtensor(c.kernel):
            x = jnp.asarray(c.x)
            lead = x.ndim - len(c.axes)
            xc = jnp.moveaxis(x, c.axes, tuple(range(lead, x.ndim)))
            s = layer_inputs_stats(xc, int(np.prod(xc.shape[lead:])))
            found[c.path] = _merge(found[c.path], s) if c.path in found else s
        return c.proceed()

    return layer_interceptor(record)


def capture(
    module: nn.Module,
    variables: dict,
    batches: Iterable[Any],
    *,
    paths: Iterable[str] | None = None,
    method: str | None = None,
    mesh: jax.sharding.Mesh | None = None,
    progress: Callable[[int], None] | None = None,
) -> dict[str, dict]:
    """Run `module` over `batches` and return finalized statistics keyed by kernel path.

    Args:
      module, variables: an unmodified linen module and its variables (params may hold QTensors: quantized
        layers run through jq.ops, as in `jq.interop.apply`, and are not recorded).
      batches: an iterable of positional-argument tuples (or single arrays) for `module.apply`.
      paths: kernel paths to record (default: every routable layer with a float kernel).
      method: the module method to run (default `__call__`).
      mesh: shard each batch's leading axis over the mesh's first axis (data parallel).
      progress: called with the number of batches done.
    """
    if mesh is not None:  # data parallel: let XLA place the all-reduce (Explicit axes would demand out_sharding)
        mesh = jax.sharding.Mesh(mesh.devices, mesh.axis_names,
                                 axis_types=(jax.sharding.AxisType.Auto,) * len(mesh.axis_names))
        spec = NamedSharding(mesh, PartitionSpec(mesh.axis_names[0]))
        batches = (tuple(jax.device_put(a, spec) for a in _as_args(b)) for b in batches)
    return accumulate(capture_fns(module, paths, method), variables, batches, paths=paths, progress=progress)


def _as_args(batch) -> tuple:
    return batch if isinstance(batch, tuple) else (batch,)


def capture_fns(module: nn.Module, paths: Iterable[str] | None = None, method: str | None = None):
    """The jitted (first, step) pair of a capture: `first(variables, args)` returns one batch's sums, `step(acc,
    variables, args)` adds a batch to donated running sums. Build once and reuse across calls of `accumulate`."""
    wanted = None if paths is None else set(paths)

    def run(variables, args):
        found: dict = {}
        apply(module, variables, *args, method=method, interceptor=recorder(wanted, found))
        return found

    return jax.jit(run), jax.jit(lambda acc, v, a: _merge_all(acc, run(v, a)), donate_argnums=(0,))


def accumulate(fns, variables: dict, batches: Iterable[Any], *, paths: Iterable[str] | None = None,
               progress: Callable[[int], None] | None = None) -> dict[str, dict]:
    """Stream `batches` through the `capture_fns` pair and return finalized statistics; every path in `paths`
    must have been recorded."""
    first, step = fns
    acc = None
    for i, batch in enumerate(batches):
        args = _as_args(batch)
        acc = first(variables, args) if acc is None else step(acc, variables, args)
        if progress is not None:
            progress(i + 1)
    if acc is None:
        raise ValueError("capture: no calibration batches were given; pass at least one batch")
    stats = finalize(acc)
    for p in sorted(set(paths or ()) - set(stats)):
        raise ValueError(
            f"capture: layer {p!r} was never called by the model, so it has no statistics; check the path "
            "(jq inspect lists them) or drop it from the calibrated rules"
        )
    return stats
