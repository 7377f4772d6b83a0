"""The best mix of candidate recipes for a size budget, written as an ordinary recipe (`jq autoquant`:
`jq.apps.autoquant_cli`; the cache: `autoquant_cache`; measured refinement: `autoquant_refine`).

1. Sensitivity: for each layer and each candidate (a single-rule recipe: RTN / HQQ on any grid, or a calibrated
   method such as GPTQ, run per layer on the float model's input Hessians), the estimated loss increase
   (`jq.algorithms.allocate`): `metric="kfac"` (the default) the Kronecker Fisher, ½ Σ_j g_j ΔW[:, j]ᵀ H ΔW[:, j]
   with the layer's input Hessian H and a per-output-channel g fitted to the diagonal Fisher (in units of the
   model's loss, so layers compare, and aware of the input correlations an error-compensating method like GPTQ
   exploits); `metric="fisher"` ½ Σ F ⊙ (W − Ŵ)² under the diagonal Fisher F = E[(∂loss/∂W)²] of the float model
   on calibration text (SqueezeLLM's sensitivity; it overcharges GPTQ); `metric="hessian"` the layer's own output
   error tr(ΔWᵀ H ΔW) (local, and blind to how an early layer's error grows downstream); `metric="kl"` no estimate but
   the measured KL divergence of the model's next-token distributions from the float model's when that layer alone
   is quantized (one forward pass per layer and candidate, resumed from the first block that reads the layer: the
   reference the estimates are checked against, `jq.apps.logit_kl`). And the candidate's stored bits.
2. Allocation: one candidate per layer minimising the summed error within the budget — bits per linear weight
   (`3.5bpw`, as reports count `linear_bits_per_weight`), the whole model's bytes (`150MB`), or the quantized layers'
   summed matmul time measured on this device at M tokens (`2ms`, `jq.apps.latency`) — exactly, by dynamic
   programming over the budget.
3. The result is a YAML recipe with one explicit rule per layer, to inspect, edit and run with `jq eval` /
   `jq quantize`; the sensitivities are returned too (`jq.apps.autoquant_cache` keeps them for other budgets).
"""

from __future__ import annotations

import functools
import re
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jq.algorithms.allocate import allocate, fisher_cost, hessian_cost, kfac_cost
from jq.apps.latency import matmul_seconds
from jq.apps.logit_kl import logit_kl
from jq.apps.pipeline import rotated
from jq.apps.perplexity import window_nll_sum
from jq.calibration.capture import batched, capture
from jq.models.family import LoadedModel
from jq.tree.paths import leaf_paths, replaced
from jq.tree.quantize import quantize_leaf
from jq.tree.recipe import QuantConfig, recipe_from_dict, recipe_to_dict

__all__ = ["parse_budget", "sensitivities", "sensitivity_tables", "choose", "fits", "summarize", "recipe_of", "uniform",
           "autoquant", "DEFAULT_CANDIDATES"]

DEFAULT_CANDIDATES = ["rtn_w2_g128", "rtn_w3_g128", "hqq_w3_g64", "rtn_w4_g128", "rtn_w4_g64", "hqq_w4_g64",
                      "rtn_w5_g128", "rtn_w6_g128", "rtn_w8_g128"]
METRICS = ("fisher", "kfac", "hessian", "kl")

_BUDGET = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*(bpw|mb|gb|kb|ms|us|s)\s*$", re.IGNORECASE)
_UNITS = {"kb": ("bytes", 1e3), "mb": ("bytes", 1e6), "gb": ("bytes", 1e9), "bpw": ("bpw", 1.0),
          "s": ("seconds", 1.0), "ms": ("seconds", 1e-3), "us": ("seconds", 1e-6)}


