"""Matmuls that user code performs on quantized weights — `jnp.einsum`, `@`, `lax.dot_general` on a `self.param` —
routed to `jq.ops`, by evaluating the model's traced jaxpr (`jq.interop.jaxpr_eval`).

`jq.apply` routes the layers it recognises (nn.Dense / DenseGeneral / Einsum) by intercepting them. When a
quantized leaf is read by any other matmul, `jq.apply` instead traces the model once for the call's shapes
(abstractly, on dense stand-ins) and runs its jaxpr equation by equation: each `dot_general` whose weight operand
is a quantized leaf itself — up to transposes and dtype converts — runs as `jq.ops.qdot_general` on the QTensor
(kernels, activation quantization, online rotations, dense-and-sparse terms), its output laid out as the traced
equation's. Under `nn.scan` (weights stacked on a leading layer axis) the scan is unrolled and each iteration's
matmul gets that layer's slice of the QTensor (`QTensor.layer`). Everything else reads the dequantized leaf:
matmuls on a reshaped weight, with batch dimensions on the weight, inside `cond` / `while` or nested scans (XLA
drops a dequantization nothing reads).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jq import ops
from jq.interop.jaxpr_eval import evaluate
from jq.interop.usage import DotSite, Usage, trace_usage
from jq.numbers.lowrank import is_weight_leaf
from jq.tree.paths import path_str

__all__ = ["routable", "traced_routed", "can_trace", "apply_traced", "run_site"]


def routable(site: DotSite, weight: Any = None) -> bool:
    """Whether this weight-reading dot_general can run on the QTensor `weight`: the operand is the leaf up to
    transposes and converts, no batch dims on the weight, no control flow around it but one `scan` slicing the
    leaf's leading axis (then the QTensor must have per-layer slices, `QTensor.layer`)."""
    if site.direct is None or site.batch:
        return False
    if not site.where:
        return True
    return site.where == ("scan",) and site.use.stacked == (0,) and getattr(weight, "takes_layers", False)


def traced_routed(usage: Usage, weights: Mapping[str, Any]) -> set[str]:
    """The quantized leaves (`weights`: path → QTensor) every matmul of which is `routable` (at least one)."""
    sites: dict[str, list[bool]] = {}
    for site in usage.sites.values():
        if site.path in weights:
            sites.setdefault(site.path, []).append(routable(site, weights[site.path]))
    return {p for p, ok in sites.items() if all(ok)}


def can_trace(args: tuple, kwargs: dict) -> bool:
    """Whether the call's inputs can become jaxpr inputs: positional arrays only (no keyword arguments, whose
    values — flags, rngs — the trace would have to close over)."""
    return not kwargs and all(isinstance(x, (jax.Array, np.ndarray)) for x in jax.tree_util.tree_leaves(args))


def _route(site: DotSite, invals: list, weight: Any, index: tuple[int, ...] = ()) -> jax.Array:
    """The site's dot_general computed by `jq.ops.qdot_general(x, weight)` (under a scan: on layer `index[0]`'s
    slice), in the traced output's layout."""
    return run_site(site, invals, weight.layer(index[0]) if index else weight, sliced=bool(index))


def run_site(site: DotSite, invals: list, weight: Any, sliced: bool = False) -> jax.Array:
    """The site's dot_general on its operands `invals` with the weight operand replaced by the QTensor `weight` —
    the leaf itself, or (`sliced`) a scanned leaf's layer slice — through `jq.ops.qdot_general` (kernels, the
    QTensor's activation quantization and rotation), laid out as the traced output."""
    x, w = invals[1 - site.side], invals[site.side]
    (contract, _) = site.dims
    cw, cx = tuple(contract[site.side]), tuple(contract[1 - site.side])
    direct = tuple(a - 1 for a in site.direct) if sliced else site.direct  # the slice lost the layer axis
    y = ops.qdot_general(x, weight, ((cx, tuple(direct[d] for d in cw)), ((), ())),
                         preferred_element_type=site.preferred)
    # y: x's free dims in order, then the weight's free leaf axes ascending; the traced dot_general gives lhs free
    # dims then rhs free dims, each in operand order
    n_x = x.ndim - len(cx)
    leaf_free = [direct[d] for d in range(w.ndim) if d not in cw]
    rank = {a: i for i, a in enumerate(sorted(leaf_free))}
    w_pos = [n_x + rank[a] for a in leaf_free]
    perm = list(range(n_x)) + w_pos if site.side == 1 else w_pos + list(range(n_x))
    return jnp.transpose(y, perm).astype(site.preferred or jnp.result_type(x.dtype, w.dtype))


def apply_traced(module: Any, variables: dict, *args: Any, method: Any = None, usage: Usage | None = None) -> Any:
    """`module.apply(variables, *args)` with every routable matmul on a quantized leaf of `variables["params"]`
    run by `jq.ops` (see the module docstring). args: arrays (`can_trace`); `usage`: the model's trace on these
    variables and argument shapes, when the caller has it."""
    usage = usage or trace_usage(module, variables, *args, method=method)
    flat = jax.tree_util.tree_flatten_with_path(variables["params"], is_leaf=is_weight_leaf)[0]
    weights = {path_str(kp): x for kp, x in flat if is_weight_leaf(x)}
    leaves = [x.dequantize() if is_weight_leaf(x) else x for _, x in flat]

    def hook(site: DotSite, invals: list, index: tuple[int, ...]) -> jax.Array | None:
        weight = weights.get(site.path)
        return None if weight is None or not routable(site, weight) else _route(site, invals, weight, index)

    return evaluate(usage, leaves, args, hook)
