"""QTensor + RTN: every format × granularity against the plain-NumPy RTN reference (codes, scales, zero points
and the dequantized array), multi-axis layouts, pytree behaviour (jit, vmap, device_put with a sharding,
tree.map), honest size accounting and act-order permutations."""

from __future__ import annotations

import dataclasses
import functools
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jq import QTensor, Scheme
from jq.algorithms import get_method
from jqtest.npref import FP4_E2M1, NF4_QLORA, check_quantized, np_rtn

rtn = get_method("rtn")

INT_CASES = [(f"int{b}", sym, False) for b in range(2, 9) for sym in (True, False)]
INT_CASES += [("int4", True, True), ("int8", True, True), ("int3", True, True)]
FLOAT_CASES = [("fp8_e4m3", True, False), ("fp8_e5m2", True, False), ("fp4_e2m1", True, False), ("nf4", True, False)]
ALL_CASES = INT_CASES + FLOAT_CASES
SOME_CASES = [("int2", True, False), ("int3", False, False), ("int4", True, True), ("int8", False, False),
              ("fp8_e5m2", True, False), ("fp4_e2m1", True, False), ("nf4", True, False)]
# (granularity, group_size) on a (64, 24) Dense kernel; g=24 does not divide 64 (pad=True stores 72 rows)
MATRIX = [(c, ("group", 8)) for c in ALL_CASES] + [(c, ("group", 24)) for c in ALL_CASES]
MATRIX += [(c, gr) for c in SOME_CASES for gr in (("tensor", None), ("channel", None), ("group", 32))]


@functools.partial(jax.jit, static_argnums=(1, 2))
def rtn_jit(w, scheme, layout):
    """rtn, its unpacked codes and its f32 dequantization in one compiled function (one compile per scheme /
    layout instead of one per eager op, which keeps the suite fast)."""
    q = rtn(w, scheme, layout)
    return q, q.unpacked_codes(), q.dequantize(jnp.float32)


def quant(w, scheme, axes=(0,)):
    return rtn_jit(jnp.asarray(w), scheme, scheme.layout(np.shape(w), axes))


def make_weight(shape, seed=0, dtype=np.float32):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal(shape).astype(np.float32)
    w *= np.exp(rng.uniform(-2, 1, size=shape[-1:])).astype(np.float32)  # per-output-channel spread
    w.flat[rng.integers(0, w.size, 3)] *= 8.0  # a few outliers
    return w.astype(dtype)


def stored_codes_as_values(q: QTensor, codes=None) -> np.ndarray:
    """The QTensor's unpacked codes mapped to what the reference returns (ints, fp8 values or table values)."""
    c = np.asarray(q.unpacked_codes() if codes is None else codes)
    if q.fmt == "nf4":
        return NF4_QLORA[c.astype(np.int64)]
    if q.fmt == "fp4_e2m1":
        return FP4_E2M1[c.astype(np.int64)]
    return c.astype(np.float32)


def check(q: QTensor, w: np.ndarray, codes=None, deq=None, **kw):
    """`check_quantized` on a QTensor: its stored scale / zero / unpacked codes and its dequantization
    (computed here unless passed in, e.g. from `rtn_jit`)."""
    assert q.layout.shape == w.shape
    zero = None if q.zero is None else np.asarray(q.zero).astype(np.float32)
    deq = q.dequantize(jnp.float32) if deq is None else deq
    return check_quantized(w, np.asarray(q.scale).astype(np.float32), zero, stored_codes_as_values(q, codes),
                           np.asarray(deq), **kw)


def seed_of(*parts) -> int:
    return zlib.crc32(repr(parts).encode())


