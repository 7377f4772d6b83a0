"""Where adapters can act: a traced check that every adapted leaf is the weight of a matmul contracting its leading
axes, so x·a·b is the adapter of that matmul (not of an embedding lookup or an elementwise product)."""

from __future__ import annotations

from typing import Any

from jq.adapters.lora import _factor_paths
from jq.interop.usage import trace_usage

__all__ = ["check_routes"]


def check_routes(module: Any, variables: dict, adapters: dict, *args: Any, **kwargs: Any) -> None:
    """Trace `module.apply(variables, *args, **kwargs)` once (abstractly) and refuse, naming the leaf, adapters on a
    leaf that no matmul reads or whose matmuls contract other axes than the adapter's a [*K, r] covers."""
    usage = trace_usage(module, variables, *args, **kwargs)
    for path, f in _factor_paths(adapters):
        use = usage.get(path)
        if use is None or not use.matmuls:
            how = "is not a parameter of the model" if use is None else f"is used as: {use.describe()}"
            raise ValueError(f"{path}: an adapter needs a matmul to sit beside, but this leaf {how}; leave it out "
                             "(LoraConfig.pattern / exclude)")
        n_in = f["a"].ndim - 1
        if use.contraction_axes != tuple(range(n_in)):
            raise ValueError(f"{path}: the model contracts axes {use.contraction_axes} of this leaf, the adapter "
                             f"covers its first {n_in}; leave it out (LoraConfig.exclude)")
