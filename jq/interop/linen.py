"""Unmodified linen models on quantized trees: `apply` runs `model.apply` with the layer interceptor routing every
routable layer whose kernel is a QTensor (or a `LowRank`: base + adapter) through `jq.ops` (where kernels plug in).
When a quantized weight is read outside such a layer — a custom `self.param` used with `@`, `jnp.einsum` or
`lax.dot_general` — `apply` runs the model's traced jaxpr instead and sends every matmul that reads a quantized leaf
directly to `jq.ops` as well (`jq.interop.traced_routing`); what cannot go there (a reshaped or sliced weight, a
matmul inside `scan`, keyword arguments or mutable collections in the call) reads the dequantized leaf, which is
always correct. A layer under `nn.scan` is not intercepted with its QTensor (whose layout is the stacked one):
the traced jaxpr runs each layer's matmul on its slice. Which layers are routed is found by abstract traces, so
nothing about the model needs declaring."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from jq import ops
from jq.interop.layers import LayerCall, dense_like, layer_interceptor
from jq.interop.traced_routing import apply_traced, can_trace, traced_routed
from jq.interop.usage import trace_usage
from jq.numbers.lowrank import is_weight_leaf
from jq.tree.paths import path_str

log = logging.getLogger("jq.interop")

__all__ = ["apply", "prepare", "routed_paths", "quantized_interceptor", "dense_like", "dequantize_except"]


def _dense_general(m: nn.Module, x, kernel, axis: tuple[int, ...], n_feature_dims: int) -> jax.Array:
    bias = m.get_variable("params", "bias") if m.use_bias else None
    dtype = m.dtype or jnp.result_type(x, jnp.dtype(kernel.dtype), *(() if bias is None else (bias,)))
    x = jnp.asarray(x, dtype)
    axis = tuple(sorted(a % x.ndim for a in axis))  # as Flax's DenseGeneral: the kernel follows sorted axes
    y = ops.qdot_general(x, kernel, ((axis, tuple(range(len(axis)))), ((), ())), precision=m.precision)
    y = y.astype(dtype)
    if bias is not None:
        y = y + jnp.reshape(jnp.asarray(bias, dtype), (1,) * (y.ndim - n_feature_dims) + tuple(bias.shape))
    return y


def _run_quantized(c: LayerCall) -> jax.Array:
    """The layer's maths with its QTensor kernel going to `jq.ops`."""
    m, kernel, x = c.module, c.kernel, c.x
    if isinstance(m, nn.Dense):
        return _dense_general(m, x, kernel, (-1,), 1)
    if isinstance(m, nn.DenseGeneral):
        axis = m.axis if isinstance(m.axis, tuple) else (m.axis,)
        feats = m.features if isinstance(m.features, tuple) else (m.features,)
        return _dense_general(m, x, kernel, axis, len(feats))
    eq = (c.args[1] if len(c.args) > 1 else c.kwargs.get("einsum_str")) or m.einsum_str
    dtype = m.dtype or jnp.result_type(x, jnp.dtype(kernel.dtype))
    return ops.qeinsum(eq, jnp.asarray(x, dtype), kernel, precision=m.precision).astype(dtype)


quantized_interceptor = layer_interceptor(lambda c: _run_quantized(c) if is_weight_leaf(c.kernel) else c.proceed())
quantized_interceptor.__doc__ = "Runs routable layers whose kernel is a QTensor through `jq.ops`; the rest as usual."


def routed_paths(module: nn.Module, variables: dict, *args, method: Any = None, **kwargs) -> set[str]:
    """Kernel paths (relative to `params`) that belong to layers jq routes to `jq.ops`, found by one abstract
    trace of the model on dequantized parameters. A layer under `nn.scan` (its kernel a slice of the stored
    stacked leaf, which a QTensor's static layout cannot follow) is not among them (`apply` routes it through the
    traced jaxpr, layer by layer)."""
    found: set[str] = set()
    shapes = {path_str(kp): tuple(x.shape) for kp, x in
              jax.tree_util.tree_flatten_with_path(variables.get("params", {}), is_leaf=is_weight_leaf)[0]}

    def record(c: LayerCall):
        if tuple(jnp.shape(c.kernel)) == shapes.get(c.path):
            found.add(c.path)
        return c.proceed()

    def run(v):
        with nn.intercept_methods(layer_interceptor(record)):
            return module.apply(v, *args, method=method, **kwargs)

    jax.eval_shape(run, dense_like(variables))
    return found


