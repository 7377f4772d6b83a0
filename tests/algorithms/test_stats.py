"""LayerStats / StatSums: the one place statistics are accumulated, merged, scaled and rotated — each against the
statistics computed from scratch on the transformed data (NumPy, float64)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from jq.algorithms.stats import LayerStats, StatSums
from jq.numbers.hadamard import hadamard_matrix, hadamard_transform


def np_stats(x: np.ndarray) -> dict[str, np.ndarray]:
    x = np.asarray(x, np.float64).reshape(-1, x.shape[-1])
    n = x.shape[0]
    return {"hessian": x.T @ x / n, "act_absmean": np.abs(x).mean(0), "act_sq": (x * x).mean(0),
            "act_absmax": np.abs(x).max(0), "count": n}


def check(st: LayerStats, x: np.ndarray, fields=("hessian", "act_absmean", "act_sq", "act_absmax", "count")) -> None:
    ref = np_stats(x)
    for f in fields:
        np.testing.assert_allclose(np.asarray(getattr(st, f), np.float64), ref[f], rtol=2e-5, atol=1e-6, err_msg=f)


X = np.random.default_rng(0).standard_normal((3, 40, 16)).astype(np.float32) * np.linspace(0.2, 4, 16)


def test_streamed_sums_merge_to_the_statistics_of_all_batches():
    acc = StatSums.of(jnp.asarray(X[0]))
    for b in X[1:]:
        acc = acc.merge(StatSums.of(jnp.asarray(b)))
    check(acc.finalize(), X)
    empty = StatSums(jnp.zeros((16, 16)), jnp.zeros(16), jnp.zeros(16), jnp.zeros(16), jnp.float32(0)).finalize()
    assert float(empty.count) == 0 and np.all(np.asarray(empty.hessian) == 0)


def test_scaled_statistics_are_those_of_the_scaled_input():
    s = np.linspace(0.5, 3.0, 16).astype(np.float32)
    st = StatSums.of(jnp.asarray(X)).finalize().scaled(jnp.asarray(s))
    check(st, X / s)


def test_rotated_statistics_are_those_of_the_rotated_input_and_drop_what_does_not_rotate():
    st = StatSums.of(jnp.asarray(X)).finalize().rotated(lambda a, axis: hadamard_transform(a, axis=axis))
    q = hadamard_matrix(16, np.float64) / 4.0
    check(st, X @ q, fields=("hessian", "act_sq", "count"))
    assert st.act_absmean is None and st.act_absmax is None
    assert LayerStats(count=jnp.float32(3)).rotated(lambda a, axis: a).hessian is None


def test_mappings_coerce_and_unknown_fields_are_named():
    st = LayerStats.coerce({"hessian": jnp.eye(4), "count": 8.0})
    assert isinstance(st, LayerStats) and st.act_sq is None and LayerStats.coerce(st) is st
    assert LayerStats.coerce(None) is None
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['hess'\]; LayerStats has \['hessian'"):
        LayerStats.coerce({"hess": jnp.eye(4)})
    with pytest.raises(TypeError, match="must be a LayerStats"):
        LayerStats.coerce(np.eye(4))