def parse_budget(text: str) -> tuple[str, float]:
    """'3.5bpw' → ("bpw", 3.5); '150MB' → ("bytes", 150e6); '2.5ms' → ("seconds", 0.0025): the summed measured
    matmul latency of the layers autoquant quantizes. ValueError naming the value and the forms."""
    m = _BUDGET.match(str(text))
    if not m:
        raise ValueError(f"budget {text!r}: write bits per linear weight (e.g. 3.5bpw), the model's size (e.g. "
                         "150MB, 0.2GB) or the quantized layers' matmul time (e.g. 2.5ms, 800us)")
    kind, scale = _UNITS[m.group(2).lower()]
    return kind, float(m.group(1)) * scale


def _candidate_rule(cfg: QuantConfig) -> dict[str, Any]:
    """The single quantizing rule of a candidate recipe, as a YAML-shaped dict."""
    rules = [r for r in recipe_to_dict(cfg)["rules"] if not r.get("skip")]
    whole_model = cfg.rotation is not None or cfg.lowrank is not None or any(r.get("transforms") for r in rules)
    if len(rules) != 1 or whole_model:
        raise ValueError(f"candidate recipe {cfg.name!r}: autoquant takes single-rule recipes that quantize each layer "
                         "on its own (RTN / HQQ on any grid, GPTQ; e.g. rtn_w4_g64, hqq_w4_g64, gptq_w4_g128); it "
                         f"has {len(rules)} quantizing rules"
                         f"{', a rotation / transform / low-rank part acting across layers' if whole_model else ''}")
    return rules[0]


def fisher_diagonal(m: LoadedModel, calib: np.ndarray, paths: Sequence[str], batch: int = 1) -> dict[str, jax.Array]:
    """E[(∂ mean next-token NLL / ∂W)²] over the batches of `calib` (int [S, T]) for the leaves `paths`: the
    diagonal of the empirical Fisher, each of its weight's shape (batches of one window by default: the gradient's
    activations for a batch of two took ~4 GB on SmolLM2)."""
    module = m.family.module(m.cfg)
    want = set(paths)

    def loss(params, ids):
        return window_nll_sum(module.apply({"params": params}, ids), ids) / (ids.shape[0] * (ids.shape[1] - 1))

    grad = jax.jit(jax.grad(loss))
    acc: dict[str, jax.Array] = {}
    batches = batched(calib, batch)
    for ids in batches:
        for path, g in leaf_paths(grad(m.params, ids)):
            if path in want:
                acc[path] = acc.get(path, 0.0) + jnp.square(g.astype(jnp.float32)) / len(batches)
    return acc


def sensitivities(m: LoadedModel, candidates: Sequence[QuantConfig], calib: np.ndarray,
                  progress: Callable[[str], None] | None = None, metric: str = "kfac", **options: Any
                  ) -> dict[str, Any]:
    """Per layer the candidates' estimated cost under one `metric` and their stored bits: `sensitivity_tables` for
    that metric alone (options as there).

    calib: token ids int [S, T]. Returns {"candidates": [names], "metric", "layers": {path: {"weights": n,
    "float_bytes", "cost": [C], "bits": [C]}}, "fixed_bytes": bytes of the leaves no candidate quantizes, "seconds"};
    a candidate that refuses a layer (a group size that does not divide it) gets cost inf there."""
    return sensitivity_tables(m, candidates, calib, (metric,), progress, **options)[metric]


def _online_rotations(m: LoadedModel, base: QuantConfig | None) -> dict[str, Any]:
    """Per layer path the `rotate` value (online rotation of its input) of the base recipe's rule for it."""
    if base is None:
        return {}
    rule_dicts, out = recipe_to_dict(base)["rules"], {}
    for path, w in leaf_paths(m.params):
        r = base.rule_for(path, np.ndim(w))
        if r is not None and r.scheme is not None and r.scheme.policy.rotation is not None:
            out[path] = rule_dicts[base.rules.index(r)]["rotate"]
    return out


