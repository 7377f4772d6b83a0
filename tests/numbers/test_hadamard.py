"""Hadamard matrices and transforms: H Hᵀ = nI for every small order and the composite sizes of real models, the
fast transform against a dense NumPy reference (independent Sylvester, plain matmul), inverse round trips, the
randomized rotation, clear errors for unsupported sizes, jit / vmap / grad, batch shapes and axes (hypothesis),
bfloat16 and integer inputs."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jq.numbers import hadamard as had
from jq.numbers.hadamard import Rotation, decompose, hadamard_matrix, hadamard_transform, rotation_matrix, supported

# (order, expected construction prefix); the orders real models need plus a few the general rules give
SMALL = {
    1: "sylvester", 2: "sylvester", 4: "sylvester", 12: "paley1(q=11)", 20: "paley1(q=19)",
    28: "paley1(q=27)", 36: "paley2(q=17)", 40: "paley1(q=19)", 52: "paley2(q=25)", 60: "paley1(q=59)",
    108: "paley1(q=107)", 140: "paley1(q=139)", 156: "goethals-seidel(T3 x williamson w=13)",
    172: "goethals-seidel(williamson w=43)", 44: "paley1(q=43)", 76: "paley2(q=37)", 100: "paley2(q=49)",
}
# hidden / intermediate sizes of real models: n -> (power of two, base)
COMPOSITE = {
    576: (16, 36), 768: (64, 12), 1536: (128, 12), 2560: (128, 20), 3072: (256, 12), 4096: (4096, 1),
    5120: (256, 20), 11008: (64, 172), 13824: (128, 108), 14336: (512, 28),
}


@functools.lru_cache(maxsize=None)
def sylvester_ref(n: int) -> np.ndarray:
    """Sylvester's matrix by the doubling recursion, float64 (independent of the module's)."""
    h = np.ones((1, 1))
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return h


def dense_ref(x: np.ndarray, n: int, transpose: bool = False) -> np.ndarray:
    """x [..., n] @ (H_{2^k} ⊗ H_b) / √n in float64 with plain NumPy matmuls (dense for n ≤ 4096)."""
    d = decompose(n)
    hb = hadamard_matrix(d.base, np.float64)
    if transpose:
        hb = hb.T
    x = np.asarray(x, np.float64)
    if n <= 4096:
        return x @ np.kron(sylvester_ref(d.pow2), hb) / math.sqrt(n)
    y = np.swapaxes(x.reshape(*x.shape[:-1], d.pow2, d.base), -1, -2) @ sylvester_ref(d.pow2)  # [..., b, p]
    return (np.swapaxes(y, -1, -2) @ hb).reshape(x.shape) / math.sqrt(n)


def rng_x(shape, seed=0, dtype=np.float32):
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


# -- matrices ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", sorted(SMALL))
def test_small_orders_are_hadamard(n):
    h = hadamard_matrix(n, np.float64)
    assert h.shape == (n, n) and set(np.unique(h)) <= {-1.0, 1.0}
    np.testing.assert_array_equal(h @ h.T, n * np.eye(n))
    np.testing.assert_array_equal(h.T @ h, n * np.eye(n))
    assert decompose(n).construction == SMALL[n]
    assert supported(n)


def test_required_orders_all_supported():
    assert set(had.SMALL_ORDERS) == {1, 2, 4, 12, 20, 28, 36, 40, 52, 60, 108, 140, 156, 172}
    assert all(supported(n) for n in had.SMALL_ORDERS)


def test_powers_of_two_are_sylvester():
    for n in (1, 2, 4, 8, 64, 256):
        np.testing.assert_array_equal(hadamard_matrix(n, np.float64), sylvester_ref(n))
        assert decompose(n) == (n, n, 1, "sylvester")


def test_paley1_is_skew():
    # H = I + S with S skew (Paley I gives skew-Hadamard matrices), so the transpose matters for the inverse
    for n in (12, 28, 108):
        s = hadamard_matrix(n, np.int64) - np.eye(n, dtype=np.int64)
        np.testing.assert_array_equal(s, -s.T)


def test_dtype_and_int8():
    h = hadamard_matrix(172, np.int8)
    assert h.dtype == np.int8
    np.testing.assert_array_equal(h, hadamard_matrix(172))


@pytest.mark.parametrize("n", sorted(COMPOSITE))
def test_composite_sizes(n):
    d = decompose(n)
    assert (d.pow2, d.base) == COMPOSITE[n] and d.pow2 * d.base == n
    h = hadamard_matrix(n, np.int8)
    assert h.shape == (n, n)
    rows = np.random.default_rng(n).choice(n, 6, replace=False)
    hr = h[rows].astype(np.float32)
    # kron structure against the independent Sylvester matrix
    s, b = sylvester_ref(d.pow2)[rows // d.base], hadamard_matrix(d.base)[rows % d.base]
    expect = (s[:, :, None] * b[:, None, :]).reshape(len(rows), n)  # row-wise Kronecker product
    np.testing.assert_array_equal(hr, expect)
    # H[rows] Hᵀ = n I[rows]: the unnormalised transposed transform of the rows (checked against dense NumPy
    # matmuls in test_transform_matches_dense_reference), exact in float32 (integer sums < 2^24)
    g = np.asarray(hadamard_transform(jnp.asarray(hr), normalize=False, transpose=True))
    expect = np.zeros((len(rows), n), np.float32)
    expect[np.arange(len(rows)), rows] = n
    np.testing.assert_array_equal(g, expect)
    if n <= 1536:
        hf = h.astype(np.float32)
        np.testing.assert_array_equal(hf @ hf.T, n * np.eye(n, dtype=np.float32))


# -- the fast transform ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", sorted(set(SMALL) | set(COMPOSITE)))
def test_transform_matches_dense_reference(n):
    x = rng_x((3, n), seed=n)
    y = np.asarray(hadamard_transform(jnp.asarray(x)))
    np.testing.assert_allclose(y, dense_ref(x, n), atol=2e-5 * max(1.0, math.log2(n)) ** 0.5, rtol=0)
    yt = np.asarray(hadamard_transform(jnp.asarray(x), transpose=True))
    np.testing.assert_allclose(yt, dense_ref(x, n, transpose=True), atol=2e-5 * max(1.0, math.log2(n)) ** 0.5)
    # orthogonal: norms kept, transpose inverts
    np.testing.assert_allclose(np.linalg.norm(y, axis=-1), np.linalg.norm(x, axis=-1), rtol=1e-5)
    back = np.asarray(hadamard_transform(jnp.asarray(y), transpose=True))
    np.testing.assert_allclose(back, x, atol=2e-5 * max(1.0, math.log2(n)) ** 0.5)


def test_unnormalized_and_matrix_agree():
    for n in (12, 172, 768):
        x = rng_x((2, n), seed=1)
        y = np.asarray(hadamard_transform(jnp.asarray(x), normalize=False))
        np.testing.assert_allclose(y, x.astype(np.float64) @ hadamard_matrix(n, np.float64), atol=1e-3)
        np.testing.assert_allclose(np.asarray(hadamard_transform(jnp.asarray(x))),
                                   x @ np.asarray(rotation_matrix(n)), atol=2e-5)


@pytest.mark.parametrize("n", [4096, 11008])
def test_block_size_does_not_change_result(n):
    x = jnp.asarray(rng_x((2, n), seed=2))
    ys = [np.asarray(hadamard_transform(x, block=b)) for b in (2, 16, 128)]
    for y in ys[1:]:
        np.testing.assert_allclose(y, ys[0], atol=3e-5)
    with pytest.raises(ValueError, match="block must be a power of two"):
        hadamard_transform(x, block=48)


def test_rotation_matrix_orthogonal():
    for n in (1, 12, 156, 172, 768):
        q = np.asarray(rotation_matrix(n), np.float64)
        np.testing.assert_allclose(q @ q.T, np.eye(n), atol=1e-6)
        if n in (172, 768):
            qr = np.asarray(rotation_matrix(n, jax.random.key(n)), np.float64)
            np.testing.assert_allclose(qr @ qr.T, np.eye(n), atol=1e-6)
            np.testing.assert_allclose(qr.T @ qr, np.eye(n), atol=1e-6)
            assert np.allclose(np.abs(qr), 1 / math.sqrt(n))


def test_a_seeded_rotation_applies_inverts_and_matches_its_matrix():
    n = 172
    rot = Rotation(seed=3)
    signs = np.asarray(rot.signs(n))
    assert signs.shape == (n,) and set(np.unique(signs)) == {-1.0, 1.0}
    q = np.asarray(rot.matrix(n), np.float64)
    np.testing.assert_allclose(q, signs[:, None] * hadamard_matrix(n, np.float64) / math.sqrt(n), atol=1e-7)
    np.testing.assert_array_equal(np.asarray(rot.matrix(n)), np.asarray(rotation_matrix(n, jax.random.key(3))))
    x = rng_x((4, 5, n), seed=4)
    y = rot.apply(jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(y), x @ q, atol=2e-5)
    np.testing.assert_allclose(np.asarray(rot.inverse(y)), x, atol=2e-5)
    np.testing.assert_allclose(np.asarray(rot.inverse(jnp.asarray(x))), x @ q.T, atol=2e-5)
    # along another axis
    xa = rng_x((n, 3), seed=5)
    np.testing.assert_allclose(np.asarray(rot.apply(jnp.asarray(xa), axis=0)), q.T @ xa, atol=2e-5)
    with pytest.raises(ValueError, match="n=6 = 2"):
        rot.apply(jnp.zeros((3, 6)))


def test_one_rotation_type_with_a_string_form_recipes_and_checkpoints_write():
    assert Rotation.parse("hadamard") == Rotation() and Rotation.parse(True) == Rotation()
    assert Rotation.parse("hadamard(seed=3)") == Rotation(seed=3) == Rotation.parse({"seed": 3})
    assert Rotation.parse(None) is None and Rotation.parse(False) is None
    assert str(Rotation()) == "hadamard" and str(Rotation(seed=-2)) == "hadamard(seed=-2)"
    assert Rotation.parse(str(Rotation(seed=7))) == Rotation(seed=7)
    with pytest.raises(ValueError, match="rotation 'had64': expected 'hadamard'"):
        Rotation.parse("had64")
    x = jnp.asarray(rng_x((2, 768), seed=6))
    f = jax.jit(lambda x: Rotation(seed=0).inverse(Rotation(seed=0).apply(x)))  # static, hashable: jit-friendly
    np.testing.assert_allclose(np.asarray(f(x)), np.asarray(x), atol=2e-5)
    np.testing.assert_array_equal(np.asarray(Rotation().apply(x)), np.asarray(hadamard_transform(x)))
    # the places that rotate all hold this type
    from jq.numbers.kvcache import KVCacheConfig
    from jq.tree.recipe import RotationConfig

    assert KVCacheConfig("int4", rotate=True).rotation == Rotation()
    assert RotationConfig(seed=5).residual_rotation == Rotation(seed=5) and RotationConfig().head_rotation == Rotation()
    import jq

    assert jq.Scheme("int4", rotate="hadamard").policy.rotation == Rotation()


# -- errors ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n, parts", [
    (3, ["n=3 = 2^0·3", "only for n = 1, 2 or a multiple of 4", "order 12"]),
    (6, ["n=6 = 2^1·3", "multiple of 12"]),
    (10, ["n=10 = 2^1·5", "multiple of 20"]),
    (92, ["n=92 = 2^2·23", "368", "paley1(q=367)"]),
    (668, ["n=668 = 2^2·167"]),
])
def test_unsupported_sizes_raise_helpful_error(n, parts):
    assert not supported(n)
    for call in (lambda: hadamard_matrix(n), lambda: hadamard_transform(jnp.zeros((2, n))),
                 lambda: Rotation(seed=0).apply(jnp.zeros((2, n))), lambda: rotation_matrix(n)):
        with pytest.raises(ValueError) as e:
            call()
        msg = str(e.value)
        for p in parts + ["Supported", "172"]:
            assert p in msg, (p, msg)


def test_bad_arguments():
    for n in (0, -4, 2.0, "8", True):
        assert not supported(n)
    with pytest.raises(ValueError, match="positive int"):
        hadamard_matrix(0)
    with pytest.raises(ValueError, match="axis 2 out of range"):
        hadamard_transform(jnp.zeros((2, 4)), axis=2)
    with pytest.raises(ValueError, match="at least one axis"):
        hadamard_transform(jnp.float32(1.0))
    with pytest.raises(ValueError, match="key or signs"):
        rotation_matrix(4, jax.random.key(0), signs=jnp.ones(4))


# -- jit, vmap, grad, dtypes ---------------------------------------------------------------------------------------


def test_jit_vmap_grad():
    n = 156
    x = jnp.asarray(rng_x((4, 3, n), seed=7))
    ref = dense_ref(np.asarray(x), n)
    np.testing.assert_allclose(np.asarray(jax.jit(hadamard_transform)(x)), ref, atol=2e-5)
    np.testing.assert_allclose(np.asarray(jax.vmap(hadamard_transform)(x)), ref, atol=2e-5)
    np.testing.assert_allclose(np.asarray(jax.vmap(hadamard_transform, in_axes=1, out_axes=1)(x)), ref, atol=2e-5)
    # linear map: its vjp is the transposed transform
    c = jnp.asarray(rng_x((4, 3, n), seed=8))
    g = jax.grad(lambda x: jnp.sum(hadamard_transform(x) * c))(x)
    np.testing.assert_allclose(np.asarray(g), dense_ref(np.asarray(c), n, transpose=True), atol=2e-5)
    # zero-size batch
    assert hadamard_transform(jnp.zeros((0, n))).shape == (0, n)


def test_bfloat16_and_integer_inputs():
    n = 11008
    x32 = rng_x((3, n), seed=9)
    xb = jnp.asarray(x32, jnp.bfloat16)
    yb = hadamard_transform(xb)
    assert yb.dtype == jnp.bfloat16 and yb.shape == (3, n)
    ref = dense_ref(np.asarray(xb.astype(jnp.float32)), n)  # computed in f32 from the bf16 values
    np.testing.assert_allclose(np.asarray(yb.astype(jnp.float32)), ref, rtol=1e-2, atol=1e-2)
    back = hadamard_transform(yb, transpose=True)
    assert back.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(back.astype(jnp.float32)), np.asarray(xb.astype(jnp.float32)),
                               rtol=2e-2, atol=2e-2)
    xi = jnp.arange(2 * 12, dtype=jnp.int32).reshape(2, 12)
    yi = hadamard_transform(xi)
    assert yi.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(yi), dense_ref(np.asarray(xi, np.float64), 12), atol=1e-4)
    rot = Rotation(seed=1)
    signs = rot.signs(12)
    yr = rot.apply(xi.astype(jnp.bfloat16))
    assert yr.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(yr.astype(jnp.float32)),
                               np.asarray(xi, np.float64) @ np.asarray(rotation_matrix(12, signs=signs)),
                               rtol=1e-2, atol=0.2)


@settings(max_examples=10, deadline=None)
@given(
    n=st.sampled_from([1, 2, 12, 40, 64, 172]),
    batch=st.lists(st.integers(1, 3), min_size=0, max_size=3),
    data=st.data(),
)
def test_property_any_batch_shape_and_axis(n, batch, data):
    ndim = len(batch) + 1
    axis = data.draw(st.integers(-ndim, ndim - 1), label="axis")
    shape = list(batch)
    shape.insert(axis % ndim, n)
    x = rng_x(tuple(shape), seed=len(shape) * 1000 + n)
    rot = Rotation(seed=n)

    @jax.jit
    def run(x):
        y = hadamard_transform(x, axis=axis)
        return y, hadamard_transform(y, axis=axis, transpose=True), rot.inverse(rot.apply(x, axis=axis), axis=axis)

    y, back, rt = (np.asarray(a) for a in run(jnp.asarray(x)))
    ref = np.moveaxis(dense_ref(np.moveaxis(x, axis, -1), n), -1, axis)
    assert y.shape == x.shape
    np.testing.assert_allclose(y, ref, atol=2e-5)
    np.testing.assert_allclose(back, x, atol=2e-5)
    np.testing.assert_allclose(rt, x, atol=2e-5)
