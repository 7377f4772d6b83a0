"""QAT on parameter pytrees: `init`, `fake_quantize`, `convert`, and running unmodified linen / NNX models with
fake-quantized activations.

`qat_params = {"params": <the float tree, unchanged>, "quant": <learned quantization parameters>}` is an ordinary
pytree: any optax optimizer updates both halves. `quant` mirrors the paths of the leaves whose rule asks for LSQ
(`options: {lsq: true}`), each `{"scale": f32[scale_shape], "zero": f32[scale_shape]}` (zero only when asymmetric),
e.g. `quant["layers_0"]["attn"]["q_proj"]["kernel"]["scale"]`; it is `{}` when no rule learns its step size.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from jq.algorithms.rtn import QAT
from jq.algorithms.stats import Stats
from jq.tree.recipe import QuantConfig, Rule
from jq.qat import ste as S
from jq.numbers.qtensor import Layout, is_qtensor
from jq.tree.paths import get_path, path_str, set_path
from jq.tree.quantize import (_default_axes, _stats_for, check_rotatable, check_scales, quantize_leaf,
                              quantize_params)
from jq.numbers.scheme import Scheme
from jq.types import Params

__all__ = [
    "QAT_OPTIONS",
    "LeafPlan",
    "plan",
    "qat_options",
    "init",
    "init_from",
    "fake_quantize",
    "convert",
    "to_basis",
    "from_basis",
    "decay_mask",
]

# Options a `method: qat` rule may carry (the fields of jq.algorithms.rtn.QAT), with their defaults.
QAT_OPTIONS: dict[str, Any] = {f.name: f.default for f in dataclasses.fields(QAT)}


def qat_options(rule: Rule) -> dict[str, Any]:
    """The QAT options of a rule: those of a `method: qat` rule's record (validated), the defaults for any other
    method."""
    rec = rule.record if isinstance(rule.record, QAT) else QAT()
    if rec.ste not in S.STE_MODES:
        raise ValueError(f"rule {rule.pattern!r}: option ste={rec.ste!r}; choose one of {list(S.STE_MODES)}")
    if rec.lsq_init not in S.LSQ_INITS:
        raise ValueError(f"rule {rule.pattern!r}: option lsq_init={rec.lsq_init!r}; "
                         f"choose one of {list(S.LSQ_INITS)}")
    if rec.ste == "trust" and (rec.lsq or not isinstance(rec.trust, (int, float)) or not rec.trust > 0):
        raise ValueError(f"rule {rule.pattern!r}: ste: trust (QuEST) needs lsq: false and a trust factor > 0; "
                         f"got lsq={rec.lsq!r}, trust={rec.trust!r}")
    if rec.act_ste not in (None, "identity", "trust"):
        raise ValueError(f"rule {rule.pattern!r}: option act_ste={rec.act_ste!r} (the activations' estimator); "
                         "choose identity or trust, or drop it to follow ste")
    act_ste = rec.ste if rec.act_ste is None else rec.act_ste
    if "trust" not in (rec.ste, act_ste) and rec.trust != 1.0:
        raise ValueError(f"rule {rule.pattern!r}: option trust={rec.trust!r} is the factor of ste: trust (QuEST) and "
                         f"this rule has ste: {rec.ste}; set ste: trust or drop trust")
    if act_ste == "trust" and not (isinstance(rec.trust, (int, float)) and rec.trust > 0):
        raise ValueError(f"rule {rule.pattern!r}: act_ste: trust needs a trust factor > 0; got trust={rec.trust!r}")
    return {"lsq": bool(rec.lsq), "lsq_init": rec.lsq_init, "ste": rec.ste, "trust": float(rec.trust),
            "act_ste": act_ste}


@dataclasses.dataclass(frozen=True)
class LeafPlan:
    """What QAT does to one leaf: its rule's scheme on `layout`, with or without learned step sizes."""

    path: str
    scheme: Scheme
    layout: Layout
    rule: Rule
    lsq: bool
    lsq_init: str
    ste: str
    trust: float = 1.0


