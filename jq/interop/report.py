"""Which quantized leaves reach `jq.ops` when a linen model runs through `jq.apply`, and which are dequantized
before it runs — so that "0 of 90 weights routed" is said, not discovered.

`jq.apply` routes the QTensor kernels of intercepted standard layers (`nn.Dense`, `nn.DenseGeneral`, bias-free
`nn.Einsum`) to `jq.ops.qdot_general` / `qeinsum`, and a weight a user module applies with `jnp.einsum`, `@` or
`lax.dot_general` too when the matmul reads it directly (`jq.interop.traced_routing`); any other QTensor is
dequantized inside the traced function first (always correct, but no kernel reads its packed codes).
`routing_report` counts both, and, from the traced use (`jq.interop.usage`), says
which dequantized leaves a matmul reads and which none does; `jq.apply` warns once per model class when a
quantized tree reaches no routed matmul, and logs the dequantized paths at DEBUG on the "jq.interop" logger.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax

from jq.interop.linen import routed_paths
from jq.interop.traced_routing import can_trace, traced_routed
from jq.interop.usage import trace_usage
from jq.numbers.qtensor import is_qtensor
from jq.tree.paths import path_str

__all__ = ["RoutingReport", "routing_report"]


@dataclasses.dataclass(frozen=True)
class RoutingReport:
    """Where the QTensor leaves of a params tree go when the model runs through `jq.apply`.

    Attributes:
      routed: QTensor paths whose matmul runs through `jq.ops` (kernels plug in there).
      dequantized: QTensor paths dequantized before the model runs.
      matmul: of `dequantized`, those the traced model reads with a matmul (user-code einsum / dot_general).
      no_matmul: of `dequantized`, those no matmul reads (gathered, elementwise, or unused).
    """

    routed: tuple[str, ...]
    dequantized: tuple[str, ...]
    matmul: tuple[str, ...]
    no_matmul: tuple[str, ...]

    @property
    def counts(self) -> dict[str, int]:
        """{'quantized', 'routed', 'dequantized', 'matmul', 'no_matmul'}: the numbers of leaves."""
        return {"quantized": len(self.routed) + len(self.dequantized), "routed": len(self.routed),
                "dequantized": len(self.dequantized), "matmul": len(self.matmul), "no_matmul": len(self.no_matmul)}

    def __str__(self) -> str:
        c = self.counts
        s = (f"{c['routed']} of {c['quantized']} quantized leaves routed to jq.ops; {c['dequantized']} dequantized "
             f"before the model runs ({c['matmul']} read by matmuls outside nn.Dense / nn.DenseGeneral / nn.Einsum, "
             f"{c['no_matmul']} by no matmul)")
        if self.matmul:
            s += ": " + ", ".join(self.matmul[:6]) + (" ..." if len(self.matmul) > 6 else "")
        return s


def routing_report(module: Any, variables: dict, *args: Any, method: Any = None, **kwargs: Any) -> RoutingReport:
    """Trace `module` once on `variables` (whose params hold QTensors) and `args`, and report which QTensors
    `jq.apply` routes to `jq.ops` and which it dequantizes (see `RoutingReport`)."""
    flat = jax.tree_util.tree_flatten_with_path(variables["params"], is_leaf=is_qtensor)[0]
    quantized = sorted(path_str(kp) for kp, x in flat if is_qtensor(x))
    routed = routed_paths(module, variables, *args, method=method, **kwargs)
    usage = trace_usage(module, variables, *args, method=method, **kwargs)
    if set(quantized) - routed and can_trace(args, kwargs):  # jq.apply then routes direct matmuls too
        routed |= traced_routed(usage, {path_str(kp): x for kp, x in flat if is_qtensor(x)})
    deq = [p for p in quantized if p not in routed]
    mm = tuple(p for p in deq if p in usage and usage[p].matmuls)
    return RoutingReport(tuple(p for p in quantized if p in routed), tuple(deq), mm,
                         tuple(p for p in deq if p not in mm))