def sensitivity_tables(m: LoadedModel, candidates: Sequence[QuantConfig], calib: np.ndarray,
                       metrics: Sequence[str] = ("kfac",), progress: Callable[[str], None] | None = None, *,
                       fisher_samples: int = 16, kl_samples: int = 4, kl_stride: int = 1, hessian_samples: int = 32,
                       only: Sequence[str] | None = None, latency_tokens: int | None = None,
                       base: QuantConfig | None = None,
                       on_layer: Callable[[str, dict[str, dict[str, Any]]], None] | None = None
                       ) -> dict[str, dict[str, Any]]:
    """`sensitivities` under several metrics at once (each candidate quantizes each layer once): "fisher" — the loss
    increase under the diagonal Fisher of the first `fisher_samples` calibration rows —, "kfac" — under the Kronecker
    Fisher (input Hessians from the first `hessian_samples` rows) —, "hessian" — the layer's output error — or "kl" —
    measured end to end on the first `kl_samples` rows (every `kl_stride`-th position). Calibrated candidates (GPTQ)
    quantize each layer with the float model's input Hessian (the final recipe calibrates sequentially, usually a
    little better). `only`: score just these layers (to check the estimates against "kl" on a sample; such tables are
    not for `choose`).
    `latency_tokens` = M: also each candidate's measured matmul time at M tokens per layer ("latency", seconds;
    `jq.apps.latency.matmul_seconds`, once per shape and candidate), for time budgets. `base`: a recipe whose
    model-level `rotation` is applied first (QuaRot) and whose rules' online rotations (`rotate: hadamard`, e.g. before
    down_proj) every candidate takes on those layers; the chosen recipe carries both. `on_layer(path, {metric: row})`:
    called as each layer's rows are done (to keep them before a long run ends)."""
    bad = [x for x in metrics if x not in METRICS]
    if bad or not metrics:
        raise ValueError(f"metric {bad[0] if bad else None!r}; choose one of {', '.join(map(repr, METRICS))}")
    t0 = time.perf_counter()
    rule_dicts = [_candidate_rule(c) for c in candidates]
    m = rotated(m, base)
    online = _online_rotations(m, base)

    @functools.lru_cache(maxsize=None)
    def rule_of(ci: int, rotate: Any = None):
        extra = {} if rotate is None else {"rotate": rotate}
        return recipe_from_dict({"name": candidates[ci].name, "rules": [{**rule_dicts[ci], **extra}]}).rules[0]

    rules = [rule_of(ci) for ci in range(len(candidates))]
    targets = {}  # path -> which candidates have a rule for it
    for path, w in leaf_paths(m.params):
        hits = [c.rule_for(path, np.ndim(w)) for c in candidates]
        if any(r is not None and r.scheme is not None for r in hits) and (only is None or path in only):
            targets[path] = [r is not None for r in hits]
    calib, stats, fisher, kl = np.asarray(calib), None, None, None
    if {"kfac", "hessian"} & set(metrics) or any(r.needs_calibration for r in rules):  # the float model's Hessians
        stats = capture(m.family.module(m.cfg), {"params": m.params}, batched(calib[:hessian_samples], 4),
                        paths=list(targets))
    if {"fisher", "kfac"} & set(metrics):
        fisher = fisher_diagonal(m, calib[:fisher_samples], list(targets))
    if "kl" in metrics:
        kl = logit_kl(m, calib[:kl_samples], kl_stride)
    cost_of = {"fisher": lambda p, w, w_hat: fisher_cost(w, w_hat, fisher[p]),
               "kfac": lambda p, w, w_hat: kfac_cost(w, w_hat, stats[p].hessian, fisher[p]),
               "hessian": lambda p, w, w_hat: hessian_cost(w, w_hat, stats[p].hessian),
               "kl": lambda p, w, w_hat: kl(replaced(m.params, p, w_hat.astype(jnp.result_type(w))), changed=p)}
    layers, fixed, timed = {x: {} for x in metrics}, 0, {}
    for path, w in leaf_paths(m.params):
        if path not in targets:
            fixed += int(np.asarray(w).nbytes)
            continue
        if progress:
            progress(f"{path} ({len(layers[metrics[0]]) + 1}/{len(targets)})")
        cost, bits, lat = {x: [] for x in metrics}, [], []
        for ci, applies in enumerate(targets[path]):
            q = None
            if applies:
                try:
                    rule = rule_of(ci, online.get(path))
                    q = quantize_leaf(path, jnp.asarray(w), rule, stats[path] if rule.needs_calibration else None)
                except ValueError:  # this grid cannot hold this layer (e.g. a group size that does not divide it)
                    pass
            if q is None:  # not a choice here: infinitely costly, at float size
                bits.append(int(np.asarray(w).nbytes) * 8)
                lat.append(float("inf"))
                for x in metrics:
                    cost[x].append(float("inf"))
                continue
            if latency_tokens:
                key = (np.shape(w), str(jnp.result_type(w)), ci)
                timed[key] = timed[key] if key in timed else matmul_seconds(q, latency_tokens)
                lat.append(timed[key])
            w_hat = q.dequantize(jnp.float32)
            bits.append(8 * q.nbytes)
            for x in metrics:
                cost[x].append(cost_of[x](path, w, w_hat))
        for x in metrics:
            layers[x][path] = {"weights": int(np.size(w)), "float_bytes": int(np.asarray(w).nbytes), "cost": cost[x],
                               "bits": bits, **({"latency": lat} if latency_tokens else {})}
        if on_layer:
            on_layer(path, {x: layers[x][path] for x in metrics})
    seconds = time.perf_counter() - t0
    based = {} if base is None else {"base": {"name": base.name, "rotation": recipe_to_dict(base).get("rotation"),
                                              "online": online}}
    return {x: {"candidates": [c.name for c in candidates], "metric": x, "rules": rule_dicts, "layers": layers[x],
                "fixed_bytes": fixed, "seconds": seconds, **based,
                **({"latency_tokens": int(latency_tokens), "device": jax.devices()[0].device_kind}
                   if latency_tokens else {})} for x in metrics}