@pytest.mark.parametrize("case,gran", MATRIX, ids=lambda v: "-".join(map(str, v)))
def test_rtn_matches_numpy_reference(case, gran):
    (fmt, sym, restr), (gran, g) = case, gran
    k = 64
    w = make_weight((k, 24), seed=seed_of(fmt, sym, restr, gran, g))
    scheme = Scheme(fmt, symmetric=sym, restricted=restr, granularity=gran, group_size=g, pad=True)
    q, codes, deq = quant(w, scheme)
    assert isinstance(q, QTensor) and q.fmt == fmt and q.symmetric == sym and q.restricted == restr
    q.check()  # arrays agree with the static layout
    # stored layout, by hand
    n_scale_rows = {"tensor": 1, "channel": 1, "group": -(-k // (g or 1))}[gran]
    assert q.scale.shape == (n_scale_rows, 1 if gran == "tensor" else 24)
    assert q.scale.dtype == jnp.float16
    rows = -(-k // g) * g if g else k
    bits = q.format.bits
    assert q.codes.shape == ((rows // 8) * bits if bits < 8 else rows, 24)
    assert q.codes.dtype == (jnp.uint8 if bits < 8 or not sym else (jnp.int8 if fmt.startswith("int") else q.format.dtype))
    check(q, w, codes, deq, fmt=fmt, symmetric=sym, restricted=restr, granularity=gran, group_size=g, axes=(0,))


def test_rtn_eager_equals_jit():
    w = make_weight((64, 24), seed=1)
    scheme = Scheme("int4", symmetric=False, group_size=8)
    layout = scheme.layout(w.shape, (0,))
    a, b = rtn(jnp.asarray(w), scheme, layout), rtn_jit(jnp.asarray(w), scheme, layout)[0]
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize(
    "fmt,sym,sdt,zp",
    [("int4", False, "bfloat16", "int"), ("int4", False, "float32", "float"), ("int8", True, "bfloat16", "int"),
     ("nf4", True, "float32", "int"), ("int3", False, "float16", "float"), ("fp8_e4m3", True, "bfloat16", "int")],
)
def test_rtn_scale_dtypes_and_float_zero_points(fmt, sym, sdt, zp):
    w = make_weight((64, 16), seed=3)
    scheme = Scheme(fmt, symmetric=sym, group_size=16, scale_dtype=sdt, zero_point=zp)
    q, codes, deq = quant(w, scheme)
    assert q.scale.dtype == jnp.dtype(sdt)
    if not sym:
        assert q.zero.dtype == (jnp.uint8 if zp == "int" else jnp.dtype(sdt))
    check(q, w, codes, deq, fmt=fmt, symmetric=sym, group_size=16, scale_dtype=sdt, zero_point=zp)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_rtn_low_precision_weight_dtype(dtype):
    w = make_weight((32, 16), seed=4).astype(dtype)
    scheme = Scheme("int4", group_size=16)
    q, codes, deq = quant(w, scheme)
    assert q.dtype == jnp.dtype(dtype).name
    d = q.dequantize()
    assert d.dtype == dtype
    check(q, np.asarray(w, np.float32), codes, deq, fmt="int4", group_size=16)
    # the low-precision result is the f32 dequantization rounded to the weight dtype
    np.testing.assert_array_equal(np.asarray(d, np.float32), np.asarray(deq).astype(dtype).astype(np.float32))


def test_zero_group_dequantizes_to_zero():
    w = make_weight((32, 4), seed=5)
    w[:16, 1] = 0.0  # one all-zero group
    w[:, 2] = 0.0  # one all-zero channel
    for sym in (True, False):
        scheme = Scheme("int4", symmetric=sym, group_size=16)
        q, codes, deq = quant(w, scheme)
        d = np.asarray(deq)
        assert np.all(d[:16, 1] == 0) and np.all(d[:, 2] == 0)
        assert np.all(np.asarray(q.scale, np.float32) > 0)
        check(q, w, codes, deq, fmt="int4", symmetric=sym, group_size=16)


def test_rtn_error_is_bounded_by_half_a_step():
    """Independent of the reference: |w − deq| ≤ scale/2 (+ f32 slack) for unclipped symmetric int codes."""
    w = make_weight((64, 8), seed=6)
    scheme = Scheme("int8", group_size=16, scale_dtype="float32")
    q, _, deq = quant(w, scheme)
    step = np.repeat(np.asarray(q.scale, np.float32), 16, axis=0)
    err = np.abs(np.asarray(deq) - w)
    assert np.all(err <= step * 0.5 * (1 + 1e-5) + 1e-7)


# --------------------------------------------------------------------------------------------- multi-axis layout


@pytest.mark.parametrize(
    "fmt,sym,gran,g,scale_shape",
    [("int4", False, "group", 8, (4, 2, 32)), ("int4", True, "group", 4, (4, 4, 32)),
     ("int8", True, "channel", None, (1, 1, 32)), ("nf4", True, "tensor", None, (1, 1, 1)),
     ("fp8_e4m3", True, "group", 16, (4, 1, 32)), ("int3", False, "group", 8, (4, 2, 32))],
)
def test_multi_axis_kernel(fmt, sym, gran, g, scale_shape):
    w = make_weight((4, 16, 32), seed=7)
    scheme = Scheme(fmt, symmetric=sym, granularity=gran, group_size=g)
    layout = scheme.layout(w.shape, (1, 0))
    assert layout.axes == (0, 1) and layout.group_axis == 1
    assert layout.scale_shape == scale_shape
    q, codes, deq = rtn_jit(jnp.asarray(w), scheme, layout)
    assert q.scale.shape == scale_shape
    bits = q.format.bits
    assert q.codes.shape == (4, 16 * bits // 8 if bits < 8 else 16, 32)  # packed along axis 1
    check(q, w, codes, deq, fmt=fmt, symmetric=sym, granularity=gran, group_size=g, axes=(0, 1))


# ------------------------------------------------------------------------------------------------------ pytrees


def _q(w, fmt="int4", sym=False, g=16):
    return quant(w, Scheme(fmt, symmetric=sym, group_size=g))[0]


def test_tree_structure_and_tree_map():
    w = make_weight((64, 32), seed=8)
    q = _q(w)
    leaves, treedef = jax.tree.flatten(q)
    assert len(leaves) == 3  # codes, scale, zero (perm is None)
    assert len(jax.tree.leaves(_q(w, sym=True))) == 2
    q2 = jax.tree.map(lambda a: a, q)
    assert isinstance(q2, QTensor) and q2.layout == q.layout and q2.fmt == q.fmt and q2.symmetric == q.symmetric
    np.testing.assert_array_equal(np.asarray(q2.dequantize()), np.asarray(q.dequantize()))
    # doubling the scales doubles the dequantized array (the tree map reaches the array children)
    q3 = jax.tree.map(lambda a: a * 2 if a.dtype == jnp.float16 else a, q)
    np.testing.assert_allclose(np.asarray(q3.dequantize()), 2 * np.asarray(q.dequantize()), rtol=1e-6)


def test_jit_dequantize_and_jit_rtn():
    w = make_weight((64, 32), seed=9)
    scheme = Scheme("int4", symmetric=False, group_size=16)
    layout = scheme.layout(w.shape, (0,))
    q = rtn(jnp.asarray(w), scheme, layout)
    np.testing.assert_array_equal(np.asarray(jax.jit(lambda t: t.dequantize())(q)), np.asarray(q.dequantize()))
    qj = jax.jit(lambda a: rtn(a, scheme, layout))(jnp.asarray(w))
    assert isinstance(qj, QTensor) and qj.layout == layout
    for a, b in zip(jax.tree.leaves(qj), jax.tree.leaves(q)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    check(qj, w, fmt="int4", symmetric=False, group_size=16)


def test_vmap_over_stacked_qtensors():
    w1, w2 = make_weight((64, 32), seed=10), make_weight((64, 32), seed=11)
    q1, q2 = _q(w1), _q(w2)
    stacked = jax.tree.map(lambda *a: jnp.stack(a), q1, q2)
    assert stacked.codes.shape == (2,) + q1.codes.shape
    out = jax.vmap(lambda q: q.dequantize())(stacked)
    assert out.shape == (2, 64, 32)
    np.testing.assert_array_equal(np.asarray(out[0]), np.asarray(q1.dequantize()))
    np.testing.assert_array_equal(np.asarray(out[1]), np.asarray(q2.dequantize()))
    assert not np.array_equal(np.asarray(out[0]), np.asarray(out[1]))
    # vmap of a matmul with the quantized weight
    x = np.random.default_rng(0).standard_normal((2, 3, 64)).astype(np.float32)
    y = jax.vmap(lambda xi, q: xi @ q.dequantize())(jnp.asarray(x), stacked)
    np.testing.assert_allclose(np.asarray(y), np.einsum("bik,bkn->bin", x, np.asarray(out)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("scheme", [Scheme("int4", group_size=16, symmetric=False), Scheme("int8"),
                                    Scheme("nf4", group_size=16)])
def test_a_stacked_qtensors_layer_is_the_slice_quantized_alone(scheme):
    """`QTensor.layer(i)` of a weight stacked on a leading layer axis [L, K, N] (contracted along K) is what
    quantizing layer i alone gives: same layout, codes and values (RTN works per group, so per layer)."""
    w = make_weight((3, 64, 32), seed=13)
    q = rtn(w, scheme, scheme.layout((3, 64, 32), (1,)))
    assert q.takes_layers
    for i in range(3):
        alone = rtn(w[i], scheme, scheme.layout((64, 32), (0,)))
        qi = q.layer(i)
        assert qi.layout == alone.layout
        qi.check()
        np.testing.assert_array_equal(np.asarray(qi.codes), np.asarray(alone.codes))
        np.testing.assert_array_equal(np.asarray(qi.dequantize()), np.asarray(q.dequantize())[i])
    contracted = rtn(w, scheme, scheme.layout((3, 64, 32), (0, 1)))
    assert not contracted.takes_layers
    with pytest.raises(ValueError, match="no per-layer slice"):
        contracted.layer(0)


def test_device_put_with_named_sharding():
    devices = np.array(jax.devices())
    assert devices.size == 8, "tests/conftest.py should provide 8 CPU devices"
    mesh = Mesh(devices, ("x",))
    w = make_weight((64, 32), seed=12)
    q = _q(w)  # codes (32, 32) packed along axis 0; scale / zero (4, 32)
    sharding = NamedSharding(mesh, P(None, "x"))  # along the output axis
    qs = jax.device_put(q, sharding)
    assert isinstance(qs, QTensor)
    for a in jax.tree.leaves(qs):
        assert a.sharding == sharding
        assert len(a.addressable_shards) == 8 and a.addressable_shards[0].data.shape[1] == 4
    expect = np.asarray(q.dequantize())
    np.testing.assert_array_equal(np.asarray(qs.dequantize()), expect)
    out = jax.jit(lambda t: t.dequantize())(qs)
    np.testing.assert_array_equal(np.asarray(out), expect)
    # a matmul on the sharded weight
    x = np.random.default_rng(1).standard_normal((5, 64)).astype(np.float32)
    y = jax.jit(lambda a, t: a @ t.dequantize())(jnp.asarray(x), qs)
    np.testing.assert_allclose(np.asarray(y), x @ expect, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------ size accounting


@pytest.mark.parametrize(
    "shape,scheme,bpw",
    [
        ((256, 96), Scheme("int4", symmetric=False, group_size=128), 4 + 16 / 128 + 8 / 128),
        ((256, 96), Scheme("int4", group_size=128), 4 + 16 / 128),
        ((64, 20), Scheme("int8", scale_dtype="float32"), 8 + 32 / 64),
        ((128, 16), Scheme("nf4", group_size=64, scale_dtype="bfloat16"), 4 + 16 / 64),
        ((64, 32), Scheme("fp8_e4m3", granularity="tensor"), 8 + 16 / (64 * 32)),
        ((64, 16), Scheme("int3", symmetric=False, group_size=32, zero_point="float"), 3 + 16 / 32 + 16 / 32),
        ((64, 20), Scheme("int4", group_size=24, pad=True), 8 * (36 * 20 + 3 * 20 * 2) / (64 * 20)),
        ((64, 8), Scheme("int2", granularity="channel"), 2 + 16 / 64),
    ],
    ids=lambda v: getattr(v, "describe", lambda: str(v))(),
)
def test_bits_per_weight_and_nbytes_hand_count(shape, scheme, bpw):
    # the sizes depend on shapes and dtypes only: an abstract evaluation gives the same QTensor structure
    layout = scheme.layout(shape, (0,))
    q = jax.eval_shape(lambda a: rtn(a, scheme, layout), jax.ShapeDtypeStruct(shape, jnp.float32))
    assert isinstance(q, QTensor)
    codes_bytes = int(np.prod(q.codes.shape))
    assert q.codes.dtype.itemsize == 1
    hand = codes_bytes + q.scale.size * q.scale.dtype.itemsize + (0 if q.zero is None else q.zero.size * q.zero.dtype.itemsize)
    assert q.nbytes == hand
    assert q.bits_per_weight == pytest.approx(bpw, rel=1e-12)
    assert q.bits_per_weight == pytest.approx(8 * hand / np.prod(shape), rel=1e-12)


def test_bits_per_weight_int4_g128_exact():
    scheme = Scheme("int4", symmetric=False, group_size=128)
    q = rtn(jnp.asarray(make_weight((256, 96), seed=14)), scheme, scheme.layout((256, 96), (0,)))
    assert (q.codes.shape, q.codes.dtype) == ((128, 96), jnp.uint8)
    assert (q.scale.shape, q.scale.dtype) == ((2, 96), jnp.float16)
    assert (q.zero.shape, q.zero.dtype) == ((2, 96), jnp.uint8)
    assert q.nbytes == 256 * 96 // 2 + 2 * 96 * 2 + 2 * 96
    assert q.bits_per_weight == 4.1875


# -------------------------------------------------------------------------------------------------- permutation


@pytest.mark.parametrize("sym", [True, False])
def test_dequantize_unpermutes(sym):
    rng = np.random.default_rng(15)
    w = make_weight((64, 16), seed=15)
    perm = rng.permutation(64).astype(np.int32)
    wp = w[perm]  # stored order: groups run over permuted rows
    scheme = Scheme("int4", symmetric=sym, group_size=16, scale_dtype="float32")
    layout = scheme.layout(w.shape, (0,))
    ref = np_rtn(wp, "int4", symmetric=sym, group_size=16, scale_dtype="float32")
    codes_g = jnp.asarray(ref["codes"].reshape(layout.grouped_shape).astype(np.int8 if sym else np.uint8))
    scale_g = jnp.asarray(np.expand_dims(ref["scale"], 1))
    zero_g = None if sym else jnp.asarray(np.expand_dims(ref["zero"], 1))
    q = scheme.make_qtensor(codes_g, scale_g, zero_g, layout, jnp.float32, perm=jnp.asarray(perm))
    assert "perm" in repr(q)
    inv = np.argsort(perm)
    expect = ref["deq"][inv]
    np.testing.assert_array_equal(np.asarray(q.dequantize()), expect)
    # the documented identity: x @ W == x[..., perm] @ stored
    stored = ref["deq"]
    x = rng.standard_normal((3, 64)).astype(np.float32)
    np.testing.assert_allclose(x @ np.asarray(q.dequantize()), x[:, perm] @ stored, rtol=1e-5, atol=1e-5)
    # without the permutation the same codes give the permuted weight (so the test above is not vacuous)
    q_noperm = dataclasses.replace(q, perm=None)
    np.testing.assert_array_equal(np.asarray(q_noperm.dequantize()), stored)
    assert not np.array_equal(stored, expect)
    # perm is counted in the stored bytes
    assert q.nbytes == q_noperm.nbytes + 64 * 4
    # and it survives jit
    np.testing.assert_array_equal(np.asarray(jax.jit(lambda t: t.dequantize())(q)), expect)


# --------------------------------------------------------------------------------------------------- small API


def test_array_like_metadata_and_indexing():
    q = _q(make_weight((64, 32), seed=16))
    assert q.shape == (64, 32) and q.ndim == 2 and q.size == 2048
    assert q[...] is q
    with pytest.raises(TypeError, match=r"cannot be indexed by 0; call \.dequantize\(\) first"):
        q[0]
    assert repr(q) == "QTensor(int4 asym g16, shape=(64, 32), axes=(0,))"


# ------------------------------------------------------------------------------------------------- flat groups


@pytest.mark.parametrize("fmt,sym,shape,axes,g", [("int4", False, (24, 8), (0,), 16), ("nf4", True, (24, 8), (0,), 32),
                                                  ("int3", True, (2, 12, 4), (0, 1), 8)])
def test_flat_groups_match_reference(fmt, sym, shape, axes, g):
    """flat_groups: groups of g consecutive elements of the weight flattened with the group axis innermost
    (PyTorch's W.reshape(-1, g) on an (out, in) weight), so groups may straddle output channels."""
    w = make_weight(shape, seed=17)
    scheme = Scheme(fmt, symmetric=sym, group_size=g, flat_groups=True)
    q, codes, deq = quant(w, scheme, axes)
    ga = max(axes)
    moved = np.moveaxis(w, ga, -1)
    rows = moved.reshape(-1, g)  # one group per row
    assert q.scale.shape == (rows.shape[0],) and codes.shape == rows.shape
    ref = check_quantized(rows, np.asarray(q.scale, np.float32)[:, None],
                          None if q.zero is None else np.asarray(q.zero, np.float32)[:, None],
                          stored_codes_as_values(q, codes), np.moveaxis(np.asarray(deq), ga, -1).reshape(rows.shape),
                          fmt=fmt, symmetric=sym, granularity="channel", axes=(1,))
    assert ref["deq"].shape == rows.shape


def test_flat_groups_equal_axis_groups_when_g_divides():
    w = make_weight((32, 8), seed=18)
    a = quant(w, Scheme("int4", symmetric=False, group_size=16, flat_groups=True))[2]
    b = quant(w, Scheme("int4", symmetric=False, group_size=16))[2]
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
