"""How a model uses each weight, found by tracing its forward once (`jax.make_jaxpr` on abstract values).

`trace_usage(module, variables, *args)` returns a `Usage`: for every parameter path a `jq.tree.axes.LeafUsage`
listing its consumers — a `dot_general` operand (from `jnp.einsum`, `@`, `lax.dot_general`, `nn.Dense` … in any
module, the user's own included) with the leaf axes it contracts / batches / keeps, a `gather` source (an embedding
table), an elementwise operand (norm scales, biases) or another primitive. The leaf's axes are followed through
converts, transposes, broadcasts, squeezes, slices, elementwise ops with scalars, simple reshapes, nested jits,
remat / custom-derivative calls, `cond` / `while` and `scan` (scanned layers: the scanned axis is `stacked`).

It is the one source of truth for: the contraction axes `quantize_params(..., usage=)` quantizes along
(`jq.tree.axes`), the statistics the traced capture records (`jq.calibration.usage_capture`) and the routing report
(`jq.interop.report`). `Usage.sites` maps each `dot_general` equation reading a weight to a `DotSite`, which the
jaxpr interpreter (`jq.interop.jaxpr_eval`) looks up while it evaluates the same jaxpr.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
from jax.extend import core as jcore

from jq.interop.layers import dense_like
from jq.tree.axes import LeafUsage, WeightUse
from jq.tree.paths import path_str

__all__ = ["Usage", "DotSite", "trace_usage", "trace_nnx_usage", "trace_fn_usage", "analyse"]

# primitives that keep a value's axes (shape and meaning)
_SAME = {"convert_element_type", "copy", "copy_p", "reduce_precision", "optimization_barrier", "sharding_constraint",
         "stop_gradient", "rev"}
_ELEMENTWISE = {"mul", "add", "sub", "div", "neg", "max", "min", "pow", "integer_pow", "sqrt", "rsqrt", "exp", "log",
                "tanh", "logistic", "abs", "sign", "square", "select_n", "clamp", "add_any", "erf", "sin", "cos",
                "exp2", "log1p", "expm1", "floor", "ceil", "round", "nextafter", "atan2", "rem", "and", "or", "not"}
_CALLS = ("jaxpr", "call_jaxpr", "fun_jaxpr")  # params holding the inner jaxpr of a 1:1 call

# a traced value: which leaf it comes from, the leaf axes each of its dims carries, axes a scan sliced off, and
# how it got there
Trace = tuple[int, tuple[tuple[int, ...], ...], tuple[int, ...], str]


@dataclasses.dataclass(frozen=True)
class DotSite:
    """A `dot_general` equation with a weight operand: `side` (0 lhs, 1 rhs) is the weight, `path` its leaf; `lhs_k`
    the other operand's contracting dims ordered by the weight's leaf axes (flattening them in that order gives
    the K of `hessian [K, K]`); `batch` whether the weight has batch dims in the dot; `where` the control-flow
    primitives around it ("scan", "cond", "while"), outermost first; `direct` operand dim → leaf axis when the
    operand is the leaf up to transposes / converts (None otherwise; under `nn.scan`, the layer's slice: the
    scanned axes, `use.stacked`, are not among them); `dims` the equation's dimension numbers
    ((lhs contracting, rhs contracting), (lhs batch, rhs batch)) and `preferred` its preferred_element_type."""

    path: str
    side: int
    use: WeightUse
    other_k: tuple[int, ...]
    batch: bool
    where: tuple[str, ...]
    direct: tuple[int, ...] | None
    dims: tuple = ((), ())
    preferred: Any = None


@dataclasses.dataclass
class Usage(Mapping):
    """The traced use of every parameter leaf (a read-only mapping path → `LeafUsage`), plus what the interpreter
    needs: the jaxpr, the parameter tree's structure and the `DotSite` of each weight-reading `dot_general`."""

    leaves: dict[str, LeafUsage]
    jaxpr: Any = None
    treedef: Any = None
    n_params: int = 0
    sites: dict[int, DotSite] = dataclasses.field(default_factory=dict)
    out_tree: Any = None

    def __getitem__(self, path: str) -> LeafUsage:
        return self.leaves[path]

    def __iter__(self) -> Iterator[str]:
        return iter(self.leaves)

    def __len__(self) -> int:
        return len(self.leaves)

    def axes(self) -> dict[str, tuple[int, ...]]:
        """Contraction axes of every leaf whose matmuls agree on them (embeddings used by `attend` included)."""
        return {p: u.contraction_axes for p, u in self.leaves.items() if u.contraction_axes is not None}

    def summary(self) -> dict[str, list[str]]:
        """Paths by kind of use: 'matmul', 'embedding', 'elementwise', 'other', 'unused'."""
        out: dict[str, list[str]] = {}
        for p, u in sorted(self.leaves.items()):
            out.setdefault(u.kind, []).append(p)
        return out


