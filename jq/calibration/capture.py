"""Calibration statistics from running an unmodified linen model: per routable layer (Dense, DenseGeneral), the
input's second moment and per-channel magnitudes (`jq.algorithms.stats.LayerStats`, keyed by the kernel's path —
the path `quantize_params` sees), accumulated by streaming over batches. Matmuls on weights outside those layers
(`jnp.einsum` on a `self.param`, `nn.Einsum`) are captured by tracing (`jq.calibration.usage_capture`) when
needed; weights that cannot be captured are warned about, never dropped silently.

Streaming: one jitted step adds a batch's sums (`StatSums`) to the running sums (donated), so memory is the size of
the statistics, not of the data. Data parallel: pass a `mesh`; batches are sharded over it (`shard_rows`) and XLA
reduces the sums with a collective, giving the single-device result up to the order of the float sums — also over
several processes (a multi-controller run, docs/MULTIHOST.md).
"""

from __future__ import annotations

import itertools
import warnings
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from jax.sharding import NamedSharding, PartitionSpec

from jq.algorithms.stats import Stats, StatSums
from jq.interop.layers import LayerCall, layer_interceptor
from jq.calibration.usage_capture import traced_capture
from jq.interop.linen import apply, dense_like
from jq.interop.usage import trace_usage
from jq.numbers.qtensor import is_qtensor
from jq.tree.paths import path_str

__all__ = ["capture", "capture_fns", "accumulate", "finalize", "batched", "shard_rows"]

_SumsFn = Callable[..., dict[str, StatSums]]  # a jitted capture function returning running sums by kernel path


def batched(tokens: Any, batch_size: int, mesh: jax.sharding.Mesh | None = None) -> list[jax.Array]:
    """Calibration inputs [S, ...] as device batches of `batch_size` rows (the last may be shorter): what
    `capture` and sequential calibration take; with a `mesh`, each batch's rows split over it (`shard_rows`)."""
    tokens = np.asarray(tokens)
    rows = (tokens[i : i + batch_size] for i in range(0, len(tokens), batch_size))
    return [jnp.asarray(b) if mesh is None else shard_rows(b, mesh) for b in rows]


def shard_rows(a: Any, mesh: jax.sharding.Mesh) -> jax.Array:
    """A batch `a` [B, ...] on `mesh` for data parallelism: rows split over all its devices when their number
    divides B, else over its first axis when that divides B, else replicated. `a` is host data (or an addressable
    array) that every process holds in full; the result is one global array, also across processes. XLA places
    the reductions of per-row sums (Auto mesh axes: Explicit ones would demand out_sharding)."""
    mesh = jax.sharding.Mesh(mesh.devices, mesh.axis_names,
                             axis_types=(jax.sharding.AxisType.Auto,) * len(mesh.axis_names))
    b, first = np.shape(a)[0], mesh.shape[mesh.axis_names[0]]
    axes = tuple(mesh.axis_names) if b % mesh.size == 0 else mesh.axis_names[0] if b % first == 0 else None
    sharding = NamedSharding(mesh, PartitionSpec(axes))
    if isinstance(a, jax.Array) and not a.is_fully_addressable:  # already a global array: reshard it
        return jax.device_put(a, sharding)
    host = np.asarray(a)
    return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])


def _merge_all(acc: dict[str, StatSums], new: dict[str, StatSums]) -> dict[str, StatSums]:
    return {p: acc[p].merge(new[p]) if p in acc else new[p] for p in {**acc, **new}}


def finalize(sums: dict[str, StatSums]) -> Stats:
    """Running sums → the statistics methods read (`LayerStats`, means), by kernel path."""
    return {path: s.finalize() for path, s in sums.items()}


