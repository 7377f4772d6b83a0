"""QoQ progressive group quantization: int4 codes with uint8 group scales and integer zeros on a per-channel int8
grid — a NumPy reference of the two levels, exact int8 level-1 weights (also under GPTQ's error feedback), the
W4A8 int8 × int8 → int32 path equal to the float reference, honest bits, checkpoint round trip, refusals."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jq
from jq import checkpoint as ck
from jq import ops
from jq.algorithms.stats import LayerStats
from jq.numbers import progressive
from jq.ops.activations import fake_quantize_activations
from jqtest.checkpoints import _same

G = 32


def _scheme(**kw):
    return jq.Scheme("int4", symmetric=False, group_size=G, progressive=True, act="int8", **kw)


def _weight(k=128, n=24, seed=0):
    w = np.random.default_rng(seed).standard_normal((k, n)).astype(np.float32)
    return w * np.linspace(0.05, 4.0, n, dtype=np.float32)  # channels of very different ranges


def _quantize(w, method="rtn", stats=None, scheme=None, **opts):
    cfg = jq.QuantConfig(rules=(jq.Rule(".*kernel", scheme or _scheme(), method, options=tuple(opts.items())),))
    return jq.quantize_params({"l": {"kernel": jnp.asarray(w)}}, cfg, None if stats is None else {"l/kernel": stats})["l"]["kernel"]


def np_progressive(w: np.ndarray, g: int) -> tuple[np.ndarray, np.ndarray]:
    """NumPy reference for a [K, N] weight: (dequantized weight, int8 level-1 weights)."""
    s1 = (np.abs(w).max(0, keepdims=True) / 119.0).astype(np.float16).astype(np.float32)
    v = (w / s1).reshape(w.shape[0] // g, g, -1)
    lo, hi = np.minimum(v.min(1, keepdims=True), 0), np.maximum(v.max(1, keepdims=True), 0)
    s8 = np.clip(np.round((hi - lo) / 15), 1, 255)
    z = np.clip(np.round(-lo / s8), 0, 15)
    q = np.clip(np.round(v / s8 + z), 0, 15)  # jnp.round and np.round both round half to even
    w8 = ((q - z) * s8).reshape(w.shape)
    return w8 * s1, w8


def test_rtn_matches_numpy_reference_and_is_exactly_int8_times_channel_scale():
    w = _weight()
    q = _quantize(w)
    q.check()
    assert q.scale.dtype == jnp.uint8 and q.zero.dtype == jnp.uint8 and q.codes.dtype == jnp.uint8
    assert q.outer_scale.dtype == jnp.float16 and q.outer_scale.shape == (1, 24)
    assert "progressive" in q.describe()
    ref, ref8 = np_progressive(w, G)
    w8 = np.asarray(progressive.int8_weights(q))
    np.testing.assert_array_equal(w8, ref8)
    deq = np.asarray(q.dequantize())
    np.testing.assert_array_equal(deq, w8.astype(np.float32) * np.asarray(q.outer_scale, np.float32))  # bit exact
    np.testing.assert_allclose(deq, ref, rtol=1e-6, atol=0)
    # the round trip's error: half a level-2 step, plus what rounding s8 down to an integer leaves of the range
    # uncovered (at most 15 · 0.5 level-1 units), per channel
    s1 = np.asarray(q.outer_scale, np.float32)
    assert np.all(np.abs(deq - w) <= (0.5 * np.asarray(q.scale, np.float32).repeat(G, 0) + 7.5) * s1 + 1e-6)
    # honest bits: int4 codes + uint8 scale + uint8 zero per group + a float16 scale per output channel
    assert q.bits_per_weight == pytest.approx(4 + 8 / G + 8 / G + 16 / 128)


def test_codes_stay_on_the_int8_grid_under_gptq_and_out_of_range_inputs():
    w = _weight(seed=1)
    x = np.random.default_rng(2).standard_normal((512, 128)).astype(np.float32)
    x[:, :4] *= 20.0  # outlier inputs make GPTQ push later weights far past the group range
    stats = LayerStats(hessian=jnp.asarray(x.T @ x / len(x)), count=jnp.asarray(len(x), jnp.float32))
    q = _quantize(w, "gptq", stats, act_order=True, block_size=32)
    w8 = np.asarray(progressive.int8_weights(q).astype(jnp.int32))
    assert w8.min() >= -128 and w8.max() <= 127 and q.perm is not None
    np.testing.assert_array_equal(np.asarray(q.dequantize()),
                                  w8.astype(np.float32) * np.asarray(q.outer_scale, np.float32))
    err = np.asarray(q.dequantize()) - w  # GPTQ's output error beats RTN's on the same grid
    rerr = np.asarray(_quantize(w).dequantize()) - w
    assert np.sum((x @ err) ** 2) < np.sum((x @ rerr) ** 2)
    grid = _scheme().grid
    s, z = grid.scale_zero(jnp.float32(-119.0), jnp.float32(119.0))
    assert (float(s), float(z)) == (16.0, 7.0)  # (15 − 7)·16 = 128 would overflow: the clamp keeps it out
    codes = grid.encode(jnp.asarray([-500.0, -119.0, 0.0, 119.0, 500.0]), s, z)
    w8 = (np.asarray(codes, np.int32) - 7) * 16
    assert w8.min() >= -128 and w8.max() <= 127 and w8[2] == 0


def test_w4a8_int_path_equals_float_reference(caplog):
    w = _weight(seed=3)
    q = _quantize(w)
    x = jax.random.normal(jax.random.key(0), (2, 5, 128)) * 3.0
    with caplog.at_level("DEBUG", logger="jq.ops"):
        y = ops.qdot(x, q)
    assert "int8 x int8 -> int32" in caplog.text  # the integer dot, not dequantize + float dot
    ref = jnp.einsum("btk,kn->btn", fake_quantize_activations(x, "int8", (2,)), q.dequantize(),
                     precision=jax.lax.Precision.HIGHEST)
    np.testing.assert_allclose(np.asarray(y), np.asarray(ref), rtol=2e-5, atol=2e-5 * float(jnp.abs(ref).max()))
    # the integer part: the int8 × int8 → int32 dot on the int8 codes, then per-token × per-channel scales
    w8 = progressive.as_int8(q)
    assert w8.fmt == "int8" and w8.layout.granularity == "channel" and w8.outer_scale is None
    np.testing.assert_array_equal(np.asarray(w8.dequantize()), np.asarray(q.dequantize()))
    xq, xs = ops.quantize_activations(x, "int8", (2,))
    acc = jax.lax.dot_general(xq, w8.codes, (((2,), (0,)), ((), ())), preferred_element_type=jnp.int32)
    np.testing.assert_allclose(np.asarray(y), np.asarray(acc * xs * w8.scale.astype(jnp.float32)), rtol=1e-6,
                               atol=1e-6 * float(jnp.abs(ref).max()))
    # act-order permutation and padding are undone in the int8 weights
    wp = _weight(k=48, n=8, seed=4)
    qp = _quantize(wp, scheme=_scheme(pad=True))
    np.testing.assert_array_equal(np.asarray(progressive.as_int8(qp).dequantize()), np.asarray(qp.dequantize()))


def test_checkpoint_round_trip_is_bit_exact(tmp_path):
    cfg = jq.QuantConfig(name="qoq", rules=(jq.Rule(".*kernel", _scheme()),))
    q = jq.quantize_params({"a": {"kernel": jnp.asarray(_weight())}}, cfg)
    back, meta = ck.load(ck.save(tmp_path / "q", q, recipe=cfg))
    _same(q, back)
    a, b = q["a"]["kernel"], back["a"]["kernel"]
    assert b.scale.dtype == jnp.uint8 and b.outer_scale.dtype == jnp.float16 and b.outer_scale.shape == (1, 24)
    np.testing.assert_array_equal(np.asarray(a.dequantize()), np.asarray(b.dequantize()))
    assert meta["format_version"] == "3.1"
    assert meta["recipe"]["rules"][0]["progressive"] is True


@pytest.mark.parametrize("kw, word", [
    (dict(symmetric=True), "symmetric"), (dict(group_size=None, granularity="channel"), "group_size"),
    (dict(format="int8"), "format"), (dict(scale_dtype="float32"), "scale_dtype")])
def test_refusals_name_the_field(kw, word):
    args = dict(format="int4", symmetric=False, group_size=G, progressive=True) | kw
    with pytest.raises(ValueError, match="progressive") as e:
        jq.Scheme(**args)
    assert word in str(e.value)


def test_refuses_float_scale_fitters_and_missing_axes():
    with pytest.raises(ValueError, match="uint8"):
        jq.Scheme("int4", symmetric=False, group_size=G, scale_dtype="uint8")
    with pytest.raises(ValueError, match="contraction axes"):
        _scheme().grid.outer_scale(jnp.ones((4, 4)))
    with pytest.raises(ValueError, match="l/kernel: progressive.*hqq"):
        _quantize(_weight(), "hqq")