def trace_usage(module: Any, variables: dict, *args: Any, method: Any = None, **kwargs: Any) -> Usage:
    """Trace `module.apply(variables, *args, **kwargs)` once (abstractly; QTensors count as their dense arrays)
    and return how every leaf of `variables["params"]` is used. `args` must be arrays (or pytrees of arrays); they
    become inputs of the traced jaxpr so that the interpreter can run it on other batches of the same shape."""
    rest = {k: v for k, v in variables.items() if k != "params"}
    return trace_fn_usage(lambda p, *a: module.apply({**rest, "params": p}, *a, method=method, **kwargs),
                          variables["params"], *args)


def trace_nnx_usage(graphdef: Any, state: Any, *args: Any) -> Usage:
    """`trace_usage` for NNX: how `nnx.merge(graphdef, state)(*args)` uses every leaf of `state` (paths as
    `quantize_params` sees them on the state)."""
    from flax import nnx

    return trace_fn_usage(lambda s, *a: nnx.merge(graphdef, s)(*a), state, *args)


def trace_fn_usage(fn: Any, params: Any, *args: Any) -> Usage:
    """How `fn(params, *args)` uses every leaf of the pytree `params` (QTensors count as their dense arrays)."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(dense_like(params))
    paths = [path_str(kp) for kp, _ in flat]
    shapes = [tuple(x.shape) for _, x in flat]

    def run(leaves, *a):
        return fn(jax.tree_util.tree_unflatten(treedef, leaves), *a)

    abstract = [jax.ShapeDtypeStruct(x.shape, jnp.dtype(x.dtype)) for _, x in flat]
    closed, out_shape = jax.make_jaxpr(run, return_shape=True)(abstract, *args)
    usage = analyse(closed.jaxpr, paths, shapes)
    usage.jaxpr, usage.treedef, usage.n_params = closed, treedef, len(paths)
    usage.out_tree = jax.tree_util.tree_structure(out_shape)
    return usage


def analyse(jaxpr: Any, paths: list[str], shapes: list[tuple[int, ...]]) -> Usage:
    """The uses of the first `len(paths)` inputs of `jaxpr` (a `Jaxpr`), by path."""
    uses: list[list[WeightUse]] = [[] for _ in paths]
    sites: dict[int, DotSite] = {}
    env = {v: (i, tuple((a,) for a in range(len(s))), (), "") for i, (v, s) in enumerate(zip(jaxpr.invars, shapes))}
    _walk(jaxpr, env, uses, sites, paths, shapes, ())
    leaves = {p: LeafUsage(p, s, tuple(u)) for p, s, u in zip(paths, shapes, uses)}
    return Usage(leaves, sites=sites)


def _is_var(v: Any) -> bool:
    return not isinstance(v, jcore.Literal)


def _inner(eqn: Any) -> Any | None:
    for k in _CALLS:
        j = eqn.params.get(k)
        if hasattr(j, "eqns"):
            return j
        if hasattr(j, "jaxpr") and hasattr(j.jaxpr, "eqns"):
            return j.jaxpr
    return None


def _walk(jaxpr, env, uses, sites, paths, shapes, where) -> None:
    for eqn in jaxpr.eqns:
        traced = [(i, env[v]) for i, v in enumerate(eqn.invars) if _is_var(v) and v in env]
        if not traced:
            continue
        name = eqn.primitive.name
        out = eqn.outvars
        if name == "dot_general":
            _dot(eqn, traced, uses, sites, paths, where)
        elif name == "gather" and traced[0][0] == 0:
            leaf, _, stacked, note = traced[0][1]
            uses[leaf].append(WeightUse("gather", name, stacked=stacked, note=note))
        elif name in _SAME:
            for i, t in traced:
                if i < len(out):
                    env[out[i]] = t
        elif name in ("transpose", "broadcast_in_dim", "squeeze", "reshape", "slice", "dynamic_slice",
                      "expand_dims") and traced[0][0] == 0:
            t = _reshaped(eqn, traced[0][1], shapes)
            if t is None:
                uses[traced[0][1][0]].append(WeightUse("other", name, note="reshape not followed"))
            else:
                env[out[0]] = t
        elif name in _ELEMENTWISE:
            i, t = traced[0]
            if tuple(out[0].aval.shape) == tuple(eqn.invars[i].aval.shape):
                env[out[0]] = (t[0], t[1], t[2], (t[3] + " " + name).strip())
            else:
                for _, t in traced:
                    uses[t[0]].append(WeightUse("elementwise", name, stacked=t[2], note=t[3]))
        elif name == "scan":
            _scan(eqn, traced, env, uses, sites, paths, shapes, where)
        elif name in ("cond", "while"):
            _control(eqn, traced, env, uses, sites, paths, shapes, where)
        elif (inner := _inner(eqn)) is not None and len(inner.invars) == len(eqn.invars):
            sub = {iv: t for (i, t) in traced for iv in (inner.invars[i],)}
            _walk(inner, sub, uses, sites, paths, shapes, where)
            for ov, o in zip(inner.outvars, out):
                if _is_var(ov) and ov in sub:
                    env[o] = sub[ov]
        else:
            for _, t in traced:
                uses[t[0]].append(WeightUse("other", name, stacked=t[2], note=t[3]))


def _reshaped(eqn, t: Trace, shapes) -> Trace | None:
    """The trace of a transpose / broadcast / squeeze / slice / reshape output, or None when it cannot follow."""
    leaf, dims, stacked, note = t
    name, p = eqn.primitive.name, eqn.params
    note = (note + " " + name).strip() if name not in ("slice", "dynamic_slice") else (note + " slice").strip()
    if name == "transpose":
        return leaf, tuple(dims[a] for a in p["permutation"]), stacked, note
    if name in ("slice", "dynamic_slice"):
        return leaf, dims, stacked, note
    if name == "squeeze":
        drop = {d % len(dims) for d in p["dimensions"]}
        return leaf, tuple(d for i, d in enumerate(dims) if i not in drop), stacked, note
    if name == "broadcast_in_dim":
        new = [()] * len(p["shape"])
        for i, d in enumerate(p["broadcast_dimensions"]):
            new[d] = dims[i] if eqn.invars[0].aval.shape[i] == p["shape"][d] else ()
        return leaf, tuple(new), stacked, note
    if name == "expand_dims":
        return None
    return _reshape(leaf, dims, stacked, note, tuple(eqn.invars[0].aval.shape), tuple(p["new_sizes"]))


def _reshape(leaf, dims, stacked, note, old, new) -> Trace | None:
    """Follow a reshape that splits or merges consecutive dims: each output dim carries the leaf axes of the input
    dims it covers (a split axis is carried by each of its pieces)."""
    out: list[tuple[int, ...]] = []
    i = j = 0
    while i < len(old) or j < len(new):
        if j < len(new) and new[j] == 1 and (i >= len(old) or old[i] != 1):
            out.append(())
            j += 1
            continue
        if i < len(old) and old[i] == 1 and (j >= len(new) or new[j] != 1):
            i += 1
            continue
        if i >= len(old) or j >= len(new):
            return None
        i0, j0, a, b = i, j, old[i], new[j]
        i, j = i + 1, j + 1
        while a != b:
            if a < b:
                if i >= len(old):
                    return None
                a, i = a * old[i], i + 1
            else:
                if j >= len(new):
                    return None
                b, j = b * new[j], j + 1
        axes = tuple(x for d in dims[i0:i] for x in d)
        out.extend([axes] * (j - j0))
    return leaf, tuple(out), stacked, note


def _dot(eqn, traced, uses, sites, paths, where) -> None:
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    contract, batch = (tuple(lc), tuple(rc)), (tuple(lb), tuple(rb))
    for side, t in traced:
        leaf, dims, stacked, note = t
        nd = len(dims)
        c, b = contract[side], batch[side]
        ca = [x for d in c for x in dims[d]]
        ba = [x for d in b for x in dims[d]]
        fa = [x for d in range(nd) if d not in c and d not in b for x in dims[d]]
        exact = (len(set(ca)) == len(ca) and not (set(ca) & set(fa)) and not (set(ca) & set(ba))
                 and all(len(dims[d]) <= 1 for d in c))
        use = WeightUse("matmul", "dot_general", tuple(sorted(set(ca))), tuple(sorted(set(ba))),
                        tuple(sorted(set(fa) - set(ca))), stacked, exact, note)
        uses[leaf].append(use)
        other_c = contract[1 - side]
        order = sorted(range(len(c)), key=lambda k: dims[c[k]][0] if dims[c[k]] else -1)
        direct = None
        if all(len(d) == 1 for d in dims) and len({d[0] for d in dims}) == nd and "slice" not in note \
                and not any(n in note for n in ("reshape", "broadcast", "squeeze")):
            direct = tuple(d[0] for d in dims)
            if any(n in note for n in _ELEMENTWISE):
                direct = None
        sites[id(eqn)] = DotSite(paths[leaf], side, use, tuple(other_c[k] for k in order), bool(b), where, direct,
                                 (contract, batch), eqn.params.get("preferred_element_type"))


def _scan(eqn, traced, env, uses, sites, paths, shapes, where) -> None:
    p = eqn.params
    nc, nk = p["num_consts"], p["num_carry"]
    body = p["jaxpr"].jaxpr
    sub = {}
    for i, t in traced:
        if i < nc:
            sub[body.invars[i]] = t
        elif i < nc + nk:
            uses[t[0]].append(WeightUse("other", "scan carry", stacked=t[2], note=t[3]))
        else:
            leaf, dims, stacked, note = t
            sub[body.invars[i]] = (leaf, dims[1:], stacked + dims[0], note)
    _walk(body, sub, uses, sites, paths, shapes, where + ("scan",))


def _control(eqn, traced, env, uses, sites, paths, shapes, where) -> None:
    p = eqn.params
    if eqn.primitive.name == "cond":
        for br in p["branches"]:
            j = br.jaxpr
            _walk(j, {j.invars[i - 1]: t for i, t in traced if i >= 1}, uses, sites, paths, shapes, where + ("cond",))
        return
    cn, bn = p["cond_nconsts"], p["body_nconsts"]
    body = p["body_jaxpr"].jaxpr
    sub = {body.invars[i - cn]: t for i, t in traced if cn <= i < cn + bn}
    for i, t in traced:
        if not cn <= i < cn + bn:
            uses[t[0]].append(WeightUse("other", "while", stacked=t[2], note=t[3]))
    _walk(body, sub, uses, sites, paths, shapes, where + ("while",))
