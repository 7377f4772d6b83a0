"""Run unmodified Flax models (linen and NNX) on quantized parameter trees.

Mechanism (see README, "Running a model on quantized params"):

- Linen: `jq.interop.apply(module, variables, *args)` intercepts the standard layers (`nn.Dense`, `nn.DenseGeneral`,
  bias-free `nn.Einsum`) with `nn.intercept_methods`: when a layer's kernel is a QTensor, the layer's own maths
  runs with `jq.ops.qdot_general` / `jq.ops.qeinsum`, so the packed weight reaches the matmul (and a kernel,
  when one is registered). A QTensor that user code reads with `@` / `jnp.einsum` / `lax.dot_general` reaches
  `jq.ops` too when the matmul reads it directly: `apply` then runs the traced jaxpr (`traced_routing`); anything
  else is dequantized inside the traced function, which is always correct. Which kernels are routed is found by
  one abstract trace (`jax.eval_shape`) of the model, so nothing about the model needs declaring.
- NNX: `jq.interop.nnx_merge(graphdef, qstate)` builds the module; every `nnx.Linear` whose kernel is a QTensor gets
  jq's `dot_general` / `promote_dtype` hooks (constructor arguments NNX itself offers), other QTensors are
  dequantized.

Both run inside `jax.jit`; QTensors are pytrees, so the quantized tree is an ordinary jit argument.

Any model, any matmul: `trace_usage(module, variables, *args)` traces the forward once and says how each weight is
used (the axes its `dot_general`s contract, gathered rows for embeddings), which `jq.quantize_params(...,
usage=...)` quantizes along; `routing_report(...)` counts the QTensors routed to `jq.ops` and those dequantized.
"""

from jq.interop.layers import LayerCall, is_routable, layer_interceptor, module_path
from jq.interop.linen import apply, prepare, quantized_interceptor, routed_paths
from jq.interop.nnx import nnx_merge
from jq.interop.report import RoutingReport, routing_report
from jq.interop.usage import Usage, trace_nnx_usage, trace_usage

__all__ = ["apply", "prepare", "nnx_merge", "routed_paths", "quantized_interceptor", "module_path", "is_routable",
           "LayerCall", "layer_interceptor", "trace_usage", "trace_nnx_usage", "Usage", "routing_report", "RoutingReport"]
