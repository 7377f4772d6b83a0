"""Run unmodified Flax models (linen and NNX) on quantized parameter trees.

Mechanism (see README, "Running a model on quantized params"):

- Linen: `jq.interop.apply(module, variables, *args)` intercepts the standard layers (`nn.Dense`, `nn.DenseGeneral`,
  bias-free `nn.Einsum`) with `nn.intercept_methods`: when a layer's kernel is a QTensor, the layer's own maths
  runs with `jq.ops.qdot_general` / `jq.ops.qeinsum`, so the packed weight reaches the matmul (and a kernel,
  when one is registered). QTensors anywhere else — a custom `self.param` in user code — are dequantized inside
  the traced function before `apply`, which is always correct. Which kernels are routed is found by one abstract
  trace (`jax.eval_shape`) of the model, so nothing about the model needs declaring.
- NNX: `jq.interop.nnx_merge(graphdef, qstate)` builds the module; every `nnx.Linear` whose kernel is a QTensor gets
  jq's `dot_general` / `promote_dtype` hooks (constructor arguments NNX itself offers), other QTensors are
  dequantized.

Both run inside `jax.jit`; QTensors are pytrees, so the quantized tree is an ordinary jit argument.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax import nnx

from jq import ops
from jq.tree.paths import path_str
from jq.numbers.qtensor import QTensor

__all__ = ["apply", "prepare", "nnx_merge", "routed_paths", "quantized_interceptor", "module_path", "is_routable"]

_ROUTABLE = (nn.Dense, nn.DenseGeneral, nn.Einsum)


def _is_q(x) -> bool:
    return isinstance(x, QTensor)


def module_path(m: nn.Module) -> str:
    """The '/'-joined scope path of a bound linen module (relative to the params root)."""
    return "/".join(str(p) for p in m.scope.path)


def is_routable(m: nn.Module) -> bool:
    """A standard layer jq can run on a QTensor kernel (Dense, DenseGeneral without batch dims, Einsum w/o bias)."""
    if not isinstance(m, _ROUTABLE):
        return False
    if isinstance(m, nn.Einsum):
        return not m.use_bias
    if isinstance(m, nn.DenseGeneral):
        return not m.batch_dims
    return isinstance(m, nn.Dense)


# -- linen ----------------------------------------------------------------------------------------------------


def _dense_general(m, x, kernel, axis, n_feature_dims):
    bias = m.get_variable("params", "bias") if m.use_bias else None
    dtype = m.dtype or jnp.result_type(x, jnp.dtype(kernel.dtype), *(() if bias is None else (bias,)))
    x = jnp.asarray(x, dtype)
    axis = tuple(sorted(a % x.ndim for a in axis))  # as Flax's DenseGeneral: the kernel follows sorted axes
    y = ops.qdot_general(x, kernel, ((axis, tuple(range(len(axis)))), ((), ())), precision=m.precision)
    y = y.astype(dtype)
    if bias is not None:
        y = y + jnp.reshape(jnp.asarray(bias, dtype), (1,) * (y.ndim - n_feature_dims) + tuple(bias.shape))
    return y


def _run_quantized(m: nn.Module, args, kwargs):
    kernel = m.get_variable("params", "kernel")
    x = args[0] if args else kwargs["inputs"]
    if isinstance(m, nn.Dense):
        return _dense_general(m, x, kernel, (-1,), 1)
    if isinstance(m, nn.DenseGeneral):
        axis = m.axis if isinstance(m.axis, tuple) else (m.axis,)
        feats = m.features if isinstance(m.features, tuple) else (m.features,)
        return _dense_general(m, x, kernel, axis, len(feats))
    eq = (args[1] if len(args) > 1 else kwargs.get("einsum_str")) or m.einsum_str
    dtype = m.dtype or jnp.result_type(x, jnp.dtype(kernel.dtype))
    return ops.qeinsum(eq, jnp.asarray(x, dtype), kernel, precision=m.precision).astype(dtype)


def quantized_interceptor(next_fun, args, kwargs, context):
    """Runs routable layers whose kernel is a QTensor through `jq.ops`; everything else as usual."""
    m = context.module
    if context.method_name == "__call__" and isinstance(m, _ROUTABLE) and is_routable(m):
        if m.has_variable("params", "kernel") and _is_q(m.get_variable("params", "kernel")):
            return _run_quantized(m, args, kwargs)
    return next_fun(*args, **kwargs)


def routed_paths(module: nn.Module, variables, *args, method=None, **kwargs) -> set[str]:
    """Kernel paths (relative to `params`) that belong to layers jq routes to `jq.ops`, found by one abstract
    trace of the model on dequantized parameters."""
    found: set[str] = set()

    def recorder(next_fun, a, kw, context):
        m = context.module
        if context.method_name == "__call__" and isinstance(m, _ROUTABLE) and is_routable(m):
            found.add(module_path(m) + "/kernel")
        return next_fun(*a, **kw)

    dense_vars = _dense_like(variables)

    def run(v):
        with nn.intercept_methods(recorder):
            return module.apply(v, *args, method=method, **kwargs)

    jax.eval_shape(run, dense_vars)
    return found


def prepare(module: nn.Module, variables, *args, method=None, **kwargs):
    """The variables `apply` runs on: QTensors of routed layers kept, every other QTensor dequantized."""
    params = variables.get("params", {})
    if not any(_is_q(x) for x in jax.tree_util.tree_leaves(params, is_leaf=_is_q)):
        return variables
    routed = routed_paths(module, variables, *args, method=method, **kwargs)
    return {**variables, "params": _dequantize_except(params, routed)}


def apply(module: nn.Module, variables, *args, method=None, mutable=False, interceptor=None, **kwargs):
    """`module.apply(variables, *args, ...)` where `variables["params"]` may hold QTensors.

    Args:
      module: an unmodified linen module.
      variables: `{"params": qparams, ...}` as returned by `jq.quantize_params` (on the params collection).
      *args, method, mutable, **kwargs: as for `module.apply`.
      interceptor: an extra `nn.intercept_methods` interceptor that sees every method call first (calibration
        uses it to record layer inputs); it must call `next_fun` to run the call.
    Returns: what `module.apply` returns.
    """
    variables = prepare(module, variables, *args, method=method, **kwargs)
    with nn.intercept_methods(quantized_interceptor):
        if interceptor is None:
            return module.apply(variables, *args, method=method, mutable=mutable, **kwargs)
        with nn.intercept_methods(interceptor):
            return module.apply(variables, *args, method=method, mutable=mutable, **kwargs)


# -- NNX ------------------------------------------------------------------------------------------------------


def _nnx_dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None, out_sharding=None):
    return ops.qdot_general(lhs, rhs, dimension_numbers, precision, preferred_element_type)


def _nnx_promote(arrays, dtype=None, **kwargs):
    """NNX's promote_dtype, leaving a QTensor kernel as it is (the matmul decides its compute dtype)."""
    dense = [a for a in arrays if a is not None and not _is_q(a)]
    dtype = dtype or jnp.result_type(*dense)
    return tuple(a if a is None or _is_q(a) else jnp.asarray(a, dtype) for a in arrays)


