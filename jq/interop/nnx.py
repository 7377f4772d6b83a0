"""Unmodified NNX models on quantized states: `nnx_merge` gives every `nnx.Linear` whose kernel is a QTensor jq's
`dot_general` / `promote_dtype` (hooks NNX offers as constructor arguments) and dequantizes any other QTensor; an
optional `input_hook(path, x, axes)` sees every Linear's input first (QAT fake-quantizes activations with it).
Linears stacked by `nnx.vmap` for `nnx.scan` read their kernels dequantized."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jq import ops
from jq.interop.linen import dense_like, dequantize_except
from jq.numbers.lowrank import is_weight_leaf

__all__ = ["nnx_merge"]


def _nnx_promote(arrays, dtype=None, **kwargs):
    """NNX's promote_dtype, leaving a QTensor kernel as it is (the matmul decides its compute dtype)."""
    dense = [a for a in arrays if a is not None and not is_weight_leaf(a)]
    dtype = dtype or jnp.result_type(*dense)
    return tuple(a if a is None or is_weight_leaf(a) else jnp.asarray(a, dtype) for a in arrays)


InputHook = Callable[[str, jax.Array, tuple[int, ...]], jax.Array]


def _dot_general(path: str, quantized: bool, input_hook: InputHook | None):
    def dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None, out_sharding=None):
        if input_hook is not None:
            lhs = input_hook(path, lhs, tuple(dimension_numbers[0][0]))
        if quantized:
            return ops.qdot_general(lhs, rhs, dimension_numbers, precision, preferred_element_type)
        return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision, preferred_element_type)

    return dot_general


def nnx_merge(graphdef: Any, state: Any, *states: Any,
              input_hook: InputHook | None = None) -> nnx.Module:
    """`nnx.merge(graphdef, state)` for a state holding QTensors; call it inside `jax.jit`.

    `nnx.Linear` layers with QTensor kernels run through `jq.ops`; any other QTensor is dequantized. With
    `input_hook`, every `nnx.Linear` computes on `input_hook(kernel_path, x, contracted_axes)` instead of x.
    """
    linear_paths = set()
    model_abstract = nnx.eval_shape(lambda: nnx.merge(graphdef, dense_like(state), *states))
    for path, node in nnx.iter_graph(model_abstract):
        # a Linear stacked by nnx.vmap (run under nnx.scan, which slices the QTensor's arrays but not its static
        # layout) reads its kernel dequantized
        if type(node) is nnx.Linear and tuple(node.kernel.shape) == (node.in_features, node.out_features):
            linear_paths.add("/".join(str(p) for p in path) + "/kernel")

    state = dequantize_except(state, linear_paths)
    model = nnx.merge(graphdef, state, *states)
    for path, node in nnx.iter_graph(model):
        if type(node) is not nnx.Linear:
            continue
        quantized = is_weight_leaf(node.kernel[...])
        if quantized or input_hook is not None:
            node.dot_general = _dot_general("/".join(str(p) for p in path) + "/kernel", quantized, input_hook)
        if quantized:
            node.promote_dtype = _nnx_promote
    return model
