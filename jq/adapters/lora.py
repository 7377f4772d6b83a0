"""LoRA adapters as data: a tree of factors {path: {"a", "b"}} beside a frozen (quantized or float) base tree.

    lcfg = LoraConfig(rank=16, alpha=16)
    adapters = init(qparams, lcfg, jax.random.PRNGKey(0))   # a [K, r] ~ U(±1/√K), b [r, N] = 0: starts at the base
    def loss(adapters, batch, base):                        # differentiate the adapters only
        logits = jq.interop.apply(model, {"params": combine(base, adapters, lcfg)}, batch)
        ...
    merged = merge(qparams, adapters, lcfg)                 # float weights base + (α/r)·a b, for export

`combine` puts a `jq.numbers.lowrank.LowRank` leaf at each adapted path; `jq.ops` runs the base (kernels included)
and adds (α/r)·(x a) b beside it, so the model code is unchanged (linen and NNX). The base's codes are never an
optimizer's input: they stay bit-identical. Memory while training is the packed base plus the adapters and their
optimizer state.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

import jax
import jax.numpy as jnp

from jq.numbers.lowrank import LowRank, is_lowrank, is_weight_leaf
from jq.numbers.qtensor import QTensor
from jq.tree.paths import leaf_paths, path_str, set_path

__all__ = ["LoraConfig", "init", "combine", "split", "merge", "targets", "in_ndim", "factor_shapes", "count",
           "trainable_mask", "only_adapters"]


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """Which leaves get adapters and how they are shaped.

    Attributes:
      rank: r, the inner dimension of a [K, r] · b [r, N].
      alpha: the product is scaled by alpha / rank (LoRA's α; the default keeps the scale at 1 for rank 16).
      dropout: dropout rate on each adapter's input while training (0: none).
      pattern: a regular expression the leaf path must fully match (as recipe rules match); matrices only.
      exclude: a regular expression of paths never adapted (default: embeddings and the LM head).
      pooled: QA-LoRA — each row of a stands for one quantization group of the base's contraction axis (a is
        [K / group_size, r]), so the adapter merges into the base's zero points (`jq.adapters.qalora.merge`).
    """

    rank: int = 16
    alpha: float = 16.0
    dropout: float = 0.0
    pattern: str = r".*kernel"
    exclude: str = r".*(embed|lm_head).*"
    pooled: bool = False

    def __post_init__(self):
        if not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"LoraConfig: rank {self.rank!r} must be a positive integer (e.g. 8, 16, 64)")
        if not self.alpha > 0:
            raise ValueError(f"LoraConfig: alpha {self.alpha!r} must be > 0 (the product is scaled by alpha / rank)")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoraConfig: dropout {self.dropout!r} must lie in [0, 1)")
        for name in ("pattern", "exclude"):
            try:
                re.compile(getattr(self, name))
            except re.error as e:
                raise ValueError(f"LoraConfig: {name} {getattr(self, name)!r} is not a regular expression: {e}") from None

    @property
    def scale(self) -> float:
        """alpha / rank: the multiplier of a b in the forward."""
        return float(self.alpha) / self.rank


def in_ndim(path: str, leaf: Any) -> int:
    """How many leading axes of the weight its matmul contracts: a QTensor's scale axes (which must lead), else 1
    (a Dense kernel [K, N])."""
    if isinstance(leaf, QTensor):
        axes = tuple(leaf.layout.axes)
        if axes != tuple(range(len(axes))):
            raise ValueError(f"{path}: the base contracts axes {axes}; adapters need the contracted axes first "
                             "(a Dense / DenseGeneral kernel [*in, *out]); exclude this leaf (LoraConfig.exclude)")
        return len(axes)
    return 1


def _group_size(path: str, leaf: Any) -> int:
    """The base's group size along its single contraction axis (QA-LoRA's pooling), refusing what cannot merge."""
    if not isinstance(leaf, QTensor) or leaf.layout.granularity != "group" or leaf.layout.flat:
        desc = leaf.describe() if isinstance(leaf, QTensor) else "a float weight"
        raise ValueError(f"{path}: pooled (QA-LoRA) adapters need a base quantized in groups along its input axis; "
                         f"this leaf is {desc}. Quantize it with group_size (e.g. int4 g128) or use pooled: false")
    lay = leaf.layout
    if lay.axes != (0,):
        raise ValueError(f"{path}: pooled adapters need groups along axis 0 of the base (its input); it has axes "
                         f"{lay.axes}")
    return int(lay.group_size)


def targets(params: Any, cfg: LoraConfig) -> list[tuple[str, Any]]:
    """(path, leaf) of every matrix `cfg` adapts: the path fully matches `pattern`, not `exclude`, and ndim ≥ 2."""
    inc, exc = re.compile(cfg.pattern), re.compile(cfg.exclude)
    return [(p, x) for p, x in leaf_paths(params)
            if inc.fullmatch(p) and not exc.fullmatch(p) and len(getattr(x, "shape", ())) >= 2]


def init(params: Any, cfg: LoraConfig, key: jax.Array) -> dict:
    """Zero-effect adapters for every leaf `cfg` selects: {path…: {"a": [*K, r] ~ U(±1/√K), "b": [r, *N] = 0}}
    (float32, nested like `params`), so base + adapters computes the base exactly at step 0 (QLoRA's start).
    Raises ValueError naming the leaf for a rank above min(K, N) or a base QA-LoRA cannot pool over."""
    found = targets(params, cfg)
    if not found:
        raise ValueError(f"LoraConfig(pattern={cfg.pattern!r}, exclude={cfg.exclude!r}) selects no matrix; the "
                         f"matrices are {[p for p, x in leaf_paths(params) if len(getattr(x, 'shape', ())) >= 2][:6]}")
    out: dict = {}
    for i, (path, w) in enumerate(found):
        a_shape, b_shape = factor_shapes(path, w, cfg)
        k = math.prod(a_shape[:-1]) * (_group_size(path, w) if cfg.pooled else 1)
        bound = 1.0 / math.sqrt(k)  # PyTorch's kaiming_uniform(a=√5) of LoRA's A
        a = jax.random.uniform(jax.random.fold_in(key, i), a_shape, jnp.float32, -bound, bound)
        set_path(out, path, {"a": a, "b": jnp.zeros(b_shape, jnp.float32)})
    return out


def factor_shapes(path: str, w: Any, cfg: LoraConfig) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(a's shape, b's shape) of the adapter of leaf `w` at `path`, checking the rank against min(K, N)."""
    n_in = in_ndim(path, w)
    shape = tuple(w.shape)
    kdims, ndims = shape[:n_in], shape[n_in:]
    if cfg.rank > min(math.prod(kdims), math.prod(ndims)):
        raise ValueError(f"{path}: rank {cfg.rank} exceeds min(in, out) = min({math.prod(kdims)}, "
                         f"{math.prod(ndims)}) of this {shape} weight; a lower rank (or exclude the leaf) is needed")
    if cfg.pooled:
        kdims = (-(-kdims[0] // _group_size(path, w)),)  # a short last group (padded quantization) has its row
    return kdims + (cfg.rank,), (cfg.rank,) + ndims


def combine(base: Any, adapters: dict, cfg: LoraConfig, key: jax.Array | None = None) -> Any:
    """`base` with a `LowRank(base leaf, a, b)` at every adapted path (the tree the model runs on). With `key` and
    `cfg.dropout` > 0, each adapter's input is dropped out (a key per leaf); shapes are checked (a resume with
    other shapes is refused naming the leaf)."""
    flat = {p: f for p, f in _factor_paths(adapters)}
    pool = {}

    def attach(kp, w):
        path = path_str(kp)
        if path not in flat:
            return w
        f = flat[path]
        if path not in pool:
            pool[path] = _group_size(path, w) if cfg.pooled else 1
        k = None if key is None or cfg.dropout == 0 else jax.random.fold_in(key, len(pool))
        leaf = LowRank(w, f["a"], f["b"], k, scale=cfg.scale, in_ndim=in_ndim(path, w), pool=pool[path],
                       dropout=cfg.dropout)
        leaf.check(path)
        return leaf

    out = jax.tree_util.tree_map_with_path(attach, base, is_leaf=is_weight_leaf)
    missing = sorted(set(flat) - set(pool))
    if missing:
        raise ValueError(f"{missing[0]}: the adapters name {len(missing)} path(s) the base does not have; were they "
                         "trained for another model or recipe?")
    return out


def split(tree: Any) -> tuple[Any, dict]:
    """The inverse of `combine`: (base tree, adapters {path: {"a", "b"}})."""
    adapters: dict = {}

    def take(kp, x):
        if is_lowrank(x):
            set_path(adapters, path_str(kp), {"a": x.a, "b": x.b})
            return x.base
        return x

    return jax.tree_util.tree_map_with_path(take, tree, is_leaf=is_weight_leaf), adapters


def merge(base: Any, adapters: dict, cfg: LoraConfig, dtype: Any = jnp.float32) -> Any:
    """Float weights base + (α/r)·a b at the adapted leaves (the rest of `base` unchanged): the model to export or
    re-quantize. `jq.adapters.qalora.merge` keeps a pooled adapter's base integer instead."""
    return jax.tree_util.tree_map(lambda x: x.dequantize(dtype) if is_lowrank(x) else x,
                                  combine(base, adapters, cfg), is_leaf=is_weight_leaf)


def count(adapters: dict) -> int:
    """Trainable parameters of an adapters tree."""
    return sum(int(x.size) for x in jax.tree_util.tree_leaves(adapters))


def trainable_mask(tree: Any) -> Any:
    """For a tree holding `LowRank` leaves: True at their factors a and b, False everywhere else — the mask of
    `only_adapters` when a float base and its adapters live in one tree."""
    def mark(x):
        if is_lowrank(x):
            return dataclasses.replace(x, base=jax.tree_util.tree_map(lambda _: False, x.base), a=True, b=True,
                                       key=None if x.key is None else False)
        return jax.tree_util.tree_map(lambda _: False, x)

    return jax.tree_util.tree_map(mark, tree, is_leaf=is_weight_leaf)


def _factor_paths(adapters: dict) -> list[tuple[str, dict]]:
    """(weight path, {"a", "b"}) pairs of an adapters tree; a leaf that is not one of a pair is refused by path."""
    pairs: dict[str, dict] = {}
    for path, x in leaf_paths(adapters):
        head, _, name = path.rpartition("/")
        if name not in ("a", "b"):
            raise ValueError(f"{path}: an adapters tree holds {{'a', 'b'}} pairs under each weight's path, found "
                             f"{name!r}")
        pairs.setdefault(head, {})[name] = x
    for head, f in pairs.items():
        if set(f) != {"a", "b"}:
            raise ValueError(f"{head}: an adapter needs both factors a and b, found only {sorted(f)}")
    return list(pairs.items())


def only_adapters(optimizer: Any, tree: Any) -> Any:
    """`optimizer` on the adapter factors of `tree` (a float tree holding LowRank leaves), zero updates for every
    other leaf: `optax.multi_transform` over `trainable_mask(tree)`. (A quantized base is not differentiable — its
    codes are integers: train the adapters tree itself and pass the base as a frozen argument.)"""
    import optax

    labels = jax.tree_util.tree_map(lambda m: "train" if m else "frozen", trainable_mask(tree))
    return optax.multi_transform({"train": optimizer, "frozen": optax.set_to_zero()}, labels)
