"""The parameter tree of `jq.models.llama.model.Llama`: its paths and shapes, and building / checking it from loaders."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from jq.models.llama.config import LlamaConfig


def expected_shapes(cfg: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """Every parameter path ("layers_0/attn/q_proj/kernel", ...) of `Llama(cfg)` with its shape."""
    q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    shapes = {"embed/embedding": (cfg.vocab_size, cfg.dim), "final_norm/scale": (cfg.dim,)}
    if not cfg.tie_embeddings:
        shapes["lm_head/kernel"] = (cfg.dim, cfg.vocab_size)
    for i in range(cfg.n_layers):
        p = f"layers_{i}/"
        shapes |= {
            p + "input_norm/scale": (cfg.dim,), p + "post_attn_norm/scale": (cfg.dim,),
            p + "attn/q_proj/kernel": (cfg.dim, q), p + "attn/k_proj/kernel": (cfg.dim, kv),
            p + "attn/v_proj/kernel": (cfg.dim, kv), p + "attn/o_proj/kernel": (q, cfg.dim),
            p + "mlp/gate_proj/kernel": (cfg.dim, cfg.hidden_dim), p + "mlp/up_proj/kernel": (cfg.dim, cfg.hidden_dim),
            p + "mlp/down_proj/kernel": (cfg.hidden_dim, cfg.dim),
        }
    return shapes


@dataclasses.dataclass(frozen=True)
class LazyParam:
    """One parameter of a model file, not yet read: `load()` reads and converts it (fp32, Flax layout).

    `shape` is the shape `load()` returns (kernels already transposed to (in, out)), known from the file header.
    Streaming conversion (`jq.apps.convert`) reads one at a time, so peak memory is one tensor, not the model.
    """

    path: str
    shape: tuple[int, ...]
    load: Callable[[], np.ndarray]
    dtype: str = "float32"


def set_path(tree: dict[str, Any], path: str, value: np.ndarray) -> None:
    """tree["a"]["b"]["c"] = value for path "a/b/c", creating the intermediate dicts."""
    *heads, leaf = path.split("/")
    for h in heads:
        tree = tree.setdefault(h, {})
    tree[leaf] = value


def check_shapes(shapes: dict[str, tuple[int, ...]], cfg: LlamaConfig, source: str | Path) -> None:
    """Raise ValueError naming `source` if a parameter is missing from `shapes` ({path: shape}) or has the wrong
    shape for `cfg`."""
    for path, shape in expected_shapes(cfg).items():
        if path not in shapes:
            raise ValueError(f"{source}: missing weight for parameter {path}")
        if tuple(shapes[path]) != shape:
            raise ValueError(f"{source}: parameter {path} has shape {tuple(shapes[path])}, expected {shape}")

