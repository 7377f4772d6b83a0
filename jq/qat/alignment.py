"""Gradient alignment of a QAT estimator: QuEST's diagnostic (Panferov et al. 2025), here as a function.

The gradient a QAT step applies to the float masters comes through the recipe's fake-quantized forward and its
straight-through / trust estimator; the gradient it stands in for is the float model's own at the same weights.
Their cosine, over the leaves the recipe quantizes, says how much of the step points where full precision would:
1 for an exact estimator, lower as quantization noise (rounding, clipping, quantized activations upstream) bends
it. QuEST's trust mask is meant to raise it by dropping the gradients of values the grid moved far; measuring it
per recipe says where that pays.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jq.qat.tree import LeafPlan, fake_quantize, init, plan, to_basis
from jq.tree.paths import path_str
from jq.tree.recipe import QuantConfig

__all__ = ["gradient_alignment", "module_of"]

Loss = Callable[[Any, Any, "QuantConfig | None"], jax.Array]


def module_of(path: str) -> str:
    """The group a leaf path reports under: its module's name ('layers_3/attn/q_proj/kernel' → 'q_proj')."""
    parts = path.split("/")
    return parts[-2] if len(parts) > 1 else parts[0]


def _sums(gq: Any, gf: Any, plans: dict[str, LeafPlan], group: Callable[[str], str]) -> dict[str, np.ndarray]:
    """Per group: [Σ gq·gf, Σ gq², Σ gf², entries where gq ≈ 0 but gf is not, entries] over the quantized leaves, each
    gradient taken in the basis the leaf's codes live in (`to_basis`: Qᵀ g for `rotate: hadamard`, an orthogonal
    map, so the cosines are the same and the zeros are where the trust mask put them)."""
    out: dict[str, np.ndarray] = {}
    flat_f = {path_str(kp): g for kp, g in jax.tree_util.tree_flatten_with_path(gf)[0]}
    for kp, a in jax.tree_util.tree_flatten_with_path(gq)[0]:
        path = path_str(kp)
        if path not in plans:
            continue
        a, b = (np.asarray(to_basis(jnp.asarray(g, jnp.float32), plans[path]), np.float64) for g in (a, flat_f[path]))
        tiny = 1e-5 * np.sqrt(np.mean(b * b))  # zero up to the rotation's round-off; a live entry this small: ~1e-5
        row = np.array([np.sum(a * b), np.sum(a * a), np.sum(b * b), np.sum((np.abs(a) <= tiny) & (np.abs(b) > tiny)),
                        a.size])
        out[group(path)] = out.get(group(path), 0) + row
    return out


def _cosine(row: np.ndarray) -> float:
    return float(row[0] / np.sqrt(row[1] * row[2])) if row[1] > 0 and row[2] > 0 else float("nan")


def gradient_alignment(loss: Loss, params: Any, cfg: QuantConfig, batches: Iterable[Any], *,
                       group: Callable[[str], str] = module_of) -> dict[str, Any]:
    """How well `cfg`'s QAT gradient agrees with the float gradient at `params`, batch by batch and summed.

    loss(params, batch, act_cfg) → scalar: the model's loss with its weights `params` and its activations fake-
    quantized by `act_cfg` (None: float), e.g. `jq.apps.finetune_setup.make_loss` per cfg. The QAT gradient is
    d loss(fake_quantize(params, cfg), batch, cfg) / d params — the estimator's, learned step sizes at their
    `jq.qat.init` values — and the reference
    d loss(params, batch, None) / d params, both on the float masters; compared over the leaves `cfg` quantizes.
    Returns {"cosine": of the gradients summed over the batches (one optimizer step's), "cosine_per_batch": [B],
    "norm_ratio": |g_qat| / |g_float| (summed), "zero_fraction": entries the QAT gradient zeroes where the float
    one is not, in the codes' basis (the weights' trust mask), "loss_float" / "loss_qat":
    means over the batches, "groups": {group(path): cosine of the summed gradients}, "leaves": quantized leaves}."""
    plans = {}
    for kp, w in jax.tree_util.tree_flatten_with_path(params)[0]:
        if (p := plan(path_str(kp), w, cfg)) is not None:
            plans[p.path] = p
    if not plans:
        raise ValueError(f"recipe {cfg.name!r} quantizes no leaf of these params: nothing to compare gradients on")
    float_grad = jax.jit(jax.value_and_grad(lambda p, b: loss(p, b, None)))
    quant = init(params, cfg)["quant"]  # learned step sizes (lsq: true) at their initial values, held fixed
    qat_grad = jax.jit(jax.value_and_grad(lambda p, b: loss(fake_quantize({"params": p, "quant": quant}, cfg), b,
                                                             cfg)))
    totals_q = totals_f = None
    per_batch, losses_f, losses_q = [], [], []
    for batch in batches:
        lf, gf = float_grad(params, batch)
        lq, gq = qat_grad(params, batch)
        per_batch.append(_cosine(sum(_sums(gq, gf, plans, group).values())))
        losses_f.append(float(lf))
        losses_q.append(float(lq))
        totals_f = gf if totals_f is None else jax.tree_util.tree_map(jnp.add, totals_f, gf)
        totals_q = gq if totals_q is None else jax.tree_util.tree_map(jnp.add, totals_q, gq)
    if not per_batch:
        raise ValueError("gradient_alignment: no batches given")
    groups = _sums(totals_q, totals_f, plans, group)
    whole = sum(groups.values())
    return {"cosine": _cosine(whole), "cosine_per_batch": per_batch,
            "norm_ratio": float(np.sqrt(whole[1] / whole[2])) if whole[2] > 0 else float("nan"),
            "zero_fraction": float(whole[3] / whole[4]), "loss_float": float(np.mean(losses_f)),
            "loss_qat": float(np.mean(losses_q)), "groups": {k: _cosine(v) for k, v in sorted(groups.items())},
            "leaves": len(plans)}
