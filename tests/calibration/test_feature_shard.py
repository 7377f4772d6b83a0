"""Feature-sharded Hessians (`jq.calibration.feature_shard`) on the 8-device CPU mesh: each device holds K/8 rows,
the values match the statistics from scratch (NumPy, float64), and `gather_stats` brings them whole to the host
(where GPTQ's Cholesky and channel loop run on them like on any LayerStats)."""

import jax
import numpy as np
import pytest
from jax.sharding import Mesh

from jq.calibration.feature_shard import feature_sharded_sums, gather_stats

K = 64
X = np.random.default_rng(1).standard_normal((3, 2, 20, K)).astype(np.float32) * np.linspace(0.1, 3, K)


@pytest.fixture(scope="module")
def mesh():
    if len(jax.devices()) < 8:
        pytest.skip("needs 8 devices (XLA_FLAGS=--xla_force_host_platform_device_count=8, set by conftest)")
    return Mesh(np.array(jax.devices()[:8]), ("model",))


def test_rows_of_the_hessian_are_spread_and_the_values_are_those_of_all_batches(mesh):
    st = feature_sharded_sums([jax.numpy.asarray(x) for x in X], mesh)
    shards = st.hessian.addressable_shards
    assert len(shards) == 8 and {s.data.shape for s in shards} == {(K // 8, K)}
    assert {s.data.shape for s in st.act_absmax.addressable_shards} == {(K // 8,)}
    x = X.reshape(-1, K).astype(np.float64)
    fin = st.finalize()
    np.testing.assert_allclose(np.asarray(fin.hessian), x.T @ x / len(x), rtol=2e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(fin.act_absmax), np.abs(x).max(0), rtol=1e-6)
    assert float(fin.count) == len(x)


def test_gathered_statistics_are_whole_on_the_host(mesh):
    sharded = feature_sharded_sums(list(X), mesh).finalize()
    host = gather_stats(sharded, jax.devices("cpu")[0])
    assert host.hessian.sharding.device_set == {jax.devices("cpu")[0]} and host.hessian.shape == (K, K)
    for f in ("hessian", "act_absmean", "act_sq", "act_absmax", "count"):
        np.testing.assert_array_equal(np.asarray(getattr(host, f)), np.asarray(getattr(sharded, f)), err_msg=f)


def test_features_that_do_not_split_are_refused(mesh):
    with pytest.raises(ValueError, match="60 input features do not split over mesh axis 'model' of size 8"):
        feature_sharded_sums([np.ones((4, 60), np.float32)], mesh)
