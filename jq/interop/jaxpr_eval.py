"""Evaluate a model's traced jaxpr (`jq.interop.usage.Usage.jaxpr`) equation by equation, handing every
`dot_general` that reads a weight (a `DotSite`) to a hook first.

The hook sees the site, the operands' values and the index of the enclosing `scan` iterations (scanned layers:
`(layer,)`), and returns the output to use, or None to run the equation as traced. Calibration records the other
operand of each weight's matmul with it (`jq.calibration.usage_capture`). Nested jits, remat and custom-derivative
calls whose inner jaxpr holds a site are evaluated inline; a `scan` holding one is unrolled (one step per
iteration, so a hook sees each layer); every other equation is bound as traced. Runs under `jax.jit` like any
function of arrays.

`evaluate_batches` runs several batches in lockstep, equation by equation (each value one array per batch, a
`Batched`): a hook then sees a weight's input over every batch before anything downstream of it runs — what
sequential calibration needs (`jq.calibration.traced_sequential`). Only the wanted sites run in lockstep: the runs
of equations between them go one batch at a time, keeping per batch just the values read later (the residual
stream, not every batch's attention scores); values are freed after their last use, and evaluation stops after
the last top-level equation that holds a wanted site.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.extend import core as jcore

from jq.interop.usage import DotSite, Usage

__all__ = ["evaluate", "evaluate_batches", "Batched", "lanes", "Hook"]

Hook = Callable[[DotSite, list, tuple[int, ...]], Any]
_CALLS = ("jaxpr", "call_jaxpr", "fun_jaxpr")


class Batched(list):
    """One value per batch (lockstep evaluation): every equation reading one is bound once per batch."""


def lanes(fn: Callable, *vals: Any) -> Any:
    """fn(*vals) once, or once per batch (a `Batched` of results) when any value is `Batched`."""
    n = next((len(v) for v in vals if isinstance(v, Batched)), None)
    if n is None:
        return fn(*vals)
    return Batched(fn(*[v[b] if isinstance(v, Batched) else v for v in vals]) for b in range(n))


def evaluate(usage: Usage, leaves: list, args: tuple, hook: Hook) -> Any:
    """Run the traced model on the parameter `leaves` (dense arrays, in `usage.treedef` order) and `args` (the
    arrays the model was traced with, or others of the same shapes); returns the model's output pytree."""
    closed = usage.jaxpr
    flat_args = jax.tree_util.tree_leaves(args)
    outs = _eval(closed.jaxpr, closed.consts, list(leaves) + flat_args, usage, hook, (), _SiteIndex(usage))
    return jax.tree_util.tree_unflatten(usage.out_tree, outs)


def evaluate_batches(usage: Usage, leaves: list, batches: list[tuple], hook: Hook,
                     wanted: Callable[[DotSite], bool]) -> None:
    """Run the traced model on `leaves` and every batch of `batches` (argument tuples of the traced shapes) in
    lockstep at the sites `wanted` accepts: the hook sees each of them with `Batched` operands (one per batch) and
    returns a `Batched` output or None; other sites run as traced, and evaluation stops after the last top-level
    equation holding a wanted site (nothing after it runs). Eager: call it outside `jax.jit`."""
    closed = usage.jaxpr
    per_batch = [jax.tree_util.tree_leaves(b) for b in batches]
    flat_args = [Batched(a[k] for a in per_batch) for k in range(len(per_batch[0]))]
    has = _SiteIndex(usage, wanted)
    stop = max((k for k, e in enumerate(closed.jaxpr.eqns) if has.holds(e)), default=-1)
    _eval(closed.jaxpr, closed.consts, list(leaves) + flat_args, usage, hook, (), has, stop)


class _SiteIndex:
    """Which (sub-)jaxprs hold a site (one that `keep` accepts), computed once per jaxpr."""

    def __init__(self, usage: Usage, keep: Callable[[DotSite], bool] = lambda s: True):
        self.sites, self.keep, self.memo = usage.sites, keep, {}

    def holds(self, eqn: Any) -> bool:
        """Whether the equation is such a site or holds one."""
        site = self.sites.get(id(eqn))
        return (site is not None and self.keep(site)) or any(self(j) for j in _subjaxprs(eqn))

    def __call__(self, jaxpr: Any) -> bool:
        key = id(jaxpr)
        if key not in self.memo:
            self.memo[key] = False
            self.memo[key] = any(self.holds(e) for e in jaxpr.eqns)
        return self.memo[key]


def _last_uses(jaxpr: Any) -> dict[int, list]:
    """{equation index: the variables read for the last time there} (outputs of the jaxpr are never freed)."""
    last: dict = {}
    for k, eqn in enumerate(jaxpr.eqns):
        for v in eqn.invars:
            if not isinstance(v, jcore.Literal):
                last[v] = k
    keep = {v for v in jaxpr.outvars if not isinstance(v, jcore.Literal)}
    out: dict[int, list] = {}
    for v, k in last.items():
        if v not in keep:
            out.setdefault(k, []).append(v)
    return out


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


