"""N-D weights as matrices and einsum strings as dot_general (`jq.ops.matrix_view`): the view holds the same
weights for every stored kind (int groups, asymmetric zeros, codebook tables, a sparse term), qeinsum on QTensors
equals einsum on the dequantized weight, and the strings no dot_general expresses fall back."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jq
from jq.algorithms.rtn import rtn
from jq.algorithms.stats import LayerStats
from jq.numbers.scheme import Scheme
from jq.ops.matrix_view import einsum_dimension_numbers, matrix_view
from jq.tree.quantize import quantize_leaf
from jq.tree.recipe import recipe_from_dict


_rtn = jax.jit(rtn, static_argnums=(1, 2))  # one compile instead of many eager ops


def _q(shape, axes, **scheme):
    w = jax.random.normal(jax.random.key(0), shape)
    s = Scheme(**scheme)
    return _rtn(w, s, s.layout(shape, axes))


@pytest.mark.parametrize("kind", ["int4_g8_asym", "int8_channel", "cb3", "gptvq"])
def test_the_view_of_a_dense_general_kernel_holds_the_same_weights(kind):
    shape, axes = (4, 16, 3, 8), (0, 1)
    if kind == "int4_g8_asym":
        q = _q(shape, axes, format="int4", group_size=8, symmetric=False)
    elif kind == "int8_channel":
        q = _q(shape, axes, format="int8", granularity="channel")
    else:
        rule = {"cb3": {"method": "kmeans", "format": "cb3", "granularity": "channel", "options": {"iters": 3}},
                "gptvq": {"method": "gptvq", "format": "cb4x2", "group_size": 8, "options": {"iters": 3}}}[kind]
        r = recipe_from_dict({"name": "x", "rules": [{"pattern": ".*", "axes": list(axes), **rule}]}).rules[0]
        q = quantize_leaf("a/kernel", jax.random.normal(jax.random.key(0), shape), r, LayerStats(hessian=jnp.eye(64)))
    x = jax.random.normal(jax.random.key(1), (2, 5, 4, 16))
    xv, qv, out = matrix_view(x, q, (((2, 3), (0, 1)), ((), ())))
    assert qv.shape == (64, 24) and xv.shape == (2, 5, 64) and out == (2, 5, 3, 8)
    np.testing.assert_array_equal(np.asarray(qv.dequantize()), np.asarray(q.dequantize()).reshape(64, 24))
    got = jq.ops.qdot_general(x, q, (((2, 3), (0, 1)), ((), ())))
    want = jnp.einsum("bthd,hdij->btij", x, q.dequantize())
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


def test_no_view_where_the_bytes_are_not_a_matrix():
    x = jax.random.normal(jax.random.key(1), (2, 4, 16))
    dn = (((1, 2), (0, 1)), ((), ()))
    assert matrix_view(x, _q((4, 16, 8), (0, 1), format="int4", group_size=8), dn) is not None
    assert matrix_view(x, _q((4, 12, 8), (0, 1), format="int4", group_size=8, pad=True), dn) is None  # padded
    assert matrix_view(x[:, 0], _q((16, 8), (0,), format="int4", group_size=8), (((1,), (0,)), ((), ()))) is None
    # a weight contracting a later axis is transposed as stored (packed codes, scales), never dequantized
    nk = _q((8, 16), (1,), format="int4", group_size=8)
    xv, qv, out = matrix_view(x[:, 0], nk, (((1,), (1,)), ((), ())))
    assert qv.shape == (16, 8) and qv.layout.axes == (0,) and out == (2, 8)
    np.testing.assert_array_equal(np.asarray(qv.dequantize()), np.asarray(nk.dequantize()).T)
    mid = _q((4, 16, 8), (1,), format="int4", group_size=8)
    xv, qv, out = matrix_view(jnp.ones((2, 3, 16)), mid, (((2,), (1,)), ((), ())))
    assert qv.shape == (16, 32) and out == (2, 3, 4, 8)
    np.testing.assert_array_equal(np.asarray(qv.dequantize()),
                                  np.asarray(mid.dequantize()).transpose(1, 0, 2).reshape(16, 32))


@pytest.mark.parametrize("subscripts,xs,ws", [
    ("btd,dn->btn", (2, 3, 16), (16, 8)),
    ("bhd,hdij->bij", (2, 4, 16), (4, 16, 3, 8)),  # DenseGeneral in: the view reaches the 2-D kernels
    ("btd,ndh->btnh", (2, 3, 16), (4, 16, 8)),  # an einsum kernel contracting its middle axis
    ("bd,edf->bef", (2, 16), (3, 16, 8)),  # experts as outputs
    ("ebd,edf->ebf", (3, 2, 16), (3, 16, 8)),  # a batch dimension
    ("btnh,nhd->btd", (2, 3, 4, 8), (4, 8, 16)),  # an output projection
])
def test_qeinsum_equals_einsum_on_the_dequantized_weight(subscripts, xs, ws):
    ins = subscripts.split("->")[0].split(",")[1]
    axes = tuple(i for i, c in enumerate(ins) if c not in subscripts.split("->")[1])
    q = _q(ws, axes, format="int4", group_size=8)
    x = jax.random.normal(jax.random.key(2), xs)
    got = jax.jit(lambda x, q: jq.ops.qeinsum(subscripts, x, q))(x, q)
    np.testing.assert_allclose(np.asarray(got), np.asarray(jnp.einsum(subscripts, x, q.dequantize())), rtol=1e-5,
                               atol=1e-5)


def test_einsum_strings_no_dot_general_expresses_fall_back():
    assert einsum_dimension_numbers("btd,dn->btn", 3, 2) == ((((2,), (0,)), ((), ())), (0, 1, 2))
    assert einsum_dimension_numbers("btd,ndh->bthn", 3, 3)[1] == (0, 1, 3, 2)
    for s, a, b in (("...d,dn->...n", 2, 2), ("bd,dn->b", 2, 2), ("bd,dd->bd", 2, 2), ("bd,dn", 2, 2),
                    ("bd,dn->bn", 3, 2)):
        assert einsum_dimension_numbers(s, a, b) is None, s
    q = _q((16, 8), (0,), format="int4", group_size=8)
    x = jax.random.normal(jax.random.key(3), (2, 16))
    np.testing.assert_allclose(np.asarray(jq.ops.qeinsum("bd,dn->b", x, q)),
                               np.asarray(jnp.einsum("bd,dn->b", x, q.dequantize())), rtol=1e-5, atol=1e-5)
