"""QA-LoRA (Xu et al. 2023): adapters pooled over the base's quantization groups, which merge into its zero points.

With `LoraConfig(pooled=True)` the adapter's a is [K / G, r] and each row stands for one group of G input rows, so
(α/r)·Â b is constant within every group g and output channel n: a shift c[g, n] of that group's values. A group
dequantizes as (q − z)·s; adding c is the same as the zero point z' = z − c / s. `merge` writes exactly that:
the merged leaf is an integer QTensor (the same codes and scales, float32 zero points), with no float adapter
at inference and the unmerged model's outputs (up to float32 rounding of z').
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from jq.adapters.lora import LoraConfig, combine
from jq.numbers.lowrank import LowRank, is_lowrank, is_weight_leaf
from jq.numbers.qtensor import QTensor
from jq.tree.paths import path_str

__all__ = ["merge", "merge_leaf"]


def merge_leaf(path: str, leaf: LowRank) -> QTensor:
    """The integer QTensor equal to a pooled `LowRank` leaf: codes and scales kept, zero points shifted by
    −(α/r)·(a b) / s. Refuses (naming the leaf) what cannot merge exactly: a float base, a pool other than the
    base's group size, a base without zero points (symmetric or NF4), a permuted or rotated base."""
    q = leaf.base
    if not isinstance(q, QTensor):
        raise ValueError(f"{path}: a QA-LoRA merge needs a quantized base; this one is float (use jq.adapters.merge)")
    lay = q.layout
    problems = []
    if lay.granularity != "group" or lay.group_size != leaf.pool or lay.axes != (0,) or lay.flat:
        problems.append(f"the adapter pools {leaf.pool} rows but the base is {q.describe()} along axes {lay.axes}")
    if q.zero is None:
        problems.append(f"the base {q.describe()} has no zero points to absorb the shift (quantize it asymmetric)")
    if q.perm is not None:
        problems.append("the base's rows are permuted (act-order), so its groups are not the adapter's")
    if q.policy.rotation is not None:
        problems.append("the base is stored rotated (rotate: hadamard)")
    if problems:
        raise ValueError(f"{path}: the QA-LoRA merge would not be exact: " + "; ".join(problems))
    shift = leaf.scale * jnp.tensordot(leaf.a.astype(jnp.float32), leaf.b.astype(jnp.float32), axes=1)  # [G, *N]
    shift = shift.reshape(lay.scale_shape)
    if q.zero_min:  # weight-unit offsets absorb the shift as it is
        return dataclasses.replace(q, zero=q.zero.astype(jnp.float32) + shift)
    zero = q.zero.astype(jnp.float32) - shift / q.scale.astype(jnp.float32)
    return dataclasses.replace(q, zero=zero)


def merge(base: Any, adapters: dict, cfg: LoraConfig) -> Any:
    """`base` with the pooled `adapters` merged into its zero points: a tree of integer QTensors (and the leaves
    without adapters unchanged), computing what `combine(base, adapters, cfg)` computes."""
    if not cfg.pooled:
        raise ValueError("qalora.merge needs pooled adapters (LoraConfig(pooled=True)); plain LoRA adapters change "
                         "every weight, not one value per group: merge them into float with jq.adapters.merge")
    return jax.tree_util.tree_map_with_path(lambda kp, x: merge_leaf(path_str(kp), x) if is_lowrank(x) else x,
                                            combine(base, adapters, cfg), is_leaf=is_weight_leaf)