def plan(path: str, w: Any, cfg: QuantConfig) -> LeafPlan | None:
    """The plan for leaf `w` at `path`, or None when the recipe keeps it float (no rule, `skip`, not a float array)."""
    ndim = getattr(w, "ndim", 0)
    rule = cfg.rule_for(path, ndim)
    if rule is None or rule.scheme is None or is_qtensor(w) or not jnp.issubdtype(jnp.result_type(w), jnp.floating):
        return None
    sch = rule.scheme
    if getattr(sch, "act_outlier", None) is not None:
        raise ValueError(f"{path}: QAT does not train schemes with act_outlier (scheme {sch.describe()}); "
                         "use a recipe without it")
    if getattr(sch, "progressive", False):
        raise ValueError(f"{path}: QAT does not train progressive (QoQ) grids yet (scheme {sch.describe()}); train "
                         "the plain int4 grid (drop progressive) or quantize this leaf by PTQ")
    axes = sch.axes if sch.axes is not None else _default_axes(path, ndim)
    if sch.policy.rotation is not None:
        check_rotatable(path, tuple(w.shape), axes)
    o = qat_options(rule)
    return LeafPlan(path, sch, sch.layout(tuple(w.shape), axes, path), rule, o["lsq"], o["lsq_init"], o["ste"],
                    o["trust"])


def to_basis(w: jax.Array, p: LeafPlan) -> jax.Array:
    """The weight in the basis its codes are stored in: Qᵀ W along the contraction axis for `rotate: hadamard`
    (what `jq.quantize_params` encodes), `w` itself otherwise; same shape. Linear, so gradients pass through
    exactly."""
    rot = p.scheme.policy.rotation
    return w if rot is None else rot.apply(w, axis=p.layout.axes[0])


def from_basis(v: jax.Array, p: LeafPlan) -> jax.Array:
    """Inverse of `to_basis`: W = Q (Qᵀ W), same shape."""
    rot = p.scheme.policy.rotation
    return v if rot is None else rot.inverse(v, axis=p.layout.axes[0])


# -- the three tree functions -------------------------------------------------------------------------------------

_lsq_init = jax.jit(S.lsq_init, static_argnums=(1, 2, 3))
_lsq_qtensor = jax.jit(S.lsq_qtensor, static_argnums=(2, 3))


def init(params: Params, cfg: QuantConfig) -> dict[str, Any]:
    """QAT parameters from float `params` (a linen params dict or an NNX State): `{"params": params, "quant": q}`
    with learned step sizes (and zero points) initialised for every leaf whose rule has `lsq: true` (each
    f32 [`layout.scale_shape`], e.g. [K/g, N] for groups of a kernel [K, N])."""
    quant: dict = {}
    for kp, w in jax.tree_util.tree_flatten_with_path(params, is_leaf=is_qtensor)[0]:
        path = path_str(kp)
        p = plan(path, w, cfg)
        if p is not None and p.lsq:
            set_path(quant, path, _lsq_init(to_basis(jnp.asarray(w), p), p.scheme, p.layout, p.lsq_init))
    return {"params": params, "quant": quant}


def init_from(qparams: Params, cfg: QuantConfig) -> dict[str, Any]:
    """QAT parameters that start from a PTQ result (e.g. GPTQ / AWQ output of `jq.quantize_params` or
    `jq.calibration.sequential.quantize_sequential`): float masters = each QTensor's dequantized weight, learned step sizes
    (and zero points) = its stored scales (and zeros), so that step 0 of QAT computes the PTQ model.

    Every QTensor at a leaf that the QAT recipe learns (`lsq: true`) must be on the recipe's grid: same format,
    symmetry, zero-point kind, layout (granularity, group size, padding), and stored in natural order (no
    act-order `perm`, and rotated exactly when the recipe's rule says `rotate`). Other QTensors are only
    dequantized. Raises ValueError naming the leaf, what differs and the fix."""
    quant: dict = {}

    def visit(kp, x):
        if not is_qtensor(x):
            return x
        path = path_str(kp)
        w = x.dequantize()
        p = plan(path, w, cfg)
        if p is None or not p.lsq:
            return w
        sch, lay = p.scheme, p.layout
        zkind = None if x.zero is None else ("min" if x.zero_min else
                                             "int" if jnp.issubdtype(x.zero.dtype, jnp.integer) else "float")
        want = None if sch.symmetric else sch.zero_point
        problems = [f"{name} {got!r} (recipe {exp!r})" for name, got, exp in (
            ("format", x.fmt, sch.format), ("symmetric", x.symmetric, sch.symmetric), ("zero point", zkind, want),
            ("layout", x.layout, lay), ("perm", None if x.perm is None else "act-order", None),
            ("rotation", x.policy.rotation, sch.policy.rotation)) if got != exp]
        if problems:
            raise ValueError(
                f"{path}: the PTQ weight is not on the QAT recipe's grid: {'; '.join(problems)}. Quantize it with a "
                "recipe of the same format / group size / zero point / rotate, act_order: false (or "
                "static_groups: true), or start QAT from float params with jq.qat.init")
        q = {"scale": S._squeeze(x.scale, lay)}  # the stored shape and f32, as lsq_init gives them
        if x.zero is not None:
            q["zero"] = S._squeeze(x.zero, lay)
        set_path(quant, path, q)
        return w

    params = jax.tree_util.tree_map_with_path(visit, qparams, is_leaf=is_qtensor)
    return {"params": params, "quant": quant}


