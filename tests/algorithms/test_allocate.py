"""The budgeted choice of one candidate per layer: the exact optimum (brute force on small instances), never over
budget, deterministic; the Hessian cost against NumPy."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jq.algorithms.allocate import allocate, hessian_cost


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
