"""Leaf paths of parameter pytrees: the "/"-joined names recipes match (`layers_3/mlp/down_proj/kernel`), and
reading / writing a nested dict by such a path. The one place that knows how a key path becomes a string."""

from __future__ import annotations

from typing import Any

import jax

from jq.numbers.lowrank import is_weight_leaf
from jq.numbers.qtensor import is_qtensor

__all__ = ["path_str", "leaf_paths", "get_path", "set_path", "replaced", "is_qtensor"]

_MISSING = object()


def path_str(keypath: tuple) -> str:
    """'/'-joined path of a jax key path; NNX's trailing `.value` is dropped."""
    parts = []
    for k in keypath:
        if isinstance(k, jax.tree_util.DictKey):
            parts.append(str(k.key))
        elif isinstance(k, jax.tree_util.SequenceKey):
            parts.append(str(k.idx))
        elif isinstance(k, jax.tree_util.GetAttrKey):
            parts.append(k.name)
        else:
            parts.append(str(getattr(k, "key", k)))
    if len(parts) > 1 and parts[-1] == "value":
        parts.pop()
    return "/".join(parts)


def leaf_paths(tree: Any) -> list[tuple[str, Any]]:
    """(path, leaf) pairs in tree order, QTensors (and LowRank leaves) kept whole."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_weight_leaf)
    return [(path_str(p), v) for p, v in flat]


def get_path(tree: dict, path: str, default: Any = _MISSING) -> Any:
    """tree["a"]["b"]["c"] for path "a/b/c"; `default` when a key is missing (KeyError naming the path without one)."""
    node = tree
    for part in path.split("/"):
        if not isinstance(node, dict) or part not in node:
            if default is _MISSING:
                raise KeyError(f"{path}: no {part!r} under {path.split(part)[0] or 'the root'}")
            return default
        node = node[part]
    return node


def replaced(tree: dict, path: str, value: Any) -> dict:
    """A copy of `tree` with the leaf at "a/b/c" set to `value`: only the dicts along the path are copied, every
    other subtree (and `tree` itself) is shared, unchanged."""
    head, _, rest = path.partition("/")
    return {**tree, head: replaced(tree[head], rest, value) if rest else value}


def set_path(tree: dict, path: str, value: Any) -> None:
    """tree["a"]["b"]["c"] = value for path "a/b/c", creating the intermediate dicts (in place)."""
    *parents, last = path.split("/")
    for part in parents:
        tree = tree.setdefault(part, {})
    tree[last] = value