def fake_quantize(qat_params: dict[str, Any], cfg: QuantConfig) -> Params:
    """The float tree the model runs on during QAT: every leaf the recipe quantizes replaced by its fake-quantized
    value (straight-through; learned step sizes where `quant` has them), everything else unchanged. Same tree
    structure and dtypes as `qat_params["params"]`. Call it inside the loss function (it traces under jit).

    A `rotate: hadamard` leaf is quantized in the rotated basis, as PTQ stores it: Q fq(Qᵀ W), so its value is the
    dequantized weight of `convert`'s QTensor."""
    def leaf(path, w, p, q):
        if q is None and p.lsq:
            raise ValueError(f"{path}: the recipe learns this step size (lsq: true) but qat_params has no 'quant' "
                             "entry for it; build qat_params with jq.qat.init(params, cfg)")
        v = to_basis(w, p)
        if q is not None:
            v = S.lsq_fake_quant(v, q, p.scheme, p.layout)
        else:
            v = S.fake_quant(v, p.scheme, p.layout, p.ste, p.trust)
        return from_basis(v, p).astype(w.dtype)

    return _map_planned(leaf, qat_params, cfg)


def _map_planned(leaf: Callable[[str, Any, LeafPlan, dict | None], Any], qat_params: dict[str, Any],
                 cfg: QuantConfig) -> Params:
    """Map `leaf(path, w, plan, learned quant params or None)` over the leaves the recipe quantizes; the others
    pass through."""
    quant = qat_params.get("quant") or {}

    def visit(kp, w):
        path = path_str(kp)
        p = plan(path, w, cfg)
        return w if p is None else leaf(path, w, p, get_path(quant, path, None))

    return jax.tree_util.tree_map_with_path(visit, qat_params["params"], is_leaf=is_qtensor)


def convert(qat_params: dict[str, Any], cfg: QuantConfig, calib: Stats | dict | None = None) -> Params:
    """The quantized tree, as `jq.quantize_params` returns it: QTensors at the quantized leaves.

    Without learned step sizes this *is* `quantize_params(qat_params["params"], cfg, calib)`; leaves with learned
    step sizes are encoded with them (the codes and scales the fake-quantized forward rounded to)."""
    if not jax.tree_util.tree_leaves(qat_params.get("quant") or {}):
        return quantize_params(qat_params["params"], cfg, calib)

    def leaf(path, w, p, q):
        if q is None:
            return quantize_leaf(path, w, p.rule, _stats_for(calib, path))
        wb = to_basis(jnp.asarray(w), p)
        out = _lsq_qtensor(wb, q, p.scheme, p.layout)  # rotation set by the scheme
        check_scales(path, wb, out, p.scheme)  # learned step sizes must fit scale_dtype too
        return out

    return _map_planned(leaf, qat_params, cfg)


def decay_mask(qat_params: dict[str, Any]) -> dict[str, Any]:
    """A weight-decay mask for `optax.adamw(mask=...)`: True on float weights with ≥ 2 dims, False on vectors
    (norms, biases) and on every learned quantization parameter."""
    return {
        "params": jax.tree_util.tree_map(lambda x: getattr(x, "ndim", 0) >= 2, qat_params["params"]),
        "quant": jax.tree_util.tree_map(lambda x: False, qat_params.get("quant") or {}),
    }
