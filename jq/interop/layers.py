"""The one interceptor of standard linen layers: every call of a `nn.Dense`, `nn.DenseGeneral` (without batch
dims) or bias-free `nn.Einsum` that has a kernel reaches a hook as a `LayerCall` — its kernel path, input and
contracted axes — and the hook decides what runs. Running quantized kernels (`jq.interop.linen`), recording
calibration inputs (`jq.calibration`), fake-quantizing activations (`jq.qat`) and capturing a layer's input
(`jq.models.llama.blocks`) are hooks of this one mechanism."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from jq.numbers.lowrank import is_weight_leaf

__all__ = ["LayerCall", "layer_interceptor", "is_routable", "module_path", "dense_like"]

_ROUTABLE = (nn.Dense, nn.DenseGeneral, nn.Einsum)


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


@dataclasses.dataclass
class LayerCall:
    """One call of a routable layer, as a hook sees it.

    Attributes:
      module: the bound layer; path: its kernel's path relative to `params` ("layers_0/attn/q_proj/kernel");
      x: the input (the first argument); args / kwargs: the call's arguments.
    """

    module: nn.Module
    path: str
    x: Any
    args: tuple
    kwargs: dict
    _next: Callable[..., Any]

    @property
    def kernel(self) -> Any:
        """The layer's kernel as stored (an array or a QTensor)."""
        return self.module.get_variable("params", "kernel")

    @property
    def is_einsum(self) -> bool:
        """Whether the layer is an `nn.Einsum` (its contracted axes follow its equation)."""
        return isinstance(self.module, nn.Einsum)

    @property
    def axes(self) -> tuple[int, ...]:
        """The input axes the layer contracts (sorted, non-negative): the last for Dense, `axis` for DenseGeneral
        (an Einsum's follow its equation and are not given)."""
        m, nd = self.module, jax.numpy.ndim(self.x)
        if isinstance(m, nn.DenseGeneral):
            axis = m.axis if isinstance(m.axis, tuple) else (m.axis,)
            return tuple(sorted(a % nd for a in axis))
        return (nd - 1,)

    def proceed(self, x: Any = None) -> Any:
        """Run the layer as it would have run (its own maths), on `x` instead of the original input if given."""
        if x is None:
            return self._next(*self.args, **self.kwargs)
        args, kwargs = list(self.args), dict(self.kwargs)
        if args:
            args[0] = x
        else:
            kwargs["inputs"] = x
        return self._next(*args, **kwargs)


def layer_interceptor(hook: Callable[[LayerCall], Any]) -> Callable[..., Any]:
    """An `nn.intercept_methods` interceptor handing every call of a routable layer that has a kernel to
    `hook(call) -> output`; the hook runs the layer with `call.proceed(...)` or computes the output itself."""

    def intercept(next_fun, args, kwargs, context):
        m = context.module
        if context.method_name != "__call__" or not is_routable(m) or not m.has_variable("params", "kernel"):
            return next_fun(*args, **kwargs)
        x = args[0] if args else kwargs["inputs"]
        return hook(LayerCall(m, module_path(m) + "/kernel", x, tuple(args), dict(kwargs), next_fun))

    return intercept


def dense_like(tree: Any) -> Any:
    """QTensors replaced by the ShapeDtypeStruct of their dequantized array (for abstract traces)."""
    return jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, jnp.dtype(x.dtype)) if is_weight_leaf(x) else x, tree,
        is_leaf=is_weight_leaf
    )
