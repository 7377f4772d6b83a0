"""The E8P lattice codebook (`jq.numbers.lattice`, formats `e8p` / `e8p3` / `e8p2` / `e8p5` / `e8p6`): the table's
structure (2^16 distinct points of E8 + ¼; the shell: the origin and E8's 240 roots), exact stagewise nearest-entry
encoding against a NumPy brute force, code round trips and byte layout, the format constants' optimality for
Gaussian inputs, QTensor decoding against a NumPy lookup, honest bits and the checkpoint."""

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
    t, sh, rev = lattice.table(), lattice.shell(), c[::-1]
    for bits in (24, 32, 40, 48):  # every stage's code reads back its own entry, at its own scale
        tabs = [(t, rev) if name == "e8p" else (sh, rev % 241) for name, _ in lattice.STAGES[bits]]
        stages = [c] + [i for _, i in tabs]
        stored = lattice.join([jnp.asarray(s) for s in stages], bits)
        want = t[c]
        for (_, r), (tab, i) in zip(lattice.STAGES[bits], tabs):
            want = want + r * tab[i]
        np.testing.assert_array_equal(np.asarray(lattice.decode(stored, bits)), want)


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


def _gaussian_mse(gain: float, bits: int, last: float | None = None) -> float:
    """MSE per coordinate of `bits`-bit E8P on unit Gaussians stretched by `gain` (the last stage's scale `last`, the
    format's when None), by a NumPy brute force for the stages after the first."""
    x = np.random.default_rng(0).standard_normal((1 << 12, 8)).astype(np.float32)
    v = np.asarray(lattice.decode(lattice.encode(jnp.asarray(gain * x)).astype(jnp.uint16)))
    stages = list(lattice.STAGES[bits])
    if last is not None:
        stages[-1] = (stages[-1][0], last)
    for name, r in stages:
        tab = lattice.shell()[:241] if name == "shell" else lattice.table()
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


def test_the_five_and_six_bit_constants_are_near_optimal_for_gaussian_weights():
    five = _gaussian_mse(lattice.GAIN[40], 40)
    assert five < 0.0029  # the best uniform 5-bit grid (int5's): 0.0035; Lloyd-Max's non-uniform one 0.0025
    assert all(five <= 1.01 * _gaussian_mse(k, 40, r) for k, r in ((0.78, 0.13), (0.88, 0.13), (0.83, 0.11),
                                                                    (0.83, 0.15)))
    six = _gaussian_mse(lattice.GAIN[48], 48)
    assert six < 0.00085  # the best uniform 6-bit grid (int6's): 0.00104; Lloyd-Max's non-uniform one 0.00064
    assert all(six <= 1.01 * _gaussian_mse(k, 48, r) for k, r in ((0.75, 0.07), (0.85, 0.07), (0.8, 0.06),
                                                                   (0.8, 0.08)))


def test_quantize_is_the_stagewise_nearest_entries():
    y = jnp.asarray(np.random.default_rng(5).standard_normal((300, 8)) * 0.9, jnp.float32)
    t, sh = lattice.table(), lattice.shell()
    for bits in lattice.CODE_BITS:
        stored, v = lattice.quantize(y, bits)
        dtype, trailing = lattice.storage(bits)
        assert stored.dtype == dtype and stored.shape == (300, *trailing)
        np.testing.assert_array_equal(np.asarray(lattice.decode(stored, bits)), np.asarray(v))
        stages = [np.asarray(c) for c in lattice.split(stored, bits)]
        np.testing.assert_array_equal(np.asarray(lattice.join([jnp.asarray(c) for c in stages], bits)),
                                      np.asarray(stored))
        # each stage: the nearest entry of its table to what the stages before left (NumPy brute force)
        ref = t[stages[0]]
        assert (stages[0] == np.asarray(lattice.encode(y))).all()
        for (name, scale), c in zip(lattice.STAGES[bits], stages[1:]):
            tab = sh[:241] if name == "shell" else t
            res = (np.asarray(y) - ref) / scale
            d = ((res[:, None] - tab[None]) ** 2).sum(-1)
            np.testing.assert_allclose(d[np.arange(300), c], d.min(1), rtol=1e-5, atol=1e-5)
            ref = ref + scale * tab[c]
        np.testing.assert_allclose(np.asarray(v), ref, rtol=1e-6, atol=1e-6)