def recorder(paths: set[str] | None, found: dict) -> Callable:
    """An interceptor that stores the input sums of Dense / DenseGeneral layers with a float kernel (whose kernel
    path is in `paths`, or all), their contracted axes moved last and flattened."""

    def record(c: LayerCall):
        if not c.is_einsum and (paths is None or c.path in paths) and not is_qtensor(c.kernel):
            x = jnp.asarray(c.x)
            lead = x.ndim - len(c.axes)
            xc = jnp.moveaxis(x, c.axes, tuple(range(lead, x.ndim)))
            s = StatSums.of(xc, int(np.prod(xc.shape[lead:])))
            found[c.path] = found[c.path].merge(s) if c.path in found else s
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
    traced: bool | None = None,
) -> Stats:
    """Run `module` over `batches` and return finalized statistics keyed by kernel path (`LayerStats`: hessian
    [K, K], act_absmean / act_sq / act_absmax [K], K = the layer's contracted features).

    Args:
      module, variables: an unmodified linen module and its variables (params may hold QTensors: quantized
        layers run through jq.ops, as in `jq.interop.apply`, and are not recorded).
      batches: an iterable of positional-argument tuples (or single arrays, e.g. token ids [B, T]) for
        `module.apply`.
      paths: kernel paths to record (default: every routable layer with a float kernel).
      method: the module method to run (default `__call__`).
      mesh: shard each batch's leading axis over the mesh (data parallel, `shard_rows`; also across processes:
        every process passes the same batches).
      progress: called with the number of batches done.
      traced: also record weights the standard-layer interceptor does not see — `jnp.einsum` / `@` /
        `lax.dot_general` on a `self.param` in user code, `nn.Einsum` — by tracing the model
        (`jq.calibration.usage_capture`; their statistics are keyed by the weight's own path, per layer for
        scanned layers). None (default): only when needed — a requested path the interceptor does not see, or
        (without `paths`) float matmul weights outside the intercepted layers; True: for every float matmul
        weight outside them; False: never. Weights that still cannot be captured are warned about, naming them
        and why; the batches are then held in memory for the second pass.
    """
    if mesh is not None:
        batches = (tuple(shard_rows(a, mesh) for a in _as_args(b)) for b in batches)
    if traced is False:
        return accumulate(capture_fns(module, paths, method), variables, batches, paths=paths, progress=progress)
    it = iter(batches)
    first = next(it, None)
    if first is None:
        raise ValueError("capture: no calibration batches were given; pass at least one batch")
    usage, extra = _traced_targets(module, variables, _as_args(first), paths, method, traced)
    if not extra:
        return accumulate(capture_fns(module, paths, method), variables, itertools.chain([first], it), paths=paths,
                          progress=progress)
    held = [first, *it]
    stats = accumulate(capture_fns(module, paths, method), variables, held, progress=progress)
    more, skipped = traced_capture(module, variables, held, paths=sorted(extra), method=method, usage=usage)
    stats = {**stats, **more}
    for p in sorted(set(paths or ()) - set(stats)):
        why = skipped.get(p, "")
        if why and why not in ("no such parameter", "no matmul in the traced model reads it"):
            raise ValueError(f"capture: no statistics for {p!r}: {why}; quantize it with method: rtn, or keep it "
                             "float")
        raise ValueError(
            f"capture: layer {p!r} was never called by the model, so it has no statistics; check the path "
            "(jq inspect lists them) or drop it from the calibrated rules"
        )
    if skipped:
        warnings.warn("capture: no statistics for " + "; ".join(f"{p}: {why}" for p, why in sorted(skipped.items()))
                      + ". Quantize these weights with method: rtn, or keep them float", stacklevel=2)
    return stats


def _traced_targets(module: nn.Module, variables: dict, args: tuple, paths: Iterable[str] | None, method: Any,
                    traced: bool | None) -> tuple[Any, set[str]]:
    """(usage, the weights the traced capture should record): those wanted (`paths`, or every float matmul
    weight that is not a gathered embedding) that the interceptor's recorder does not see."""
    seen: set[str] = set()

    def note(c: LayerCall):
        if not c.is_einsum:
            seen.add(c.path)
        return c.proceed()

    def run(v):
        with nn.intercept_methods(layer_interceptor(note)):
            return module.apply(v, *args, method=method)

    jax.eval_shape(run, dense_like(variables))
    usage = trace_usage(module, {**variables, "params": dense_like(variables["params"])}, *args, method=method)
    if paths is not None:
        return usage, set(paths) - seen
    quantized = {p for p, x in _flat(variables["params"]) if is_qtensor(x)}
    float_mm = {p for p, u in usage.items() if u.matmuls and p not in quantized and (traced or not u.gathered)}
    return usage, float_mm - seen


def _flat(tree: Any) -> list[tuple[str, Any]]:
    return [(path_str(kp), x) for kp, x in jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_qtensor)[0]]


def _as_args(batch: Any) -> tuple:
    return batch if isinstance(batch, tuple) else (batch,)


def capture_fns(module: nn.Module, paths: Iterable[str] | None = None,
                method: str | None = None) -> tuple[_SumsFn, _SumsFn]:
    """The jitted (first, step) pair of a capture: `first(variables, args)` returns one batch's sums, `step(acc,
    variables, args)` adds a batch to donated running sums. Build once and reuse across calls of `accumulate`."""
    wanted = None if paths is None else set(paths)

    def run(variables, args):
        found: dict = {}
        apply(module, variables, *args, method=method, interceptor=recorder(wanted, found))
        return found

    return jax.jit(run), jax.jit(lambda acc, v, a: _merge_all(acc, run(v, a)), donate_argnums=(0,))


def accumulate(fns: tuple[_SumsFn, _SumsFn], variables: dict, batches: Iterable[Any], *,
               paths: Iterable[str] | None = None, progress: Callable[[int], None] | None = None) -> Stats:
    """Stream `batches` through the `capture_fns` pair and return finalized statistics (`LayerStats` by kernel
    path: hessian [K, K], act_absmean / act_sq / act_absmax [K]); every path in `paths` must have been recorded."""
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
