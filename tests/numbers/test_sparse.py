"""Dense-and-sparse QTensors (`jq.numbers.sparse`): decoding against a NumPy reference, honest size, every matmul
path of `jq.ops` (plain, online rotation, activation quantization, N-D kernels, other contractions) against the
dequantized weight, the consistency check, and the checkpoint (format 4.0, bit-exact)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jq
from jq import checkpoint as ck
from jq.algorithms.rtn import rtn
from jq.numbers import sparse
from jq.numbers.qtensor import ExecPolicy
from jq.numbers.scheme import Scheme


def _dense_and_sparse(shape=(64, 24), axes=(0,), fraction=0.05, policy=ExecPolicy(), seed=0):
    w = jax.random.normal(jax.random.key(seed), shape)
    scheme = Scheme("int4", granularity="channel")
    q = rtn(w, scheme, scheme.layout(shape, axes))
    q = dataclasses.replace(q, policy=policy)
    err = (w - q.unrotated().dequantize(jnp.float32)) ** 2
    pos = sparse.top_positions(err, sparse.outlier_count(w.size, fraction))
    return w, pos, sparse.with_sparse(q, w, pos)


def test_decode_matches_a_numpy_reference_and_the_size_counts_every_kept_weight():
    w, pos, q = _dense_and_sparse()
    ref = np.asarray(q.dense_part().dequantize(jnp.float32)).reshape(-1)
    np.add.at(ref, np.asarray(pos), np.asarray(q.sparse_value, np.float32))
    np.testing.assert_array_equal(np.asarray(q.dequantize(jnp.float32)).reshape(-1), ref)
    kept = np.asarray(q.dequantize(jnp.float32)).reshape(-1)[np.asarray(pos)]
    np.testing.assert_allclose(kept, np.asarray(w).reshape(-1)[np.asarray(pos)], rtol=2e-3, atol=2e-3)  # float16
    assert pos.shape == (round(0.05 * w.size),) and np.all(np.diff(np.asarray(pos)) > 0)
    assert q.nbytes == q.dense_part().nbytes + 6 * pos.shape[0]  # int32 position + float16 value each
    assert "5% sparse" in q.describe()


@pytest.mark.parametrize("case", ["plain", "rotated", "act_int8", "nd", "transposed"])
def test_every_matmul_path_equals_the_dequantized_weight(case):
    x = jax.random.normal(jax.random.key(1), (3, 5, 64))
    if case == "nd":  # a DenseGeneral kernel [heads, head_dim, out] contracting its two leading axes
        _, _, q = _dense_and_sparse((4, 16, 24), (0, 1))
        got = jq.ops.qdot_general(x.reshape(3, 5, 4, 16), q, (((2, 3), (0, 1)), ((), ())))
        want = jnp.einsum("bthd,hdn->btn", x.reshape(3, 5, 4, 16), q.dequantize(jnp.float32))
    elif case == "transposed":  # x · Wᵀ: the weight contracted over its output axis takes the dense-S path
        _, _, q = _dense_and_sparse()
        y = jax.random.normal(jax.random.key(2), (7, 24))
        got = jq.ops.qdot_general(y, q, (((1,), (1,)), ((), ())))
        want = y @ q.dequantize(jnp.float32).T
    else:
        policy = {"plain": ExecPolicy(), "rotated": ExecPolicy(rotation="hadamard"),
                  "act_int8": ExecPolicy(act="int8")}[case]
        _, _, q = _dense_and_sparse(policy=policy)
        got = jq.ops.qdot(x, q)
        dense = jq.ops.qdot(x, q.dense_part())  # the quantized-activation path of the codes alone
        s = q.dequantize(jnp.float32) - q.dense_part().dequantize(jnp.float32)
        want = x @ q.dequantize(jnp.float32) if case != "act_int8" else dense + x @ s
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-4)


def test_an_inconsistent_sparse_term_is_refused():
    _, _, q = _dense_and_sparse()
    with pytest.raises(ValueError, match="sparse_index without sparse_value"):
        dataclasses.replace(q, sparse_value=None).check("w")
    with pytest.raises(ValueError, match=r"w: .*sparse term: index int32\(\d+,\) and value \(3,\)"):
        dataclasses.replace(q, sparse_value=q.sparse_value[:3]).check("w")
    with pytest.raises(ValueError, match=r"option 'outliers' has value 0.7; use the share"):
        sparse.check_fraction(0.7, "method 'kmeans'")


def test_checkpoint_is_written_as_4_0_and_reads_back_bit_exact(tmp_path):
    _, _, q = _dense_and_sparse(policy=ExecPolicy(rotation="hadamard"))
    d = ck.save(tmp_path / "s", {"l": {"kernel": q}, "b": jnp.ones(3)})
    assert ck.read_meta(d)["format_version"] == "4.0"
    back = ck.load(d)[0]["l"]["kernel"]
    for f in ("codes", "scale", "sparse_index", "sparse_value"):
        np.testing.assert_array_equal(np.asarray(getattr(back, f)), np.asarray(getattr(q, f)))
    np.testing.assert_array_equal(np.asarray(back.dequantize()), np.asarray(q.dequantize()))
    plain = ck.save(tmp_path / "p", {"l": {"kernel": q.dense_part()}})
    assert ck.read_meta(plain)["format_version"] == "1.3"  # other trees keep the version older jq reads
