"""Sequential calibration of any model through its traced jaxpr: every weight is calibrated on the inputs that the
already quantized weights before it produce — across `nn.scan` stacks, NNX models, custom einsum modules and
whatever the block discovery (`jq.calibration.discover`) cannot stage — with no declaration.

`quantize_traced` evaluates the model's jaxpr (`jq.interop.usage.trace_usage`) on all calibration batches in
lockstep (`jq.interop.jaxpr_eval.evaluate_batches`). At each `dot_general` that reads a weight to calibrate, the
weight's input over every batch gives its statistics; the weight (under `nn.scan`: this layer's slice) is quantized
there (GPTQ, AWQ clip, …) and the matmul runs on it through `jq.ops` (activation quantization, online rotation), so
everything downstream — the rest of the block, the next layers — sees the quantized model ("true sequential", in
execution order: q/k/v, then o, …). Weights that cannot be swapped at their matmul — read by several matmuls,
through a reshape or elementwise op, shared by every scan iteration, rotated and stacked — get statistics from the
same pass (inputs of the partially quantized model) and are quantized after it; the log says which and why.
Data-free rules and leaves outside any matmul go through `quantize_params` as usual. AWQ / SmoothQuant folds
still need a family's `BlockSpec`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from jq.algorithms.experts import stack_qtensors
from jq.algorithms.stats import StatSums
from jq.calibration.usage_capture import capturable, is_stacked, site_sums, stack_stats
from jq.interop.jaxpr_eval import Batched, evaluate_batches, lanes
from jq.interop.traced_routing import run_site
from jq.interop.usage import DotSite, Usage
from jq.numbers.qtensor import is_qtensor
from jq.tree.axes import axes_from_use
from jq.tree.paths import path_str
from jq.tree.quantize import quantize_leaf, quantize_params
from jq.tree.recipe import QuantConfig, Rule

__all__ = ["plan_traced", "quantize_traced"]

_sums = jax.jit(site_sums, static_argnums=0)


def plan_traced(usage: Usage, params: Any, cfg: QuantConfig) -> tuple[dict[str, tuple], dict[str, str],
                                                                      dict[str, str]]:
    """Which weights are calibrated where: ({path: (rule, axes)} quantized at their matmul, {path: why} quantized
    after the pass on the statistics it recorded, {path: why} calibrated weights whose inputs cannot be captured
    (`capturable`)). Weights that need no data or stay float (embeddings) are in none."""
    flat = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_qtensor)[0]
    quantized = {path_str(kp) for kp, x in flat if is_qtensor(x)}
    ok = capturable(usage, quantized)
    sites: dict[str, list[DotSite]] = {}
    for s in usage.sites.values():
        sites.setdefault(s.path, []).append(s)
    at_matmul: dict[str, tuple] = {}
    after: dict[str, str] = {}
    skipped: dict[str, str] = {}
    for kp, w in flat:
        path = path_str(kp)
        rule = cfg.rule_for(path, getattr(w, "ndim", 0))
        if rule is None or rule.scheme is None or not rule.needs_calibration or path in quantized:
            continue
        if ok.get(path, "") is not None:
            skipped[path] = ok.get(path) or "no matmul in the traced model reads it"
            continue
        use = usage[path]
        if use.gathered and not rule.force:
            continue  # an embedding: quantize_params keeps it float and says so
        axes = axes_from_use(path, tuple(w.shape), rule.scheme.axes, use)
        stacked = {a for u in use.matmuls for a in u.stacked}
        why = None
        if len(sites[path]) > 1:
            why = f"read by {len(sites[path])} matmuls (their statistics merge)"
        elif sites[path][0].direct is None:
            why = f"read through {use.matmuls[0].note or 'ops'} (the quantized weight cannot replace it there)"
        elif sites[path][0].where and stacked != {0}:
            why = "read by every scan iteration (not stacked on a leading layer axis)"
        elif stacked and rule.scheme.policy.rotation is not None:
            why = "rotated and stacked on a layer axis"
        if why is None:
            at_matmul[path] = (rule, axes)
        else:
            after[path] = why
    return at_matmul, after, skipped


def quantize_traced(usage: Usage, params: Any, cfg: QuantConfig, batches: Sequence[tuple], *,
                    progress: bool = False) -> tuple[Any, dict[str, Any]]:
    """Quantize `params` by `cfg`, calibrating weight by weight in execution order on `batches` (argument tuples
    of the shapes `usage` was traced with; all are held, with the activations that cross from one weight to the
    next, while the equations between weights run one batch at a time).

    Returns (qparams, log): log["sequential"] the weights quantized at their matmul, log["after"] {path: why} those
    quantized after the pass, log["seconds"]. Raises ValueError naming the calibrated weights whose inputs cannot
    be captured, and why."""
    t0 = time.perf_counter()
    at_matmul, after, skipped = plan_traced(usage, params, cfg)
    if skipped:
        raise ValueError("no calibration statistics can be recorded for " + "; ".join(
            f"{p}: {why}" for p, why in sorted(skipped.items())) + ". Quantize these weights with method: rtn, or "
            "keep them float")
    flat, treedef = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_qtensor)
    paths = [path_str(kp) for kp, _ in flat]
    dense = {p: x for p, (_, x) in zip(paths, flat)}
    leaves = [x.dequantize() if is_qtensor(x) else x for _, x in flat]
    done: dict[str, dict[tuple, Any]] = {p: {} for p in at_matmul}
    sums: dict[str, dict[tuple, StatSums]] = {p: {} for p in after}
    say = _printer(progress)

    def hook(site: DotSite, invals: list, index: tuple[int, ...]) -> Batched | None:
        if site.path not in at_matmul and site.path not in after:
            return None
        xs = invals[1 - site.side]
        acc = None
        for x in xs if isinstance(xs, Batched) else [xs]:
            s = _sums(site, x)
            acc = s if acc is None else acc.merge(s)
        if site.path in after:
            prev = sums[site.path].get(index)
            sums[site.path][index] = acc if prev is None else prev.merge(acc)
            return None
        rule, axes = at_matmul[site.path]
        q = done[site.path][index] = _quantize_at(site.path, dense[site.path], rule, axes, acc, index)
        say(site.path, index)
        # on through jq.ops, as the quantized model runs it (activation quantization and rotations included)
        return lanes(lambda *operands: run_site(site, list(operands), q, sliced=bool(index)), *invals)

    want = set(at_matmul) | set(after)
    evaluate_batches(usage, leaves, [b if isinstance(b, tuple) else (b,) for b in batches], hook,
                     wanted=lambda s: s.path in want)
    out = list(x for _, x in flat)
    for i, p in enumerate(paths):
        if p in at_matmul and done[p]:
            out[i] = _assemble(p, dense[p], at_matmul[p], done[p])
    stats = {p: stack_stats(g, is_stacked(usage[p])) for p, g in sums.items() if g}
    qparams = quantize_params(jax.tree_util.tree_unflatten(treedef, out), cfg, stats, usage=usage)
    return qparams, {"sequential": sorted(at_matmul), "after": after, "seconds": time.perf_counter() - t0}


def _quantize_at(path: str, w: jax.Array, rule: Rule, axes: tuple[int, ...], sums: StatSums,
                 index: tuple[int, ...]) -> Any:
    """The QTensor of the weight, or under a scan of its layer `index[0]` (leading axis)."""
    if index:
        w, axes = w[index[0]], tuple(a - 1 for a in axes)
        path = f"{path}[{index[0]}]"
    return quantize_leaf(path, w, rule, sums.finalize(), axes=axes)


def _assemble(path: str, w: jax.Array, plan: tuple, per_layer: dict[tuple, Any]) -> Any:
    """The leaf's QTensor: the one quantized at its matmul, or the layers' stacked (the layout of `w` [L, ...])."""
    if list(per_layer) == [()]:
        return per_layer[()]
    rule, axes = plan
    if sorted(per_layer) != [(i,) for i in range(w.shape[0])]:
        raise ValueError(f"{path}: the traced pass reached layers {sorted(per_layer)} of {w.shape[0]}; every layer "
                         "of a scanned weight must run once")
    qs = [per_layer[(i,)] for i in range(w.shape[0])]
    return stack_qtensors(jax.tree.map(lambda *a: jnp.stack(a), *qs), rule.scheme.layout(tuple(w.shape), axes, path),
                          path)


def _printer(enabled: bool):
    if not enabled:
        return lambda *a: None
    from rich.console import Console

    console, start = Console(stderr=True), time.perf_counter()

    def show(path: str, index: tuple[int, ...]):
        where = f" layer {index[0]}" if index else ""
        console.print(f"  calibrated {path}{where}; {time.perf_counter() - start:.0f} s", highlight=False)

    return show
