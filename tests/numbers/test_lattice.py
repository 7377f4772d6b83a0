"""The E8P lattice codebook (`jq.numbers.lattice`, formats `e8p` / `e8p3` / `e8p2`): the table's structure (2^16
distinct points of E8 + ¼; e8p3's shell: the origin and E8's 240 roots), exact nearest-entry encoding against a
NumPy brute force, code round trips, the format constants' optimality for Gaussian inputs, QTensor decoding against a
NumPy lookup, honest bits and the checkpoint."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jq.numbers import lattice
from jq.numbers.formats import get_format
from jq.numbers.qtensor import QTensor
from jq.numbers.scheme import Scheme


def in_e8(v: np.ndarray) -> np.ndarray:
    """NumPy membership in E8 = D8 ∪ (D8 + ½) for rows of v [n, 8]: all integers or all half-integers, even sum."""
    whole = np.all(np.isclose(v, np.round(v)), axis=1)
    half = np.all(np.isclose(v - 0.5, np.round(v - 0.5)), axis=1)
    even = np.isclose(np.mod(np.round(v.sum(axis=1)), 2), 0)
    return (whole | half) & even


def np_nearest(y: np.ndarray) -> np.ndarray:
    """Brute-force nearest entry (float64) of each row of y [n, 8]."""
    t = lattice.table().astype(np.float64)
    out = []
    for c in np.array_split(y.astype(np.float64), max(1, len(y) // 256)):
        out.append(((c**2).sum(1)[:, None] - 2 * c @ t.T + (t**2).sum(1)[None]).argmin(1))
    return np.concatenate(out)


def test_the_table_is_65536_distinct_points_of_e8_shifted_by_a_quarter():
    t = lattice.table()
    assert t.shape == (65536, 8) and t.dtype == np.float32
    assert len(np.unique(t, axis=0)) == 65536
    assert in_e8(t - 0.25).all()
    norms = (lattice.patterns() ** 2).sum(1)
    assert (norms <= 10).sum() == 227 and (norms == 12).sum() == 29
    assert len(np.unique(lattice.patterns(), axis=0)) == 256


def test_encoding_is_the_exact_nearest_entry():
    rng = np.random.default_rng(1)
    y = np.concatenate([rng.standard_normal((700, 8)) * s for s in (0.3, 1.0, 2.5)]).astype(np.float32)
    got = np.asarray(lattice.encode(jnp.asarray(y)))  # above the chunk size: the chunked path
    t = lattice.table().astype(np.float64)
    dist = lambda c: ((y - t[c]) ** 2).sum(1)  # noqa: E731
    np.testing.assert_allclose(dist(got), dist(np_nearest(y)), rtol=1e-5, atol=1e-5)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(0, 65535), min_size=1, max_size=40))
def test_every_entry_encodes_to_its_own_code(codes):
    c = np.resize(np.asarray(codes), 64)  # one shape: one compilation
    assert np.array_equal(np.asarray(lattice.encode(jnp.asarray(lattice.table()[c]))), c)
    two = (c.astype(np.uint32) | (c[::-1].astype(np.uint32) << 16))
    v = np.asarray(lattice.decode(jnp.asarray(two), 32))
    np.testing.assert_array_equal(v, lattice.table()[c] + lattice.RESIDUAL_SCALE * lattice.table()[c[::-1]])
    three = c.astype(np.uint32) | ((c[::-1] % 256).astype(np.uint32) << 16)
    stored = np.asarray(lattice.pack24(jnp.asarray(three)))
    assert stored.dtype == np.uint8 and stored.shape == (64, 3)
    np.testing.assert_array_equal(stored.astype(np.uint32) @ (1 << np.arange(0, 24, 8, dtype=np.uint32)), three)
    v = np.asarray(lattice.decode(jnp.asarray(stored), 24))
    np.testing.assert_array_equal(v, lattice.table()[c] + lattice.SHELL_SCALE * lattice.shell()[c[::-1] % 256])


def test_the_shell_is_the_origin_and_the_240_roots_of_e8():
    s = lattice.shell()
    assert s.shape == (256, 8) and s.dtype == np.float32
    assert not s[0].any() and not s[241:].any()  # unused codes decode to the origin too
    roots = s[1:241]
    assert len(np.unique(roots, axis=0)) == 240 and in_e8(roots).all()
    np.testing.assert_allclose((roots**2).sum(1), 2.0)
    y = np.random.default_rng(4).standard_normal((500, 8)).astype(np.float32)
    got = np.asarray(lattice.nearest_in_shell(jnp.asarray(y)))
    d = ((y[:, None] - s[None, :241]) ** 2).sum(-1)  # NumPy brute force
    np.testing.assert_allclose(d[np.arange(500), got], d.min(1), rtol=1e-5, atol=1e-6)


def _gaussian_mse(gain: float, bits: int, second: float | None = None) -> float:
    """MSE per coordinate of `bits`-bit E8P on unit Gaussians stretched by `gain` (second-stage scale `second`, the
    format's when None), by a NumPy brute force for the second stage."""
    x = np.random.default_rng(0).standard_normal((1 << 13, 8)).astype(np.float32)
    v = np.asarray(lattice.decode(lattice.encode(jnp.asarray(gain * x)).astype(jnp.uint16)))
    if bits > 16:
        r = {24: lattice.SHELL_SCALE, 32: lattice.RESIDUAL_SCALE}[bits] if second is None else second
        tab = lattice.shell()[:241] if bits == 24 else lattice.table()
        res = (gain * x - v) / r
        best = np.concatenate([(-2 * c @ tab.T + (tab**2).sum(1)[None]).argmin(1) for c in np.array_split(res, 16)])
        v = v + r * tab[best]
    return float(np.mean((x - v / gain) ** 2))


def test_the_format_constants_are_near_optimal_for_gaussian_weights():
    one = _gaussian_mse(lattice.GAIN[16], 16)
    assert 0.085 < one < 0.1  # vs 0.1175 for the best scalar 2-bit (Lloyd-Max) grid
    assert all(one <= 1.01 * _gaussian_mse(k, 16) for k in (0.9, 0.97, 1.1, 1.2))
    three = _gaussian_mse(lattice.GAIN[24], 24)
    assert 0.028 < three < 0.0345  # the best scalar 3-bit grid: 0.0345
    assert all(three <= 1.01 * _gaussian_mse(k, 24, r) for k, r in ((0.9, 0.49), (1.05, 0.49), (0.975, 0.42),
                                                                    (0.975, 0.56)))
    two = _gaussian_mse(lattice.GAIN[32], 32)
    assert two < 0.0095  # the best scalar 4-bit grid: 0.0095
    assert all(two <= 1.01 * _gaussian_mse(k, 32, r) for k, r in ((0.8, 0.26), (0.95, 0.26), (0.875, 0.22),
                                                                   (0.875, 0.3)))


def test_quantize_is_the_two_stage_nearest_entries():
    y = jnp.asarray(np.random.default_rng(5).standard_normal((300, 8)) * 0.9, jnp.float32)
    for bits in (16, 24, 32):
        codes, v = lattice.quantize(y, bits)
        stored = lattice.pack24(codes) if bits == 24 else codes
        np.testing.assert_array_equal(np.asarray(lattice.decode(stored, bits)), np.asarray(v))
    c1 = lattice.encode(y)
    v1 = lattice.decode(c1.astype(jnp.uint16))
    c3, _ = lattice.quantize(y, 24)
    np.testing.assert_array_equal(np.asarray(c3 & 0xFFFF), np.asarray(c1))
    shell_index = lattice.nearest_in_shell((y - v1) / lattice.SHELL_SCALE)
    np.testing.assert_array_equal(np.asarray(c3 >> 16), np.asarray(shell_index))


@pytest.mark.parametrize("fmt, gran", [("e8p", "channel"), ("e8p3", "group"), ("e8p2", "group")])
def test_qtensors_decode_as_the_numpy_lookup_with_honest_bits(tmp_path, fmt, gran):
    f = get_format(fmt)
    K, N = 32, 5
    s = Scheme(fmt, granularity=gran, group_size=16 if gran == "group" else None)
    lay = s.layout((K, N), (0,))
    rng = np.random.default_rng(2)
    c = rng.integers(0, 2 ** f.bits, (K // 8, N), dtype=np.uint64)
    if f.bits == 24:
        c = (c & 0xFFFF) | ((c >> 16) % 241 << 16)  # shell indices the encoder writes
    codes = {16: c.astype(np.uint16), 32: c.astype(np.uint32),
             24: np.stack([(c >> s) & 0xFF for s in (0, 8, 16)], -1).astype(np.uint8)}[f.bits]
    scale = rng.uniform(0.5, 2, lay.scale_shape).astype(np.float16)
    q = QTensor(codes=jnp.asarray(codes), scale=jnp.asarray(scale), fmt=fmt, layout=lay, symmetric=True,
                dtype="float32")
    q.check()
    t = lattice.table()
    c = c.astype(np.int64)
    vec = t[c & 0xFFFF] + {16: 0, 24: lattice.SHELL_SCALE * lattice.shell()[c >> 16 & 255],
                           32: lattice.RESIDUAL_SCALE * t[c >> 16 & 0xFFFF]}[f.bits]  # [K/8, N, 8]
    rows = K // scale.shape[0]
    ref = np.array([[vec[k // 8, n, k % 8] * float(scale[k // rows, n]) for n in range(N)] for k in range(K)])
    np.testing.assert_allclose(np.asarray(q.dequantize()), ref, rtol=1e-6)
    assert q.bits_per_weight == pytest.approx(f.bits / 8 + 16 * scale.size / (K * N))

    from jq import checkpoint as ck

    ck.save(tmp_path / "ck", {"a": {"kernel": q}})
    # an older reader refuses the format name: 1.3 does not know e8p / e8p2, 1.5 not e8p3
    assert ck.read_meta(tmp_path / "ck")["format_version"] == ("1.6" if fmt == "e8p3" else "1.4")
    got = ck.load(tmp_path / "ck")[0]["a"]["kernel"]
    assert got.fmt == fmt and got.codes.dtype == q.codes.dtype
    for name in ("codes", "scale"):
        assert np.asarray(getattr(got, name)).tobytes() == np.asarray(getattr(q, name)).tobytes()
    x = jax.random.normal(jax.random.key(0), (3, K))
    from jq import ops

    np.testing.assert_allclose(np.asarray(ops.qdot(x, q)), np.asarray(x) @ ref, rtol=1e-4, atol=1e-4)


def test_refusals_name_the_value_and_fix():
    for fn in (lattice.decode, lattice.quantize):
        with pytest.raises(ValueError, match=r"lattice codes of 20 bits per vector; E8P formats have \(16, 24, 32\)"):
            fn(jnp.zeros((2, 8)), 20)
    with pytest.raises(ValueError, match="'e8p' is a vector codebook .* method: quip"):
        get_format("e8p").encode(jnp.zeros(3))
    with pytest.raises(ValueError, match=r"vectors of 8 weights \(format e8p\) do not divide groups of 12"):
        Scheme("e8p", group_size=12).layout((48, 4), (0,), "a/kernel")
