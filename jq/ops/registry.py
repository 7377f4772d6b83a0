"""The kernel registry: matmul implementations `jq.ops.qdot_general` asks, in order, before its XLA fallback.

A kernel package registers itself here when it is imported (`jq.pallas_kernels` does); a user registers their own
with `register_kernel`, which puts it first. This module knows only QTensor-free callables: it imports nothing of jq.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax

__all__ = ["Kernel", "KERNELS", "register_kernel"]


@dataclasses.dataclass(frozen=True)
class Kernel:
    """A matmul implementation: `supports(lhs, rhs, dimension_numbers)` returns None if it can run the call,
    else a short reason; `fn(lhs, rhs, dimension_numbers, preferred_element_type)` computes it."""

    name: str
    supports: Callable[..., str | None]
    fn: Callable[..., jax.Array]


KERNELS: list[Kernel] = []


def register_kernel(name: str, supports: Callable[..., str | None], fn: Callable[..., jax.Array]) -> None:
    """Add a kernel to the dispatch list (later registrations are asked first)."""
    KERNELS.insert(0, Kernel(name, supports, fn))