def _bind(eqn: Any, invals: list) -> list:
    params = eqn.primitive.get_bind_params(eqn.params)  # (subfuns, params) in some jax releases
    subfuns, params = params if isinstance(params, tuple) else ((), params)
    with eqn.ctx.manager:
        r = eqn.primitive.bind(*subfuns, *invals, **params)
    return list(r) if eqn.primitive.multiple_results else [r]


def _eval(jaxpr, consts, args, usage, hook, index, has, stop: int | None = None) -> list:
    env: dict = {}

    def read(v):
        return v.val if isinstance(v, jcore.Literal) else env[v]

    env.update(zip(jaxpr.constvars, consts))
    env.update(zip(jaxpr.invars, args))
    free = _last_uses(jaxpr)
    eqns = jaxpr.eqns if stop is None else jaxpr.eqns[:stop + 1]
    lockstep = any(isinstance(a, Batched) for a in args)
    k = 0
    while k < len(eqns):
        if lockstep and not has.holds(eqns[k]):  # a run of equations with no site: batch by batch
            end = next((j for j in range(k, len(eqns)) if has.holds(eqns[j])), len(eqns))
            _segment(eqns, k, end, env, free)
            k = end
            continue
        eqn = eqns[k]
        invals = [read(v) for v in eqn.invars]
        outs = None
        site = usage.sites.get(id(eqn))
        if site is not None:
            r = hook(site, invals, index)
            outs = None if r is None else [r]
        if outs is None and any(has(j) for j in _subjaxprs(eqn)):
            outs = _nested(eqn, invals, usage, hook, index, has)
        if outs is None:
            outs = lanes(lambda *a, e=eqn: _bind(e, list(a)), *invals)
            if isinstance(outs, Batched):  # per batch a list of outputs → per output one value per batch
                outs = [Batched(o[i] for o in outs) for i in range(len(eqn.outvars))]
        for v, o in zip(eqn.outvars, outs):
            if not isinstance(v, jcore.DropVar):
                env[v] = o
        for v in free.get(k, ()):
            env.pop(v, None)
        k += 1
    return [] if stop is not None else [read(v) for v in jaxpr.outvars]


def _segment(eqns: list, start: int, end: int, env: dict, free: dict[int, list]) -> None:
    """Equations start..end-1 (holding no site) run one batch at a time, so only one batch's temporaries are held:
    the values not freed within them (`free`: last reads) are kept per batch (`Batched`), those that depend on no
    batch once."""
    batched = {v for v, x in env.items() if isinstance(x, Batched)}
    for eqn in eqns[start:end]:
        if any(not isinstance(v, jcore.Literal) and v in batched for v in eqn.invars):
            batched.update(eqn.outvars)
    n = next(len(x) for x in env.values() if isinstance(x, Batched))
    kept: dict = {}
    shared: dict = {}  # values that depend on no batch, computed with the first
    for b in range(n):
        local: dict = {}

        def read(v):
            if isinstance(v, jcore.Literal):
                return v.val
            x = local[v] if v in local else shared[v] if v in shared else env[v]
            return x[b] if isinstance(x, Batched) else x

        for k in range(start, end):
            eqn = eqns[k]
            per_batch = any(v in batched for v in eqn.outvars)
            if b and not per_batch:
                continue
            outs = _bind(eqn, [read(v) for v in eqn.invars])
            for v, o in zip(eqn.outvars, outs):
                if not isinstance(v, jcore.DropVar):
                    (local if per_batch else shared)[v] = o
            for v in free.get(k, ()):  # read for the last time here
                if v in local:
                    del local[v]
                elif v in shared and b + 1 == n:
                    del shared[v]
        for v, o in local.items():  # still read after the segment
            kept.setdefault(v, Batched([None] * n))[b] = o
    kept.update(shared)
    for k in range(start, end):
        for v in free.get(k, ()):
            env.pop(v, None)
    env.update(kept)


def _nested(eqn, invals, usage, hook, index, has) -> list | None:
    """Evaluate a call inline, or unroll a scan, so the hook sees the sites inside; None to bind it as traced."""
    if eqn.primitive.name == "scan":
        p = eqn.params
        nc, nk, n = p["num_consts"], p["num_carry"], p["length"]
        body = p["jaxpr"]
        consts, carry, xs = invals[:nc], invals[nc:nc + nk], invals[nc + nk:]
        ys: list = [None] * n
        for i in (reversed(range(n)) if p["reverse"] else range(n)):
            sliced = [lanes(lambda a, i=i: a[i], x) for x in xs]
            outs = _eval(body.jaxpr, body.consts, consts + carry + sliced, usage, hook, index + (i,), has)
            carry, ys[i] = outs[:nk], outs[nk:]
        stacked = [lanes(lambda *a: jnp.stack(a), *[ys[i][k] for i in range(n)])
                   for k in range(len(body.jaxpr.outvars) - nk)]
        return list(carry) + stacked
    inner = _inner(eqn)
    if inner is None or len(inner[0].invars) != len(invals):
        return None  # cond / while and the like: bound as traced (their sites are reported as not captured)
    return _eval(inner[0], inner[1], invals, usage, hook, index, has)
