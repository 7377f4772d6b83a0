"""Sequential calibration of any linen model, with no hand-written `BlockSpec`: find its repeated blocks, check that
they form a chain, and describe them to `jq.calibration.sequential`.

What is found, by running the model once on a calibration batch (no declarations):

- **blocks**: top-level submodules named `<prefix>_<i>` (i = 0..N-1, N >= 2; what `[Block() for _ in range(N)]` in
  `setup` or `Block(name=f"layer_{i}")` give) whose parameter trees have equal structure and shapes, each called
  once with positional arguments;
- **the chain**: block i + 1's first argument is exactly block i's output, and every block gets the same other
  arguments (positions, masks); what runs before block 0 becomes the `embed` (the model run up to its first block);
- **stages**: inside a block, the routable layers (Dense / DenseGeneral / Einsum) grouped by the input they share,
  in the order they run (q/k/v, then o, ...), so each stage is calibrated with the earlier ones quantized.

When any of that fails (no such blocks, keyword arguments, something between blocks, scanned stacks, layers that
are not standard ones), `jq.calibration.model.quantize_model` calibrates weight by weight through the traced jaxpr
instead (`jq.calibration.traced_sequential`). AWQ / SmoothQuant folds need to know who produces each input, which a
model does not declare: give a `BlockSpec` with `folds` for them.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from jq.calibration.sequential import BlockSpec
from jq.interop.layers import LayerCall, layer_interceptor
from jq.interop.linen import apply

__all__ = ["discover_blocks"]

_INDEXED = re.compile(r"(.+)_(\d+)")


class _Stop(Exception):
    """Raised at the first block's call once its arguments are recorded (the rest of the model is not needed)."""


def _block_names(params: dict) -> tuple[tuple[str, ...], str]:
    """The longest run prefix_0 .. prefix_{N-1} (N >= 2) of top-level keys with equal parameter shapes, or ((),
    why not)."""
    groups: dict[str, dict[int, str]] = {}
    for k in params:
        m = _INDEXED.fullmatch(str(k))
        if m and isinstance(params[k], dict):
            groups.setdefault(m.group(1), {})[int(m.group(2))] = k
    best: tuple[str, ...] = ()
    for prefix, idx in groups.items():
        names = tuple(idx[i] for i in range(len(idx)) if i in idx)
        if len(names) != len(idx) or len(names) < 2:
            continue
        shapes = [jax.tree_util.tree_map(jnp.shape, params[n]) for n in names]
        if all(s == shapes[0] for s in shapes) and len(names) > len(best):
            best = names
    if best:
        return best, ""
    return (), ("no repeated blocks at the top of the params tree (keys prefix_0 .. prefix_N with equal parameter "
                f"shapes; found {sorted(map(str, params))[:8]})")


def _module_key(m: nn.Module) -> tuple:
    """What makes two blocks the same computation: their type and fields other than name / parent."""
    fields = tuple((f.name, getattr(m, f.name)) for f in dataclasses.fields(m) if f.name not in ("name", "parent"))
    return (type(m), repr(fields))


def _record_calls(model: nn.Module, params: dict, names: tuple[str, ...], args: tuple) -> dict[str, tuple]:
    """Run the model eagerly; {block name: (unbound module, args, kwargs, output)} for each block's call."""
    calls: dict[str, tuple] = {}

    def intercept(next_fun, a, kw, context):
        path = tuple(context.module.scope.path) if context.module.scope is not None else ()
        if context.method_name == "__call__" and len(path) == 1 and path[0] in names:
            out = next_fun(*a, **kw)
            if path[0] in calls:
                raise ValueError(f"block {path[0]} is called more than once")
            calls[path[0]] = (context.module.clone(parent=None, name=None), a, kw, out)
            return out
        return next_fun(*a, **kw)

    with nn.intercept_methods(intercept):
        apply(model, {"params": params}, *args)
    return calls


def _stages(module: nn.Module, block_params: dict, args: tuple) -> tuple[tuple[str, ...], ...]:
    """The block's routable layers grouped by shared input (equal arrays), in the order they first run."""
    seen: list[tuple[Any, list[str]]] = []

    def record(c: LayerCall):
        x = np.asarray(c.x)
        for x0, paths in seen:
            if x0.shape == x.shape and np.array_equal(x0, x):
                paths.append(c.path)
                break
        else:
            seen.append((x, [c.path]))
        return c.proceed()

    apply(module, {"params": block_params}, *args, interceptor=layer_interceptor(record))
    return tuple(tuple(p) for _, p in seen)


def discover_blocks(model: nn.Module, params: dict, tokens: jax.Array) -> tuple[BlockSpec | None, str]:
    """A `BlockSpec` for `model` (whose `apply(..., tokens)` runs it) found by one run on `tokens` [B, T], or
    (None, the reason none was found)."""
    names, why = _block_names(params)
    if not names:
        return None, why
    args = (jnp.asarray(tokens),)
    calls = _record_calls(model, params, names, args)
    missing = [n for n in names if n not in calls]
    if missing:
        return None, f"blocks {missing} are not called as modules of the model (scanned or called through a method)"
    if any(calls[n][2] for n in names):
        return None, f"block {names[0]} is called with keyword arguments {sorted(calls[names[0]][2])}"
    first = calls[names[0]][1]
    for prev, n in zip(names, names[1:]):
        _, a, _, _ = calls[n]
        out = calls[prev][3]
        if not (isinstance(out, jax.Array) and a and np.array_equal(np.asarray(a[0]), np.asarray(out))):
            return None, f"block {n}'s input is not block {prev}'s output (something runs between the blocks)"
        if len(a) != len(first) or not all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a[1:], first[1:])):
            return None, f"block {n} gets other extra arguments than block {names[0]}"
    by_key: dict[tuple, nn.Module] = {}
    modules = tuple(by_key.setdefault(_module_key(calls[n][0]), calls[n][0]) for n in names)

    def upto_first_block(params_, tokens_):
        box: dict = {}

        def stop(next_fun, a, kw, context):
            path = tuple(context.module.scope.path) if context.module.scope is not None else ()
            if context.method_name == "__call__" and path == (names[0],):
                box["args"] = a
                raise _Stop
            return next_fun(*a, **kw)

        try:
            with nn.intercept_methods(stop):
                apply(model, {"params": params_}, tokens_)
        except _Stop:
            pass
        return box["args"]

    stages = _stages(modules[0], params[names[0]], first)
    spec = BlockSpec(module=modules[0], modules=modules, names=names,
                     embed=lambda p, t: upto_first_block(p, t)[0],
                     extra=lambda t: tuple(upto_first_block(params, t)[1:]), stages=stages)
    return spec, f"{len(names)} blocks {names[0]} .. {names[-1]} ({len(by_key)} distinct), stages {list(stages)}"
