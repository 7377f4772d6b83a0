"""Calibration statistics of any matmul on a weight, found by tracing: for every `dot_general` that reads a weight
leaf (`jq.interop.usage`) — `jnp.einsum` / `@` / `lax.dot_general` in the user's own modules included — the other
operand, its contracted dims moved last in the order of the weight's contraction axes and flattened to [tokens, K],
gives that weight's `LayerStats` (K = the product of the weight's contraction axes, as `quantize_leaf` expects).
Weights under `nn.scan` get statistics per layer, stacked on a leading axis (hessian [L, K, K], count [L]), which
`quantize_leaf` quantizes layer by layer (`jq.algorithms.experts.quantize_stacked`).

`traced_capture` streams batches through one jitted interpreter step (`jq.interop.jaxpr_eval`) and returns the
statistics with, for every wanted weight it could not capture, the reason (quantized already, batch dims in its
matmul, a reshape the trace could not follow, inside `cond` / `while`, nested scans).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp

from jq.algorithms.stats import LayerStats, Stats, StatSums
from jq.interop.jaxpr_eval import evaluate
from jq.interop.linen import dense_like
from jq.interop.usage import DotSite, Usage, trace_usage
from jq.tree.axes import LeafUsage
from jq.numbers.qtensor import is_qtensor
from jq.tree.paths import path_str

__all__ = ["traced_capture", "capturable", "stack_stats", "site_sums", "is_stacked"]


def capturable(usage: Usage, quantized: set[str] = frozenset()) -> dict[str, str | None]:
    """For every weight with a matmul use: None when its statistics can be captured by tracing, else why not."""
    out: dict[str, str | None] = {}
    by_path: dict[str, list[DotSite]] = {}
    for s in usage.sites.values():
        by_path.setdefault(s.path, []).append(s)
    for path, sites in by_path.items():
        why = None
        if path in quantized:
            why = "it is quantized already (capture runs on float weights)"
        elif any(s.batch for s in sites):
            why = "its matmul has batch dims on the weight (one Hessian per batch index is not supported)"
        elif not all(s.use.exact for s in sites):
            why = "a reshape between the leaf and its matmul could not be followed axis by axis"
        elif usage[path].contraction_axes is None:
            why = usage[path].conflict
        elif any(w != "scan" for s in sites for w in s.where):
            why = "its matmul runs inside lax.cond / lax.while_loop"
        elif any(len(s.where) > 1 for s in sites) or len({len(s.where) for s in sites}) > 1:
            why = "it is used under nested scans (or both inside and outside a scan)"
        out[path] = why
    return out


def site_sums(site: DotSite, x: jax.Array) -> StatSums:
    """The statistics sums of one batch of a weight's matmul input `x` (the dot's other operand): its contracted
    dims moved last in the order of the weight's contraction axes and flattened to [tokens, K]."""
    k = len(site.other_k)
    xc = jnp.moveaxis(jnp.asarray(x), site.other_k, tuple(range(x.ndim - k, x.ndim)))
    return StatSums.of(xc, math.prod(xc.shape[x.ndim - k:]))


def _step_fn(usage: Usage, wanted: frozenset[str]) -> Callable[..., dict]:
    """jit(params leaves, args) → {(path, scan index): StatSums} of one batch."""

    def run(leaves, args):
        found: dict = {}

        def hook(site: DotSite, invals: list, index: tuple[int, ...]):
            if site.path in wanted:
                s = site_sums(site, invals[1 - site.side])
                key = (site.path, index)
                found[key] = found[key].merge(s) if key in found else s
            return None

        evaluate(usage, leaves, args, hook)
        return found

    return jax.jit(run)


def stack_stats(per_layer: dict[tuple[int, ...], StatSums], stacked: bool = True) -> LayerStats:
    """Finalized statistics of one weight: its sums merged when it is used outside any scan or is not `stacked`
    (one weight every scan iteration reads), else finalized per scan iteration and stacked on a leading axis
    (hessian [L, K, K], act_* [L, K], count [L])."""
    if list(per_layer) == [()] or not stacked:
        sums = list(per_layer.values())
        for s in sums[1:]:
            sums[0] = sums[0].merge(s)
        return sums[0].finalize()
    layers = [per_layer[i].finalize() for i in sorted(per_layer)]
    return LayerStats(*[None if getattr(layers[0], f.name) is None else
                        jnp.stack([getattr(s, f.name) for s in layers]) for f in dataclasses.fields(LayerStats)])


def traced_capture(module: Any, variables: dict, batches: Iterable[Any], *, paths: Iterable[str] | None = None,
                   method: Any = None, usage: Usage | None = None,
                   progress: Callable[[int], None] | None = None) -> tuple[Stats, dict[str, str]]:
    """Statistics of the matmul weights of `module` by tracing, keyed by leaf path, and the wanted weights it could
    not capture with the reason.

    Args:
      module, variables: an unmodified linen module and its variables (QTensor leaves are dequantized to run and
        are not recorded).
      batches: positional-argument tuples (or single arrays) of equal shapes.
      paths: the weights to record (default: every float weight read by a matmul).
      usage: a `trace_usage` of the model on the first batch (traced here when not given).
    Returns: (stats: {path: LayerStats}, skipped: {path: reason}).
    """
    params = variables["params"]
    flat = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_qtensor)[0]
    quantized = {path_str(kp) for kp, x in flat if is_qtensor(x)}
    leaves = [x.dequantize() if is_qtensor(x) else x for _, x in flat]
    acc: dict = {}
    step = None
    n = 0
    for batch in batches:
        args = batch if isinstance(batch, tuple) else (batch,)
        if usage is None:
            usage = trace_usage(module, {**variables, "params": dense_like(params)}, *args, method=method)
        if step is None:
            ok = capturable(usage, quantized)
            want = set(ok) if paths is None else set(paths)
            skipped = {p: ok.get(p) or "" for p in want if ok.get(p) is not None or p not in ok}
            for p in skipped:
                if p not in ok:
                    skipped[p] = "no matmul in the traced model reads it" if p in usage else "no such parameter"
            step = _step_fn(usage, frozenset(want - set(skipped)))
        for key, s in step(leaves, args).items():
            acc[key] = acc[key].merge(s) if key in acc else s
        n += 1
        if progress is not None:
            progress(n)
    if step is None:
        raise ValueError("capture: no calibration batches were given; pass at least one batch")
    grouped: dict[str, dict] = {}
    for (path, index), s in acc.items():
        grouped.setdefault(path, {})[index] = s
    return {p: stack_stats(g, is_stacked(usage[p])) for p, g in grouped.items()}, skipped


def is_stacked(use: LeafUsage) -> bool:
    """Whether a scan slices the leaf (scanned layers' weights, stacked on a layer axis)."""
    return any(u.stacked for u in use.matmuls)