def nnx_merge(graphdef, state, *states) -> nnx.Module:
    """`nnx.merge(graphdef, state)` for a state holding QTensors; call it inside `jax.jit`.

    `nnx.Linear` layers with QTensor kernels run through `jq.ops`; any other QTensor is dequantized.
    """
    linear_paths = set()
    model_abstract = nnx.eval_shape(lambda: nnx.merge(graphdef, _dense_like(state), *states))
    for path, node in nnx.iter_graph(model_abstract):
        if type(node) is nnx.Linear:
            linear_paths.add("/".join(str(p) for p in path) + "/kernel")

    state = _dequantize_except(state, linear_paths)
    model = nnx.merge(graphdef, state, *states)
    for path, node in nnx.iter_graph(model):
        if type(node) is nnx.Linear and _is_q(node.kernel[...]):
            node.dot_general = _nnx_dot_general
            node.promote_dtype = _nnx_promote
    return model


def _dense_like(tree):
    """QTensors replaced by the ShapeDtypeStruct of their dequantized array (for abstract traces)."""
    return jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, jnp.dtype(x.dtype)) if _is_q(x) else x, tree, is_leaf=_is_q
    )


def _dequantize_except(tree, keep: set[str]):
    """Dequantize every QTensor whose path is not in `keep` (the kernels routed to jq.ops)."""
    return jax.tree_util.tree_map_with_path(
        lambda kp, x: x.dequantize() if _is_q(x) and path_str(kp) not in keep else x, tree, is_leaf=_is_q
    )
