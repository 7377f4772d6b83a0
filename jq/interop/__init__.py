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

from jq.interop.layers import LayerCall, is_routable, layer_interceptor, module_path
from jq.interop.linen import apply, prepare, quantized_interceptor, routed_paths
from jq.interop.nnx import nnx_merge

__all__ = ["apply", "prepare", "nnx_merge", "routed_paths", "quantized_interceptor", "module_path", "is_routable",
           "LayerCall", "layer_interceptor"]
