"""Type aliases of the public API (no imports of jq: any layer may use them)."""

from __future__ import annotations

from typing import Any

__all__ = ["Params", "PathStr"]

Params = Any
"""A parameter pytree: nested dicts (linen `variables["params"]`), an NNX `State`, or any pytree of arrays and
`QTensor`s, whose leaf paths are "/"-joined keys (`layers_0/attn/q_proj/kernel`)."""

PathStr = str
"""A leaf path: the pytree keys joined by "/"; what recipe rules match."""