def test_stored_bytes_are_the_stage_codes_little_endian():
    c1, c2, c3 = np.array([0x1234, 0xFFFF]), np.array([0xABCD, 0]), np.array([0x00EE, 0x0102])
    three = np.asarray(lattice.join([jnp.asarray(c1), jnp.asarray(c3 & 0xFF)], 24))
    np.testing.assert_array_equal(three, [[0x34, 0x12, 0xEE], [0xFF, 0xFF, 0x02]])
    five = np.asarray(lattice.join([jnp.asarray(c) for c in (c1, c2, c3 & 0xFF)], 40))
    np.testing.assert_array_equal(five, [[0x34, 0x12, 0xCD, 0xAB, 0xEE], [0xFF, 0xFF, 0, 0, 0x02]])
    six = np.asarray(lattice.join([jnp.asarray(c) for c in (c1, c2, c3)], 48))
    np.testing.assert_array_equal(six, [[0x34, 0x12, 0xCD, 0xAB, 0xEE, 0], [0xFF, 0xFF, 0, 0, 0x02, 0x01]])
    two = np.asarray(lattice.join([jnp.asarray(c1), jnp.asarray(c2)], 32))
    np.testing.assert_array_equal(two, c1 | (c2 << 16))


@pytest.mark.parametrize("fmt, gran", [("e8p", "channel"), ("e8p3", "group"), ("e8p2", "group"), ("e8p5", "group"),
                                       ("e8p6", "channel")])
def test_qtensors_decode_as_the_numpy_lookup_with_honest_bits(tmp_path, fmt, gran):
    f = get_format(fmt)
    K, N = 32, 5
    s = Scheme(fmt, granularity=gran, group_size=16 if gran == "group" else None)
    lay = s.layout((K, N), (0,))
    rng = np.random.default_rng(2)
    names = ["e8p"] + [name for name, _ in lattice.STAGES[f.bits]]
    stages = [rng.integers(0, 65536 if name == "e8p" else 241, (K // 8, N)) for name in names]  # shell: < 241
    raw = np.concatenate([[(c >> 8 * i) & 0xFF for i in range(2 if name == "e8p" else 1)]
                          for name, c in zip(names, stages)]).transpose(1, 2, 0)  # little-endian bytes [K/8, N, B]
    if f.bits in (16, 32):
        codes = stages[0].astype(np.uint16) if f.bits == 16 else (stages[0] | stages[1] << 16).astype(np.uint32)
    else:
        codes = raw.astype(np.uint8)
    scale = rng.uniform(0.5, 2, lay.scale_shape).astype(np.float16)
    q = QTensor(codes=jnp.asarray(codes), scale=jnp.asarray(scale), fmt=fmt, layout=lay, symmetric=True,
                dtype="float32")
    q.check()
    tables = {"e8p": lattice.table(), "shell": lattice.shell()}
    vec = tables["e8p"][stages[0]]  # [K/8, N, 8]
    for (name, r), c in zip(lattice.STAGES[f.bits], stages[1:]):
        vec = vec + r * tables[name][c]
    rows = K // scale.shape[0]
    ref = np.array([[vec[k // 8, n, k % 8] * float(scale[k // rows, n]) for n in range(N)] for k in range(K)])
    np.testing.assert_allclose(np.asarray(q.dequantize()), ref, rtol=1e-6)
    assert q.bits_per_weight == pytest.approx(f.bits / 8 + 16 * scale.size / (K * N))

    from jq import checkpoint as ck

    ck.save(tmp_path / "ck", {"a": {"kernel": q}})
    # an older reader refuses the format name: 1.3 does not know e8p / e8p2, 1.5 not e8p3, 1.6 not e8p5 / e8p6
    want = {"e8p3": "1.6", "e8p5": "1.7", "e8p6": "1.7"}.get(fmt, "1.4")
    assert ck.read_meta(tmp_path / "ck")["format_version"] == want
    got = ck.load(tmp_path / "ck")[0]["a"]["kernel"]
    assert got.fmt == fmt and got.codes.dtype == q.codes.dtype
    for name in ("codes", "scale"):
        assert np.asarray(getattr(got, name)).tobytes() == np.asarray(getattr(q, name)).tobytes()
    x = jax.random.normal(jax.random.key(0), (3, K))
    from jq import ops

    np.testing.assert_allclose(np.asarray(ops.qdot(x, q)), np.asarray(x) @ ref, rtol=1e-4, atol=1e-4)


def test_refusals_name_the_value_and_fix():
    for fn in (lattice.decode, lattice.quantize):
        with pytest.raises(ValueError, match=r"codes of 20 bits per vector; E8P formats have \(16, 24, 32, 40, 48\)"):
            fn(jnp.zeros((2, 8)), 20)
    with pytest.raises(ValueError, match="'e8p' is a vector codebook .* method: quip"):
        get_format("e8p").encode(jnp.zeros(3))
    with pytest.raises(ValueError, match=r"vectors of 8 weights \(format e8p\) do not divide groups of 12"):
        Scheme("e8p", group_size=12).layout((48, 4), (0,), "a/kernel")