def prepare(module: nn.Module, variables: dict, *args, method: Any = None, **kwargs) -> dict:
    """The variables `apply` runs `module.apply` on (when it does not run the traced jaxpr): QTensors of routed
    layers kept, every other QTensor dequantized."""
    if not _quantized_leaves(variables.get("params", {})):
        return variables
    return _keep_routed(module, variables, routed_paths(module, variables, *args, method=method, **kwargs))


def _quantized_leaves(params: Any) -> dict[str, Any]:
    """{path: leaf} of the QTensor (and LowRank) leaves."""
    flat = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_weight_leaf)[0]
    return {path_str(kp): x for kp, x in flat if is_weight_leaf(x)}


def _keep_routed(module: nn.Module, variables: dict, routed: set[str]) -> dict:
    """`variables` with every QTensor outside `routed` dequantized (said by `_say_routing`)."""
    params = variables["params"]
    _say_routing(module, params, routed)
    return {**variables, "params": dequantize_except(params, routed)}


def _say_routing(module: nn.Module, params: Any, routed: set[str]) -> None:
    """Log the dequantized QTensor paths (DEBUG, "jq.interop"); warn when none is routed (once per model class and
    count under Python's default warning filter, which shows a message once per place)."""
    flat = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_weight_leaf)[0]
    deq = [path_str(kp) for kp, x in flat if is_weight_leaf(x) and path_str(kp) not in routed]
    if deq:
        log.debug("jq.apply: %d QTensor leaves dequantized before the model runs (not in a routed layer): %s",
                  len(deq), ", ".join(deq))
    name = type(module).__qualname__
    n_routed = sum(1 for kp, x in flat if is_weight_leaf(x) and path_str(kp) in routed)
    if deq and not n_routed:
        warnings.warn(
            f"jq.apply: none of the {len(deq)} quantized leaves of {name} reaches jq.ops (neither the kernel of a "
            "layer jq routes — nn.Dense, nn.DenseGeneral, bias-free nn.Einsum — nor read directly by a matmul of a "
            "call with array arguments only), so all are dequantized before their matmuls: the results are correct "
            "but no kernel reads packed weights. jq.interop.routing_report(model, variables, *args) lists them and "
            "the matmuls that read them", stacklevel=3)


def apply(module: nn.Module, variables: dict, *args, method: Any = None, mutable: Any = False,
          interceptor: Callable[..., Any] | None = None, **kwargs) -> Any:
    """`module.apply(variables, *args, ...)` where `variables["params"]` may hold QTensors: standard layers run
    them through `jq.ops`; when a QTensor is read elsewhere and the call has array positional arguments only (no
    kwargs, `mutable`, `interceptor`), the traced jaxpr runs instead with its direct matmuls routed too
    (`jq.interop.traced_routing`); any other QTensor is dequantized first.

    Args:
      module: an unmodified linen module.
      variables: `{"params": qparams, ...}` as returned by `jq.quantize_params` (on the params collection).
      *args, method, mutable, **kwargs: as for `module.apply`.
      interceptor: an extra `nn.intercept_methods` interceptor that sees every method call first (calibration
        uses one to record layer inputs, QAT to fake-quantize them); it must call `next_fun` to run the call.
    Returns: what `module.apply` returns.
    """
    quantized = _quantized_leaves(variables.get("params", {}))
    if quantized:
        routed = routed_paths(module, variables, *args, method=method, **kwargs)
        if quantized.keys() - routed and mutable is False and interceptor is None and can_trace(args, kwargs):
            # a weight is read outside a standard layer: run the traced jaxpr, every direct matmul through jq.ops
            usage = trace_usage(module, variables, *args, method=method)
            _say_routing(module, variables["params"], routed | traced_routed(usage, quantized))
            return apply_traced(module, variables, *args, method=method, usage=usage)
        variables = _keep_routed(module, variables, routed)
    with nn.intercept_methods(quantized_interceptor):
        if interceptor is None:
            return module.apply(variables, *args, method=method, mutable=mutable, **kwargs)
        with nn.intercept_methods(interceptor):
            return module.apply(variables, *args, method=method, mutable=mutable, **kwargs)


def dequantize_except(tree: Any, keep: set[str]) -> Any:
    """Dequantize every QTensor whose path is not in `keep` (the kernels routed to jq.ops)."""
    return jax.tree_util.tree_map_with_path(
        lambda kp, x: x.dequantize() if is_weight_leaf(x) and path_str(kp) not in keep else x, tree,
        is_leaf=is_weight_leaf
    )