def _budget_units(sens: dict[str, Any], budget: str) -> tuple[list[list[int]], int]:
    """What each (layer, candidate) of `sens` uses of `budget` — stored bits, or whole nanoseconds of matmul time —
    and the budget in those units. ValueError when the budget cannot be met or measured."""
    kind, value = parse_budget(budget)
    paths = list(sens["layers"])
    n_weights = sum(sens["layers"][p]["weights"] for p in paths)
    sizes = [sens["layers"][p]["bits"] for p in paths]
    latency = [sens["layers"][p].get("latency") for p in paths]
    if kind == "seconds":
        if any(t is None for t in latency):
            raise ValueError(f"budget {budget} is a time, but these sensitivities carry no measured latencies: "
                             "measure them with latency_tokens=M (jq autoquant --latency-tokens M)")
        total = value * 1e9  # the knapsack runs in whole nanoseconds
        use = [[int(np.ceil(t * 1e9)) if np.isfinite(t) else int(total) + 1 for t in row] for row in latency]
    else:
        total = value * n_weights if kind == "bpw" else (value - sens["fixed_bytes"]) * 8
        use = sizes
        if total <= 0:
            raise ValueError(f"budget {budget}: the leaves autoquant does not quantize already take "
                             f"{sens['fixed_bytes'] / 1e6:.1f} MB; raise the budget")
    return use, int(total)


def fits(sens: dict[str, Any], budget: str, pick: Sequence[int]) -> bool:
    """Whether giving layer i of `sens` candidate pick[i] stays within `budget` (as `choose` counts it)."""
    use, total = _budget_units(sens, budget)
    return sum(row[c] for row, c in zip(use, pick)) <= total


