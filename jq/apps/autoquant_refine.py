"""Measured refinement of an allocation (`jq autoquant --refine N`).

The solver picks, among thousands of (layer, candidate) estimates, the trades that look cheapest — so it picks the
layers whose cost the estimate underrates most (a winner's curse). Measured on SmolLM2 over QuaRot at 4.0 bits: the
logits' KL of the 18 layers an allocation lowered was 3.8× what the Kronecker estimate charged them, while the 33 it
raised were charged right. So: the layers an allocation gives fewer bits per weight than the budget's average are
re-scored by measurement (the KL when that layer alone is quantized), brought to the estimate's units by a ratio
fitted on a random sample of layers (measured too, so the ratio is not biased by the selection), and the budget is
solved again — for `rounds` rounds or until every lowered layer has been measured.

A margin widens "lowered" to the layers chosen up to `margin` bits above the average: where several candidates sit
near the average width (int zero points or a refit, group 128 or 64), which of them a layer takes also rests on
the estimate alone unless those layers are measured too.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from jq.apps.autoquant import choose, parse_budget, sensitivity_tables
from jq.models.family import LoadedModel
from jq.tree.recipe import QuantConfig


def _target_bits(sens: dict[str, Any], budget: str) -> float:
    """The budget as average bits per weight over the candidates' layers (a size budget: what is left for them)."""
    kind, value = parse_budget(budget)
    if kind == "seconds":
        raise ValueError(f"budget {budget}: refinement re-scores layers given fewer bits than the budget's average, "
                         "so it needs a size budget (3.5bpw or 150MB), not a time")
    n = sum(row["weights"] for row in sens["layers"].values())
    return value if kind == "bpw" else (value - sens["fixed_bytes"]) * 8 / n


def refine(m: LoadedModel, candidates: Sequence[QuantConfig], calib: np.ndarray, sens: dict[str, Any], budget: str,
           *, rounds: int = 2, margin: float = 0.0, sample: int = 8, kl_samples: int = 4, kl_stride: int = 1,
           seed: int = 0, base: QuantConfig | None = None, progress: Callable[[str], None] | None = None,
           tables: Callable[..., dict[str, Any]] = sensitivity_tables
           ) -> tuple[dict[str, Any], dict[str, Any]]:
    """`choose(sens, budget)` with the lowered layers' costs measured instead of estimated.

    m, candidates, calib (int [S, T]), base: as the sensitivities were measured (`sensitivity_tables`; the KL on
    `kl_samples` rows, every `kl_stride`-th position); sens: their estimated table (any metric). `sample` random
    layers are measured first, every candidate, to fit ratio = Σ measured KL / Σ estimate over their finite pairs;
    then each round measures the layers the current choice puts below the budget's bits per weight (+ `margin`
    bits) and not measured yet, sets their cost row to KL / ratio, and solves again.
    Returns (the choice as `choose` returns it, the refined table: its "measured" lists the re-scored layers in order,
    "kl_ratio" the fitted ratio). `tables`: what measures, `sensitivity_tables` or one with its arguments that keeps
    the measurements (`jq.apps.autoquant_cache.cached_tables`, bound to a file: a stopped refinement resumes)."""
    if rounds < 1 or sample < 1:
        raise ValueError(f"refine(rounds={rounds}, sample={sample}): both must be at least 1")
    if not margin >= 0:
        raise ValueError(f"refine(margin={margin}): the margin is bits above the budget's average, 0 or more")
    target = _target_bits(sens, budget) + margin
    paths = list(sens["layers"])
    rng = np.random.default_rng(seed)
    probe = sorted(rng.choice(paths, size=min(sample, len(paths)), replace=False).tolist())

    def measure(layers: list[str]) -> dict[str, list[float]]:
        each = (lambda what: progress(f"by the measured KL: {what}")) if progress else None  # per layer measured
        kl = tables(m, candidates, calib, ("kl",), each, only=layers, kl_samples=kl_samples,
                    kl_stride=kl_stride, base=base)["kl"]
        return {p: kl["layers"][p]["cost"] for p in layers}

    measured = measure(probe)
    pairs = [(e, k) for p in probe for e, k in zip(sens["layers"][p]["cost"], measured[p])
             if np.isfinite(e) and np.isfinite(k)]
    est_sum = sum(e for e, _ in pairs)
    if not pairs or est_sum <= 0:
        raise ValueError(f"refine: the {len(probe)} sampled layers have no finite positive estimates to fit the "
                         "KL / estimate ratio to; sample more layers (sample=...)")
    ratio = sum(k for _, k in pairs) / est_sum
    refined = copy.deepcopy(sens)
    refined.update(metric=f"{sens['metric']}, lowered layers measured (kl)", kl_ratio=ratio, measured=[])

    def adopt(rows: dict[str, list[float]]) -> None:
        for p, row in rows.items():
            refined["layers"][p]["cost"] = [k / ratio for k in row]
            refined["measured"].append(p)

    adopt(measured)
    for _ in range(rounds):
        chosen = choose(refined, budget)
        rows = refined["layers"]
        lowered = [p for p, c in chosen["choice"].items()
                   if p not in refined["measured"] and rows[p]["bits"][c] / rows[p]["weights"] < target]
        if not lowered:
            return chosen, refined
        adopt(measure(lowered))
    return choose(refined, budget), refined
