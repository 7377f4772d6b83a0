"""PEQA (Kim et al. 2023): fine-tune only the quantization scales of a frozen integer model. The codes (and zero
points) never change; each scale group's step s is a float32 parameter, used in the forward rounded to the stored
scale dtype (straight through), so the trained model is exactly the QTensor tree `apply_scales` writes.

    scales = peqa.init(qparams)                         # {path: float32 scale}, the trainable tree
    loss(scales, batch, qparams) = ... peqa.combine(qparams, scales) ...
    tuned = peqa.apply_scales(qparams, scales)          # integer QTensors, new scales in their stored dtype
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import jax
import jax.numpy as jnp

from jq.numbers.lowrank import is_weight_leaf
from jq.numbers.qtensor import QTensor
from jq.tree.paths import leaf_paths, path_str, set_path

__all__ = ["init", "combine", "apply_scales"]


def init(qparams: Any, pattern: str = r".*kernel", exclude: str = r".*(embed|lm_head).*") -> dict:
    """{path…: float32 scale} of every QTensor whose path fully matches `pattern` and not `exclude` (nested like
    `qparams`): the trainable parameters of PEQA."""
    inc, exc = re.compile(pattern), re.compile(exclude)
    out: dict = {}
    for path, q in leaf_paths(qparams):
        if isinstance(q, QTensor) and inc.fullmatch(path) and not exc.fullmatch(path):
            if q.format.kind == "lut":
                raise ValueError(f"{path}: PEQA tunes int / float grid scales; {q.describe()} is a learned codebook "
                                 "(exclude it, or quantize with an int format)")
            set_path(out, path, jnp.asarray(q.scale, jnp.float32))
    if not out:
        raise ValueError(f"PEQA: no QTensor matches pattern {pattern!r} (exclude {exclude!r}); quantize first")
    return out


def _swap(qparams: Any, scales: dict, make) -> Any:
    flat = dict(leaf_paths(scales))
    seen = set()

    def put(kp, q):
        path = path_str(kp)
        if path not in flat:
            return q
        if not isinstance(q, QTensor) or tuple(flat[path].shape) != tuple(q.scale.shape):
            raise ValueError(f"{path}: trained scales of shape {tuple(flat[path].shape)} do not fit the leaf "
                             f"{q!r}; were they trained for another quantization?")
        seen.add(path)
        return dataclasses.replace(q, scale=make(flat[path], q.scale.dtype))

    out = jax.tree_util.tree_map_with_path(put, qparams, is_leaf=is_weight_leaf)
    if set(flat) - seen:
        raise ValueError(f"{sorted(set(flat) - seen)[0]}: trained scales for a path the model does not have")
    return out


def combine(qparams: Any, scales: dict) -> Any:
    """`qparams` with the trained scales in place (float32, rounded to each leaf's stored scale dtype in the forward
    with a straight-through gradient): the tree the model runs on while training."""
    def ste(s, dtype):
        return s + jax.lax.stop_gradient(s.astype(dtype).astype(jnp.float32) - s)

    return _swap(qparams, scales, ste)


def apply_scales(qparams: Any, scales: dict) -> Any:
    """The fine-tuned integer model: `qparams` with the trained scales cast to each leaf's stored scale dtype."""
    return _swap(qparams, scales, lambda s, dtype: jnp.asarray(s).astype(dtype))
