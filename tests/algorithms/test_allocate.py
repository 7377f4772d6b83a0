"""The budgeted choice of one candidate per layer: the exact optimum (brute force on small instances), never over
budget, deterministic; the Hessian, Fisher and Kronecker-Fisher costs against NumPy."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jq.algorithms.allocate import allocate, fisher_cost, hessian_cost, kfac_cost, output_sensitivity


def _brute(costs, sizes, budget):
    best = None
    for pick in itertools.product(*[range(len(r)) for r in costs]):
        size = sum(sizes[i][c] for i, c in enumerate(pick))
        cost = sum(costs[i][c] for i, c in enumerate(pick))
        if size <= budget and (best is None or cost < best[0] - 1e-12):
            best = (cost, pick)
    return best


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_the_choice_is_the_brute_force_optimum_and_within_budget(data):
    layers = data.draw(st.integers(1, 5))
    cands = data.draw(st.integers(1, 4))
    sizes = [[data.draw(st.integers(1, 12)) for _ in range(cands)] for _ in range(layers)]
    costs = [[data.draw(st.floats(0, 100, allow_nan=False)) for _ in range(cands)] for _ in range(layers)]
    least = sum(min(r) for r in sizes)
    budget = data.draw(st.integers(least, least + 20))
    pick = allocate(costs, sizes, budget)
    assert sum(sizes[i][c] for i, c in enumerate(pick)) <= budget
    want = _brute(costs, sizes, budget)
    assert sum(costs[i][c] for i, c in enumerate(pick)) == pytest.approx(want[0], abs=1e-9)
    assert allocate(costs, sizes, budget) == pick  # the same inputs, the same choice


def test_a_coarse_unit_rounds_sizes_up_so_the_budget_holds():
    sizes = [[30, 50, 70]] * 4
    costs = [[9.0, 4.0, 1.0]] * 4
    for unit in (1, 7, 16):
        pick = allocate(costs, sizes, 200, unit)
        assert sum(sizes[0][c] for c in pick) <= 200
    assert allocate(costs, sizes, 200, 1) == [1, 1, 1, 1]  # 16: better than 70+70+30+30 (20) or 70+50+50+30 (18)


def test_an_impossible_budget_is_named():
    with pytest.raises(ValueError, match=r"budget 5 is below the smallest choice \(8"):
        allocate([[1.0, 2.0], [1.0]], [[3, 4], [5]], 5)


def test_hessian_cost_is_the_output_error_over_the_inputs():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((200, 6))
    w, w_hat = rng.standard_normal((6, 3)), rng.standard_normal((6, 3))
    h = x.T @ x / len(x)
    want = np.sum((x @ w - x @ w_hat) ** 2) / len(x)
    assert hessian_cost(w, w_hat, h) == pytest.approx(want, rel=1e-4)


def test_kfac_cost_weights_each_output_columns_error_by_its_fitted_sensitivity():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((300, 5)) * np.array([1.0, 3.0, 0.5, 1.0, 2.0])
    x[:, 1] += 0.8 * x[:, 0]  # correlated inputs: what the diagonal Fisher cannot see
    h = x.T @ x / len(x)
    fisher = rng.uniform(0.1, 2.0, (5, 4))
    w, w_hat = rng.standard_normal((5, 4)), rng.standard_normal((5, 4))
    g = fisher.sum(0) / np.trace(h)  # per output column: the Fisher's column trace over the Hessian's trace
    np.testing.assert_allclose(output_sensitivity(fisher, h), g, rtol=1e-5)
    d = w - w_hat
    want = 0.5 * sum(g[j] * d[:, j] @ h @ d[:, j] for j in range(4))
    assert kfac_cost(w, w_hat, h, fisher) == pytest.approx(want, rel=1e-4)
    # with a diagonal Hessian and a Fisher that is exactly diag(H) ⊗ g, the two Fisher costs agree
    hd = np.diag(np.diag(h))
    exact = np.outer(np.diag(hd), g)
    assert kfac_cost(w, w_hat, hd, exact) == pytest.approx(fisher_cost(w, w_hat, exact), rel=1e-4)
    # a change along a strongly correlated direction costs what the correlated H says, not the diagonal
    assert kfac_cost(w, w_hat, h, fisher) != pytest.approx(kfac_cost(w, w_hat, hd, fisher), rel=1e-2)
