"""Evaluate a model's traced jaxpr (`jq.interop.usage.Usage.jaxpr`) equation by equation, handing every
`dot_general` that reads a weight (a `DotSite`) to a hook first.

The hook sees the site, the operands' values and the index of the enclosing `scan` iterations (scanned layers:
`(layer,)`), and returns the output to use, or None to run the equation as traced. Calibration records the other
operand of each weight's matmul with it (`jq.calibration.usage_capture`). Nested jits, remat and custom-derivative
calls whose inner jaxpr holds a site are evaluated inline; a `scan` holding one is unrolled (one step per
iteration, so a hook sees each layer); every other equation is bound as traced. Runs under `jax.jit` like any
function of arrays.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.extend import core as jcore

from jq.interop.usage import DotSite, Usage

__all__ = ["evaluate", "Hook"]

Hook = Callable[[DotSite, list, tuple[int, ...]], Any]
_CALLS = ("jaxpr", "call_jaxpr", "fun_jaxpr")


def evaluate(usage: Usage, leaves: list, args: tuple, hook: Hook) -> Any:
    """Run the traced model on the parameter `leaves` (dense arrays, in `usage.treedef` order) and `args` (the
    arrays the model was traced with, or others of the same shapes); returns the model's output pytree."""
    closed = usage.jaxpr
    flat_args = jax.tree_util.tree_leaves(args)
    has = _SiteIndex(usage)
    outs = _eval(closed.jaxpr, closed.consts, list(leaves) + flat_args, usage, hook, (), has)
    return jax.tree_util.tree_unflatten(usage.out_tree, outs)


class _SiteIndex:
    """Which (sub-)jaxprs hold a site, computed once per jaxpr."""

    def __init__(self, usage: Usage):
        self.sites, self.memo = usage.sites, {}

    def __call__(self, jaxpr: Any) -> bool:
        key = id(jaxpr)
        if key not in self.memo:
            self.memo[key] = False
            self.memo[key] = any(id(e) in self.sites or any(self(j) for j in _subjaxprs(e)) for e in jaxpr.eqns)
        return self.memo[key]


def _subjaxprs(eqn: Any) -> list:
    out = []
    for v in eqn.params.values():
        for j in (v if isinstance(v, (tuple, list)) else (v,)):
            if hasattr(j, "eqns"):
                out.append(j)
            elif hasattr(j, "jaxpr") and hasattr(j.jaxpr, "eqns"):
                out.append(j.jaxpr)
    return out


def _inner(eqn: Any) -> tuple[Any, list] | None:
    for k in _CALLS:
        j = eqn.params.get(k)
        if hasattr(j, "eqns"):
            return j, []
        if hasattr(j, "jaxpr") and hasattr(j.jaxpr, "eqns"):
            return j.jaxpr, list(j.consts)
    return None


def _eval(jaxpr, consts, args, usage, hook, index, has) -> list:
    env: dict = {}

    def read(v):
        return v.val if isinstance(v, jcore.Literal) else env[v]

    env.update(zip(jaxpr.constvars, consts))
    env.update(zip(jaxpr.invars, args))
    for eqn in jaxpr.eqns:
        invals = [read(v) for v in eqn.invars]
        outs = None
        site = usage.sites.get(id(eqn))
        if site is not None:
            r = hook(site, invals, index)
            outs = None if r is None else [r]
        if outs is None and any(has(j) for j in _subjaxprs(eqn)):
            outs = _nested(eqn, invals, usage, hook, index, has)
        if outs is None:
            params = eqn.primitive.get_bind_params(eqn.params)  # (subfuns, params) in some jax releases
            subfuns, params = params if isinstance(params, tuple) else ((), params)
            with eqn.ctx.manager:
                r = eqn.primitive.bind(*subfuns, *invals, **params)
            outs = list(r) if eqn.primitive.multiple_results else [r]
        for v, o in zip(eqn.outvars, outs):
            if not isinstance(v, jcore.DropVar):
                env[v] = o
    return [read(v) for v in jaxpr.outvars]


def _nested(eqn, invals, usage, hook, index, has) -> list | None:
    """Evaluate a call inline, or unroll a scan, so the hook sees the sites inside; None to bind it as traced."""
    if eqn.primitive.name == "scan":
        p = eqn.params
        nc, nk, n = p["num_consts"], p["num_carry"], p["length"]
        body = p["jaxpr"]
        consts, carry, xs = invals[:nc], invals[nc:nc + nk], invals[nc + nk:]
        ys: list = [None] * n
        for i in (reversed(range(n)) if p["reverse"] else range(n)):
            outs = _eval(body.jaxpr, body.consts, consts + carry + [x[i] for x in xs], usage, hook, index + (i,), has)
            carry, ys[i] = outs[:nk], outs[nk:]
        stacked = [jnp.stack([ys[i][k] for i in range(n)]) for k in range(len(body.jaxpr.outvars) - nk)]
        return list(carry) + stacked
    inner = _inner(eqn)
    if inner is None or len(inner[0].invars) != len(invals):
        return None  # cond / while and the like: bound as traced (their sites are reported as not captured)
    return _eval(inner[0], inner[1], invals, usage, hook, index, has)
