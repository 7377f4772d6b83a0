"""Mixed precision under a budget: per-layer costs of candidate quantizations, and the exact choice of one candidate
per layer that minimises the total cost within a size budget (a multiple-choice knapsack).

Cost of a candidate at a layer: its output error under the layer's input Hessian, tr(ΔWᵀ H ΔW) with ΔW = W − Ŵ —
the expected squared change of the layer's outputs over the calibration inputs (the quantity GPTQ minimises per
layer; HAWQ-style allocation sums it over layers). Sizes are the stored bits of each candidate's QTensor, counted as
the reports count them.

Three estimates, from least to most informed: the layer's own output error under its input Hessian (local: blind to
how an early layer's error grows downstream); the diagonal Fisher F = E[(∂loss/∂W)²] (in units of the model's loss,
but blind to correlated inputs, so it overcharges an error-compensating method such as GPTQ); and the Kronecker
(K-FAC) Fisher F ≈ A ⊗ G with A the input Hessian and G's diagonal per output channel fitted to the diagonal Fisher,
which keeps both the loss units and the input correlations.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np

__all__ = ["hessian_cost", "fisher_cost", "kfac_cost", "output_sensitivity", "allocate"]


def _column_errors(w: jnp.ndarray, w_hat: jnp.ndarray, hessian: jnp.ndarray) -> jnp.ndarray:
    """ΔW[:, j]ᵀ H ΔW[:, j] per output column j [N] for w, w_hat [K..., N...] (K = H's size: the contraction axes
    flattened in order), hessian [K, K]."""
    k = hessian.shape[0]
    d = (jnp.asarray(w, jnp.float32) - jnp.asarray(w_hat, jnp.float32)).reshape(k, -1)
    return jnp.sum(d * (hessian.astype(jnp.float32) @ d), axis=0)


def hessian_cost(w: jnp.ndarray, w_hat: jnp.ndarray, hessian: jnp.ndarray) -> float:
    """tr(ΔWᵀ H ΔW) for a weight contracted over its leading axes: w, w_hat [K..., N...] with K = H's size (the
    contraction axes flattened in order), hessian [K, K]."""
    return float(jnp.sum(_column_errors(w, w_hat, hessian)))


def fisher_cost(w: jnp.ndarray, w_hat: jnp.ndarray, fisher: jnp.ndarray) -> float:
    """½ Σ F ⊙ (W − Ŵ)²: the loss increase a diagonal Fisher F (the weight's shape) predicts for the change."""
    d = jnp.asarray(w, jnp.float32) - jnp.asarray(w_hat, jnp.float32)
    return 0.5 * float(jnp.sum(fisher.astype(jnp.float32) * jnp.square(d)))


def output_sensitivity(fisher: jnp.ndarray, hessian: jnp.ndarray) -> jnp.ndarray:
    """The per-output-channel factor g [N] of a Kronecker Fisher F ≈ diag(H) ⊗ g that matches the diagonal Fisher's
    trace per output channel: g_j = Σ_i F_ij / Σ_i H_ii, so an isotropic change of column j costs the same under both.
    fisher: the weight's shape [K..., N...]; hessian [K, K] (K = the contraction axes flattened)."""
    k = hessian.shape[0]
    f = jnp.asarray(fisher, jnp.float32).reshape(k, -1)
    return jnp.sum(f, axis=0) / jnp.maximum(jnp.trace(hessian.astype(jnp.float32)), 1e-30)


def kfac_cost(w: jnp.ndarray, w_hat: jnp.ndarray, hessian: jnp.ndarray, fisher: jnp.ndarray) -> float:
    """½ Σ_j g_j · ΔW[:, j]ᵀ H ΔW[:, j]: the loss increase a Kronecker Fisher (input Hessian H [K, K], output
    factor g = `output_sensitivity(fisher, hessian)`) predicts; w, w_hat, fisher in the weight's shape [K..., N...]."""
    return 0.5 * float(jnp.sum(output_sensitivity(fisher, hessian) * _column_errors(w, w_hat, hessian)))


def allocate(costs: Sequence[Sequence[float]], sizes: Sequence[Sequence[int]], budget: int, unit: int = 1
             ) -> list[int]:
    """One candidate per layer minimising Σ cost within Σ size ≤ budget, exactly (dynamic programming over the
    budget in steps of `unit`; each size is rounded *up* to a whole unit, so the choice never exceeds the budget —
    with unit 1 the optimum is exact, with a coarser unit it is exact for the rounded-up sizes).

    costs, sizes: [L][C] (a layer may have fewer candidates); sizes in any integer unit (bits); budget: same unit.
    Returns the chosen candidate index per layer. Ties go to the smaller size, then the lower index, so the same
    inputs give the same choice. Raises ValueError when even the smallest candidates exceed the budget.
    """
    if unit < 1:
        raise ValueError(f"unit must be a positive integer, got {unit}")
    steps = budget // unit
    rounded = [[-(-int(s) // unit) for s in row] for row in sizes]
    least = sum(min(row) for row in rounded)
    if least > steps:
        raise ValueError(f"budget {budget} is below the smallest choice ({sum(min(map(int, r)) for r in sizes)}: "
                         "every layer at its smallest candidate); raise the budget or add smaller candidates")
    inf = np.inf
    best = np.zeros(steps + 1)  # best[b]: least cost of the layers so far using at most b units
    picks = []
    for cost_row, size_row in zip(costs, rounded):
        new = np.full(steps + 1, inf)
        pick = np.full(steps + 1, -1, np.int32)
        order = sorted(range(len(size_row)), key=lambda c: (size_row[c], c))
        for c in order:
            s = size_row[c]
            if s > steps:
                continue
            cand = np.full(steps + 1, inf)
            cand[s:] = best[: steps + 1 - s] + float(cost_row[c])
            better = cand < new
            new[better], pick[better] = cand[better], c
        best = new
        picks.append(pick)
    b = steps
    choice = []
    for pick, size_row in zip(reversed(picks), reversed(rounded)):
        c = int(pick[b])
        choice.append(c)
        b -= size_row[c]
    return choice[::-1]