def choose(sens: dict[str, Any], budget: str, name: str | None = None, steps: int = 200_000,
           description: str | None = None) -> dict[str, Any]:
    """The recipe (a YAML-shaped dict with one rule per layer) that minimises the summed sensitivity within
    `budget` ('3.5bpw' over the candidates' layers, '150MB' for the whole model, or '2ms' of summed matmul time of the
    candidates' layers, which needs sensitivities measured with `latency_tokens`), and what it costs. `name`,
    `description`: the recipe's (defaults say what was chosen from)."""
    use, total = _budget_units(sens, budget)
    costs = [[c if np.isfinite(c) else 1e30 for c in row["cost"]] for row in sens["layers"].values()]
    pick = allocate(costs, use, total, max(1, total // steps))
    return summarize(sens, pick, name or f"autoquant_{budget.strip().lower()}",
                     description or f"jq autoquant: {', '.join(sens['candidates'])} per layer within {budget} (least "
                     f"estimated {sens['metric']} cost)")


def summarize(sens: dict[str, Any], pick: Sequence[int], name: str, description: str) -> dict[str, Any]:
    """What `choose` returns for the choice `pick` (candidate pick[i] on layer i of `sens`): the recipe
    (`recipe_of`), its bits per linear weight, bytes, summed estimated error, layers per candidate, the choice by
    path and, when `sens` has latencies, the summed matmul time."""
    paths = list(sens["layers"])
    rows = [sens["layers"][p] for p in paths]
    n_weights = sum(r["weights"] for r in rows)
    used = sum(r["bits"][c] for r, c in zip(rows, pick))
    err = sum(r["cost"][c] if np.isfinite(r["cost"][c]) else 1e30 for r, c in zip(rows, pick))
    counts: dict[str, int] = {}
    for c in pick:
        counts[sens["candidates"][c]] = counts.get(sens["candidates"][c], 0) + 1
    recipe = recipe_of(sens, pick, name, description)
    latency = [r.get("latency") for r in rows]
    out = {"recipe": recipe, "linear_bits_per_weight": used / n_weights, "bytes": sens["fixed_bytes"] + used / 8,
           "estimated_error": err, "layers_per_candidate": counts, "choice": dict(zip(paths, pick))}
    if all(t is not None for t in latency):
        out["latency_seconds"] = float(sum(t[c] for t, c in zip(latency, pick)))
    return out


def recipe_of(sens: dict[str, Any], pick: Sequence[int], name: str, description: str) -> dict[str, Any]:
    """The recipe (YAML-shaped dict) giving each layer of `sens` the candidate `pick[i]`: one explicit rule per layer,
    with the base's rotation and online rotations when the sensitivities were measured on a base; checked to load."""
    base = sens.get("base") or {}
    online = base.get("online", {})
    rules = [{**sens["rules"][c], **({"rotate": online[p]} if p in online else {}), "pattern": re.escape(p)}
             for p, c in zip(sens["layers"], pick)]
    on = f" on {base['name']}'s rotation" if base.get("rotation") else ""
    recipe = {"name": name, "description": description + on,
              **({"rotation": base["rotation"]} if base.get("rotation") else {}), "rules": rules}
    recipe_from_dict(recipe, source=name)  # what we write must load
    return recipe


def uniform(sens: dict[str, Any], candidate: str) -> dict[str, Any]:
    """`summarize` one candidate (by name) on every layer: the uniform recipe the allocation is compared with, built
    the same way (on the same base), and its accounting."""
    c = sens["candidates"].index(candidate)
    return summarize(sens, [c] * len(sens["layers"]), candidate, f"{candidate} on every layer")


def autoquant(m: LoadedModel, candidates: Sequence[QuantConfig], calib: np.ndarray, budget: str,
              progress: Callable[[str], None] | None = None, metric: str = "kfac", base: QuantConfig | None = None
              ) -> tuple[dict[str, Any], dict[str, Any]]:
    """`sensitivities` then `choose`: (the chosen recipe and its accounting, the sensitivities to reuse)."""
    sens = sensitivities(m, candidates, calib, progress, metric, base=base)
    return choose(sens, budget), sens
