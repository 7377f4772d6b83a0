"""Learned-codebook QTensors (format kind "lut", `jq.numbers.codebook`): index packing, the units view, dequantize
against a NumPy lookup, honest sizes, shape checks, clear refusals, and the checkpoint round trip."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jq.numbers import codebook as cbk
from jq.numbers.formats import get_format
from jq.numbers.qtensor import QTensor, is_qtensor
from jq.numbers.scheme import Scheme
from jq.tree.quantize import dequantize_params


def _random_codebook(scheme: Scheme, shape, axes=(0,), seed=0) -> tuple[QTensor, np.ndarray, np.ndarray, np.ndarray]:
    """A codebook QTensor with random indices [U, n], tables [U, C, d] and scales [U], and those arrays."""
    f = scheme.fmt
    lay = scheme.layout(shape, axes)
    rng = np.random.default_rng(seed)
    u = int(np.prod(lay.scale_shape))
    n = cbk.vectors_per_table(lay, f.vec)
    idx = rng.integers(0, 2**f.bits, (u, n)).astype(np.int32)
    tables = rng.uniform(-1, 1, (u, 2**f.bits, f.vec)).astype(np.float16)
    scale = rng.uniform(0.5, 2, (u,)).astype(np.float16)
    q = cbk.make_codebook_qtensor(jnp.asarray(idx), jnp.asarray(tables), jnp.asarray(scale), lay, scheme.format,
                                  jnp.float32)
    return q, idx, tables, scale


def _np_lookup(idx, tables, scale, K, N, d, g=None):
    """NumPy reference for a Dense kernel [K, N] (axes (0,)): table of (k // g, n) (g None: per channel), vector
    k // d within the group, entry k % d of the vector. idx [U, n] in the units order (U row-major over the scale
    shape: per channel U = N; per group U = (K_padded / g) · N)."""
    Kp = idx.shape[1] * d * (1 if g is None else 1) if g is None else -(-K // g) * g
    W = np.zeros((Kp, N), np.float32)
    for k in range(Kp):
        for n in range(N):
            if g is None:
                u, i = n, k // d
            else:
                u, i = (k // g) * N + n, (k % g) // d
            W[k, n] = np.float32(tables[u, idx[u, i], k % d]) * np.float32(scale[u])
    return W[:K]


@pytest.mark.parametrize("fmt,kw,shape", [("cb3", {}, (16, 5)), ("cb2x2", {}, (16, 3)), ("cb4x4", {}, (64, 2)),
                                          ("cb2", dict(group_size=8), (24, 3)),
                                          ("cb3x2", dict(group_size=16, pad=True), (20, 3)),
                                          ("cb8", {}, (300, 2))])
def test_dequantize_is_the_numpy_lookup(fmt, kw, shape):
    s = Scheme(fmt, **kw)
    q, idx, tables, scale = _random_codebook(s, shape)
    q.check()
    assert is_qtensor(q) and q.shape == shape
    ref = _np_lookup(idx, tables, scale, shape[0], shape[1], s.fmt.vec, kw.get("group_size"))
    np.testing.assert_array_equal(np.asarray(q.dequantize()), ref)
    # every consumer goes through dequantize(): the tree API gives the same array
    np.testing.assert_array_equal(np.asarray(dequantize_params({"k": q})["k"]), ref)
    np.testing.assert_array_equal(np.asarray(jax.jit(lambda t: t.dequantize())(q)), ref)


@settings(max_examples=15, deadline=None)
@given(bits=st.integers(2, 8), vec=st.sampled_from([1, 2, 4]), n_vec=st.integers(1, 40), cols=st.integers(1, 4),
       seed=st.integers(0, 2**16))
def test_index_pack_unpack_round_trips(bits, vec, n_vec, cols, seed):
    fmt = f"cb{bits}" if vec == 1 else f"cb{bits}x{vec}"
    K = max(n_vec, 2**bits) * vec
    q, idx, _, _ = _random_codebook(Scheme(fmt), (K, cols), seed=seed)
    assert q.codes.dtype == jnp.uint8
    # indices come back in the stored layout: [K / vec, N], column n holding table n's indices
    np.testing.assert_array_equal(np.asarray(q.unpacked_codes()), idx.T)


@pytest.mark.parametrize("fmt,kw,shape,axes", [("cb3", {}, (8, 6, 5), (0, 1)), ("cb2x2", dict(group_size=8), (8, 8, 5), (0, 1)),
                                               ("cb2", dict(granularity="tensor"), (8, 6), (0,)),
                                               ("cb2x2", dict(group_size=8, flat_groups=True), (8, 6), (0,)),
                                               ("cb2", dict(group_size=4, pad=True), (6, 10), (1,))])
def test_units_view_round_trips(fmt, kw, shape, axes):
    s = Scheme(fmt, **kw)
    lay = s.layout(shape, axes)
    d = s.fmt.vec
    xg = lay.to_grouped(jnp.arange(np.prod(shape), dtype=jnp.float32).reshape(shape))
    u = cbk.to_units(xg, lay, d)
    assert u.shape[0] == int(np.prod(lay.scale_shape)) and u.shape[1] == cbk.vectors_per_table(lay, d)
    # vectors hold consecutive stored weights along the pack axis
    first = np.asarray(u[..., 0]).reshape(-1)
    stored = np.asarray(xg).reshape(lay.stored_shape)
    back = np.asarray(cbk.from_units(u[..., 0], lay, d))
    np.testing.assert_array_equal(back, jax.lax.slice_in_dim(stored, 0, None, stride=d, axis=lay.pack_axis))
    assert sorted(first.tolist()) == sorted(back.reshape(-1).tolist())
    # a full QTensor in this layout decodes tables at the right places
    q, *_ = _random_codebook(s, shape, axes)
    q.check()
    assert q.dequantize().shape == shape


def test_bits_per_weight_counts_indices_tables_and_scales():
    K, N = 576, 64
    for fmt, b, d in (("cb3", 3, 1), ("cb2", 2, 1), ("cb6x2", 6, 2)):
        q, *_ = _random_codebook(Scheme(fmt), (K, N))
        want = (K // d * b * N + 16 * N * (2**b * d + 1)) / (K * N)
        assert q.bits_per_weight == pytest.approx(want)
        assert q.nbytes == q.codes.nbytes + q.scale.nbytes + q.codebook.nbytes
    assert get_format("cb8x4").bits_per_weight == 2.0
    assert Scheme("cb3").describe() == "cb3 channel"


def test_check_finds_inconsistent_codebooks():
    q, *_ = _random_codebook(Scheme("cb3"), (16, 4))
    import dataclasses

    with pytest.raises(ValueError, match="codebook shape"):
        dataclasses.replace(q, codebook=q.codebook[..., :4, :]).check("leaf")
    with pytest.raises(ValueError, match="codebook present/absent"):
        dataclasses.replace(q, codebook=None).check("leaf")
    shared = dataclasses.replace(q, codebook=q.codebook[:, :2])  # scale [1, 4]: tables [1, 2] serve 2 channels each
    shared.check("leaf")
    np.testing.assert_array_equal(np.asarray(shared.dequantize())[:, 1], np.asarray(  # channel 1 reads table 0
        dataclasses.replace(q, codebook=q.codebook.at[:, 1].set(q.codebook[:, 0])).dequantize())[:, 1])
    with pytest.raises(ValueError, match="codebook shape .* dims dividing"):  # 3 tables cannot split 4 channels
        dataclasses.replace(q, codebook=q.codebook[:, :3]).check("leaf")
    with pytest.raises(ValueError, match="codes shape"):
        dataclasses.replace(q, codes=q.codes[:1]).check("leaf")


def test_refusals_name_the_leaf_value_and_fix():
    lay = Scheme("cb3").layout((16, 4), (0,))
    with pytest.raises(ValueError, match=r"tables of shape .* 8 entries"):  # an index width that misses the table
        cbk.make_codebook_qtensor(jnp.zeros((4, 16), jnp.int32), jnp.zeros((4, 4, 1)), jnp.ones(4), lay, "cb3",
                                  jnp.float32)
    with pytest.raises(ValueError, match=r"a/kernel: a codebook of 256 entries .* only 64 vectors"):
        cbk.check_codebook_layout(get_format("cb8"), Scheme("cb8").layout((64, 4), (0,), "a/kernel"), "a/kernel")
    with pytest.raises(ValueError, match="larger group_size"):  # a table per group and channel (method kmeans)
        cbk.check_codebook_layout(get_format("cb4"), Scheme("cb4", group_size=8).layout((64, 4), (0,)), "a/kernel")
    with pytest.raises(ValueError, match=r"a/kernel: vectors of 4 weights \(format cb2x4\) do not divide axis 0"):
        Scheme("cb2x4").layout((66, 4), (0,), "a/kernel")
    with pytest.raises(ValueError, match="do not divide groups of 6"):
        Scheme("cb2x4", group_size=6).layout((60, 4), (0,), "a/kernel")
    with pytest.raises(ValueError, match="learned codebook .* method: kmeans"):
        Scheme("cb3").grid.encode(jnp.ones((4, 4)), jnp.ones((1, 4)), None)
    with pytest.raises(ValueError, match="symmetric"):
        Scheme("cb3", symmetric=False)
    with pytest.raises(ValueError, match="not a learned codebook"):
        cbk.check_codebook_layout(get_format("int4"), lay, "a/kernel")


def test_checkpoint_round_trip_is_bit_exact(tmp_path):
    from jq import checkpoint as ck

    q, *_ = _random_codebook(Scheme("cb3x2", group_size=16, pad=True), (20, 3))
    q2, *_ = _random_codebook(Scheme("cb3"), (16, 5), seed=1)
    tree = {"a": {"kernel": q}, "b": {"kernel": q2, "bias": jnp.arange(5.0)}}
    ck.save(tmp_path / "ck", tree)
    back, _ = ck.load(tmp_path / "ck")
    for path in ("a", "b"):
        got, want = back[path]["kernel"], tree[path]["kernel"]
        assert isinstance(got, QTensor) and got.fmt == want.fmt and got.layout == want.layout
        for f in ("codes", "scale", "codebook"):
            a, b = np.asarray(getattr(got, f)), np.asarray(getattr(want, f))
            assert a.dtype == b.dtype and a.tobytes() == b.tobytes()
        np.testing.assert_array_equal(np.asarray(got.dequantize()), np.asarray(want.dequantize()))
