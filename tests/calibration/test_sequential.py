"""Calibration capture (vs NumPy, streaming, 8-device data parallel), the sequential driver, folds, calibration
sampling, and W8A8 activation quantization."""

import copy

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jq
from jq.calibration import capture as calibrate
from jq.algorithms import METHODS, register
from jq.models.llama.config import LlamaConfig
from jq.models.llama.model import Llama, init_params
from jq.models.llama.blocks import FOLDS, block_spec
from jq.apps.data import calibration_draw, calibration_tokens
from jq.algorithms.stats import LayerStats
from jq.algorithms.transforms import AWQScales, tie
from jq.calibration.sequential import Fold, apply_fold, quantize_sequential
from jq.tree.paths import get_path as _get


class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.relu(nn.Dense(16, name="a")(x))
        h = nn.DenseGeneral((2, 4), name="b")(h)
        return nn.DenseGeneral(8, axis=(-2, -1), name="c")(h)


def np_stats(x2d):
    x = np.asarray(x2d, np.float64)
    n = x.shape[0]
    return {"hessian": x.T @ x / n, "act_absmean": np.abs(x).mean(0), "act_sq": (x * x).mean(0),
            "act_absmax": np.abs(x).max(0), "count": n}


@pytest.fixture(scope="module")
def net():
    m = Net()
    x = jax.random.normal(jax.random.key(0), (8, 5, 12)) * jnp.linspace(0.1, 3.0, 12)
    return m, m.init(jax.random.key(1), x), x


def test_capture_matches_numpy_over_streamed_batches(net):
    m, v, x = net
    st = calibrate.capture(m, v, [x[:3], x[3:6], x[6:]])
    xa = np.asarray(x).reshape(-1, 12)
    ha = np.maximum(xa @ np.asarray(v["params"]["a"]["kernel"]) + np.asarray(v["params"]["a"]["bias"]), 0)
    hb = ha @ np.asarray(v["params"]["b"]["kernel"]).reshape(16, 8) + np.asarray(v["params"]["b"]["bias"]).reshape(8)
    for path, inp in (("a/kernel", xa), ("b/kernel", ha), ("c/kernel", hb)):
        ref = np_stats(inp)
        for k, r in ref.items():
            np.testing.assert_allclose(np.asarray(getattr(st[path], k)), r, rtol=2e-4, atol=2e-5, err_msg=f"{path} {k}")


def test_data_parallel_capture_on_8_devices_equals_single_device(net):
    m, v, x = net
    mesh = jax.make_mesh((8,), ("data",))
    a = calibrate.capture(m, v, [x])
    b = calibrate.capture(m, v, [x], mesh=mesh)
    for p in a:
        for x, y in zip(jax.tree_util.tree_leaves(a[p]), jax.tree_util.tree_leaves(b[p])):
            np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6)


def test_quantized_layers_are_not_recorded_and_unknown_paths_fail(net):
    m, v, x = net
    q = jq.quantize_params(v["params"], jq.QuantConfig.simple(jq.Scheme("int8"), pattern="a/kernel"))
    assert sorted(calibrate.capture(m, {"params": q}, [x])) == ["b/kernel", "c/kernel"]
    with pytest.raises(ValueError, match="'z/kernel' was never called"):
        calibrate.capture(m, v, [x], paths=["a/kernel", "z/kernel"])
    with pytest.raises(ValueError, match="no calibration batches"):
        calibrate.capture(m, v, [])


TINY = LlamaConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64, head_dim=8)
TINY_MHA = LlamaConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=4, hidden_dim=64, head_dim=8)


@pytest.mark.parametrize("cfg", [TINY, TINY_MHA], ids=["gqa", "mha"])
def test_folds_keep_the_float_model(cfg):
    params = init_params(cfg, jax.random.key(0))
    toks = jnp.asarray(np.random.default_rng(0).integers(0, 64, (3, 12)))
    folded = copy.deepcopy(params)
    for i in range(cfg.n_layers):
        blk = folded[f"layers_{i}"]
        for f in FOLDS:
            k, n_prev = np.asarray(_get(blk, f.consumers[0])).shape[0], np.asarray(_get(blk, f.prev)).shape[-1]
            s = jnp.exp(0.5 * jax.random.normal(jax.random.key(i), (k,)))
            if n_prev != k:  # v -> o under GQA: only with the heads' layout, and scales tied per kv head
                assert cfg.n_kv_heads != cfg.n_heads and f.channels(n_prev, k) is None
                s = tie(s, f.channels(n_prev, k, cfg.head_dim), n_prev)
            apply_fold(blk, f, s, cfg.head_dim)
    m = Llama(cfg)
    a, b = m.apply({"params": params}, toks), m.apply({"params": folded}, toks)
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-4)
    assert not np.allclose(np.asarray(folded["layers_0"]["input_norm"]["scale"]),
                           np.asarray(params["layers_0"]["input_norm"]["scale"]))


def test_gqa_channels_map_each_query_head_to_its_kv_head_and_tie_takes_geometric_means():
    idx = Fold.channels(2 * 3, 4 * 3, 3)  # 4 query heads over 2 kv heads of 3 channels
    np.testing.assert_array_equal(idx, [0, 1, 2, 0, 1, 2, 3, 4, 5, 3, 4, 5])
    assert Fold.channels(6, 12) is None and Fold.channels(5, 12, 3) is None and Fold.channels(6, 6).tolist() == list(range(6))
    s = np.exp(np.random.default_rng(0).standard_normal(12)).astype(np.float32)
    want = np.exp((np.log(s[idx == 0]).mean()))
    got = np.asarray(tie(jnp.asarray(s), idx, 6))
    np.testing.assert_allclose(got[[0, 3]], want, rtol=1e-5)
    np.testing.assert_allclose(got, got[np.array([0, 1, 2, 0, 1, 2, 6, 7, 8, 6, 7, 8])], rtol=0)
    # AWQ searches over tied candidates; an untied scale is refused by the fold, not silently half-applied
    rng = np.random.default_rng(1)
    x = rng.standard_normal((64, 12)).astype(np.float32) * np.exp(rng.standard_normal(12)).astype(np.float32)
    stats = LayerStats(hessian=jnp.asarray(x.T @ x / 64), act_absmean=jnp.asarray(np.abs(x).mean(0)))
    w = [jnp.asarray(rng.standard_normal((12, 8)), jnp.float32)]
    st = AWQScales().scales(w, stats, jq.Scheme("int4", group_size=4), tied=(tuple(idx.tolist()), 6))
    np.testing.assert_allclose(np.asarray(st), np.asarray(st)[np.array([0, 1, 2, 0, 1, 2, 6, 7, 8, 6, 7, 8])], rtol=1e-6)
    blk = {"v": jnp.ones((4, 6)), "o": jnp.ones((12, 4))}
    with pytest.raises(ValueError, match="differ between inputs that read one producer channel"):
        apply_fold(blk, Fold("v", ("o",)), jnp.asarray(s), 3)


def test_sequential_with_rtn_equals_quantize_params():
    params = init_params(TINY, jax.random.key(0))
    toks = np.random.default_rng(0).integers(0, 64, (5, 16))
    cfg = jq.QuantConfig.simple(jq.Scheme("int4", symmetric=False, group_size=16))
    seq, log = quantize_sequential(block_spec(TINY), params, cfg, toks, batch_size=2, progress=False)
    direct = jq.quantize_params(params, cfg)
    for (p, a), (_, b) in zip(jq.leaf_paths(seq), jq.leaf_paths(direct)):
        if isinstance(b, jq.QTensor):
            np.testing.assert_array_equal(np.asarray(a.dequantize()), np.asarray(b.dequantize()), err_msg=p)
    assert [b["block"] for b in log["blocks"]] == ["layers_0", "layers_1"]


def _stats_recording_method():
    """A calibrated method that records the Hessians it was given (then quantizes by RTN)."""
    seen = {}

    @register("_record_h", needs_calibration=True)
    def record(w, scheme, layout, stats=None):
        jax.debug.callback(lambda h: seen.__setitem__(len(seen), np.asarray(h)), stats.hessian)
        return METHODS["rtn"](w, scheme, layout)

    return seen


def test_true_sequential_stages_see_the_earlier_stages_quantized():
    seen = _stats_recording_method()
    try:
        params = init_params(TINY, jax.random.key(0))
        toks = np.random.default_rng(1).integers(0, 64, (4, 16))
        rule = jq.Rule(r"layers_0/attn/o_proj/kernel", jq.Scheme("int2", symmetric=False), method="_record_h")
        rtn = jq.Rule(r"layers_0/attn/[qkv]_proj/kernel", jq.Scheme("int2", symmetric=False))
        quantize_sequential(block_spec(TINY), params, jq.QuantConfig(rules=(rtn, rule)), toks, progress=False)
        h_seq = next(iter(seen.values()))
        # o_proj's input computed with the float q/k/v differs from the one with int2 q/k/v
        float_stats = calibrate.capture(block_spec(TINY).module, {"params": params["layers_0"]},
                                        [(jnp.take(jnp.asarray(params["embed"]["embedding"]), jnp.asarray(toks), 0),
                                          jnp.broadcast_to(jnp.arange(16), (4, 16)))], paths=["attn/o_proj/kernel"])
        assert not np.allclose(h_seq, np.asarray(float_stats["attn/o_proj/kernel"].hessian), rtol=1e-2)
    finally:
        METHODS.pop("_record_h")


def test_layer_without_tokens_falls_back_to_rtn_with_a_warning():
    _stats_recording_method()
    try:
        w = jnp.asarray(np.random.default_rng(0).normal(size=(32, 8)), jnp.float32)
        rule = jq.Rule(".*", jq.Scheme("int4", group_size=16), method="_record_h")
        stats = {"hessian": jnp.zeros((32, 32)), "count": jnp.asarray(0.0)}
        with pytest.warns(UserWarning, match="moe/expert_3/kernel: no calibration token reached this layer"):
            q = jq.tree.quantize.quantize_leaf("moe/expert_3/kernel", w, rule, stats)
        ref = METHODS["rtn"](w, rule.scheme, rule.scheme.layout((32, 8), (0,)))
        np.testing.assert_array_equal(np.asarray(q.dequantize()), np.asarray(ref.dequantize()))
        with pytest.raises(ValueError, match="needs calibration statistics"):
            jq.tree.quantize.quantize_leaf("x/kernel", w, rule, None)
    finally:
        METHODS.pop("_record_h")


class _Tok:
    def encode(self, text):
        return [ord(c) for c in text]


def test_calibration_tokens_are_seeded_non_overlapping_windows(tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("".join(chr(65 + i % 26) for i in range(400)))
    b.write_text("".join(chr(97 + i % 26) for i in range(300)))
    t1 = calibration_tokens(_Tok(), [a, b], samples=6, length=50, seed=3)
    t2 = calibration_tokens(_Tok(), [a, b], samples=6, length=50, seed=3)
    assert t1.shape == (6, 50) and np.array_equal(t1, t2)
    assert len({tuple(r) for r in t1}) == 6
    with pytest.raises(ValueError, match=r"calibration text too short: .* hold 700 tokens, 14 windows of 50; 20 were"):
        calibration_tokens(_Tok(), [a, b], samples=20, length=50)


def test_stream_sampling_draws_any_start_in_the_concatenated_text(tmp_path):
    """The published GPTQ code's draw: random starts anywhere, windows may overlap and straddle two files."""
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    rng = np.random.default_rng(0)  # aperiodic text, so each window has one place in the stream
    a.write_text("".join(chr(c) for c in rng.integers(65, 91, 130)))
    b.write_text("".join(chr(c) for c in rng.integers(97, 123, 70)))
    stream = np.array([ord(c) for c in a.read_text() + b.read_text()], np.int32)
    t = calibration_tokens(_Tok(), [a, b], samples=40, length=50, seed=1, sampling="stream")
    assert t.shape == (40, 50) and t.dtype == np.int32
    starts = [next(i for i in range(len(stream) - 49) if np.array_equal(stream[i : i + 50], row)) for row in t]
    assert any(s % 50 for s in starts) and len(set(starts)) < 40  # unaligned starts, drawn with replacement
    assert any(s < 130 < s + 50 for s in starts)  # some window straddles the two files
    assert np.array_equal(t, calibration_tokens(_Tok(), [a, b], samples=40, length=50, seed=1, sampling="stream"))
    # more samples than aligned windows is fine for a stream draw (with replacement)
    assert calibration_tokens(_Tok(), [a, b], samples=9, length=50, sampling="stream").shape == (9, 50)
    with pytest.raises(ValueError, match=r"hold 200 tokens, fewer than one window of 300"):
        calibration_tokens(_Tok(), [a, b], samples=1, length=300, sampling="stream")
    with pytest.raises(ValueError, match=r"calibration sampling 'random': expected one of windows, stream"):
        calibration_tokens(_Tok(), [a, b], samples=1, length=50, sampling="random")
    tokens, record = calibration_draw(_Tok(), [a, b], samples=3, length=50, seed=2, sampling="stream")
    assert record == {"files": [str(a), str(b)], "samples": 3, "length": 50, "seed": 2, "sampling": "stream"}
    assert np.array_equal(tokens, calibration_tokens(_Tok(), [a, b], 3, 50, 2, "stream"))


def test_w8a8_int_path_matches_numpy_and_fake_path():
    x = jax.random.normal(jax.random.key(0), (3, 5, 64)) * 2
    w = jax.random.normal(jax.random.key(1), (64, 32))
    xn = np.asarray(x, np.float64)
    xs = np.abs(xn).max(-1, keepdims=True) / 127
    xq = np.clip(np.round(xn / xs), -127, 127) * xs
    for scheme in (jq.Scheme("int8", act="int8"), jq.Scheme("int4", group_size=16, act="int8")):
        q = jq.quantize_params({"k": {"kernel": w}}, jq.QuantConfig.simple(scheme))["k"]["kernel"]
        y = np.asarray(jax.jit(jq.ops.qdot)(x, q))
        np.testing.assert_allclose(y, xq @ np.asarray(q.dequantize(), np.float64), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="'act' has value 'int5'"):
        jq.Scheme("int8", act="int5")


def _logit_error(cfg, params, q, toks):
    m = Llama(cfg)
    ref = m.apply({"params": params}, toks)
    out = jax.jit(lambda p, t: jq.interop.apply(m, {"params": p}, t))(q, toks)
    return float(jnp.mean((out - ref) ** 2))


def _outlier_params(cfg, seed=0):
    """Random params whose norm scales have a few large channels, as real LLMs do (what AWQ/SmoothQuant target)."""
    params = init_params(cfg, jax.random.key(seed))
    for i in range(cfg.n_layers):
        for norm in ("input_norm", "post_attn_norm"):
            s = np.ones(cfg.dim, np.float32)
            s[[3, 17]] = 20.0
            params[f"layers_{i}"][norm]["scale"] = s
    return params


def test_awq_recipe_end_to_end_beats_rtn_on_outlier_channels():
    cfg = TINY_MHA
    params = _outlier_params(cfg)
    rng = np.random.default_rng(0)
    calib, held = rng.integers(0, 64, (8, 16)), jnp.asarray(rng.integers(0, 64, (4, 16)))
    base = dict(pattern=".*kernel", format="int3", symmetric=False, group_size=16)
    awq = jq.recipe_from_dict({"rules": [{**base, "transforms": ["awq"], "method": "awq_clip"}]})
    rtn = jq.recipe_from_dict({"rules": [base]})
    assert awq.needs_calibration and not rtn.needs_calibration
    qa, log = quantize_sequential(block_spec(cfg), params, awq, calib, progress=False)
    assert {t["prev"] for t in log["transforms"]} == {f.prev for f in FOLDS}  # v -> o allowed without GQA
    _, log_gqa = quantize_sequential(block_spec(TINY), _outlier_params(TINY), awq, calib, progress=False)
    assert {t["prev"] for t in log_gqa["transforms"]} == {f.prev for f in FOLDS}  # and with it: scales tied per head
    assert not np.allclose(np.asarray(qa["layers_0"]["input_norm"]["scale"]), params["layers_0"]["input_norm"]["scale"])
    e_awq = _logit_error(cfg, params, qa, held)
    e_rtn = _logit_error(cfg, params, jq.quantize_params(params, rtn), held)
    assert e_awq < 0.8 * e_rtn, (e_awq, e_rtn)


def test_smoothquant_w8a8_recipe_runs_the_int8_path_and_beats_plain_w8a8():
    cfg = TINY
    params = _outlier_params(cfg, seed=1)
    rng = np.random.default_rng(1)
    calib, held = rng.integers(0, 64, (8, 16)), jnp.asarray(rng.integers(0, 64, (4, 16)))
    base = dict(pattern=".*kernel", format="int8", restricted=True, granularity="channel", act="int8")
    sq = jq.recipe_from_dict({"rules": [{**base, "transforms": [{"smoothquant": {"alpha": 0.5}}]}]})
    plain = jq.recipe_from_dict({"rules": [base]})
    qs, _ = quantize_sequential(block_spec(cfg), params, sq, calib, progress=False)
    assert qs["layers_0"]["attn"]["q_proj"]["kernel"].policy.act == "int8"
    assert _logit_error(cfg, params, qs, held) < _logit_error(cfg, params, jq.quantize_params(params, plain), held)


def test_llama_staged_fast_path_equals_generic_true_sequential():
    import dataclasses

    @register("_mse_cal", needs_calibration=True)
    def mse_cal(w, scheme, layout, stats=None):  # a data-dependent method: clip search weighted by act_sq
        return METHODS["rtn"](w, scheme, layout, {"act_sq": stats.act_sq})

    try:
        params = init_params(TINY, jax.random.key(0))
        toks = np.random.default_rng(0).integers(0, 64, (6, 16))
        cfg = jq.QuantConfig.simple(jq.Scheme("int3", symmetric=False, group_size=16, range="mse"), method="_mse_cal")
        spec = block_spec(TINY)
        fast, _ = quantize_sequential(spec, params, cfg, toks, batch_size=4, progress=False)
        slow, _ = quantize_sequential(dataclasses.replace(spec, staged=None), params, cfg, toks, batch_size=4,
                                      progress=False)
        for (p, a), (_, b) in zip(jq.leaf_paths(fast), jq.leaf_paths(slow)):
            a = a.dequantize() if isinstance(a, jq.QTensor) else a
            b = b.dequantize() if isinstance(b, jq.QTensor) else b
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=p)
    finally:
        METHODS.pop("_mse_cal")


def test_transform_errors_name_the_problem():
    with pytest.raises(ValueError, match=r"rules\[0\]: unknown transform 'rotate'; choose from \['awq', 'smoothquant'\]"):
        jq.recipe_from_dict({"rules": [{"pattern": ".*", "transforms": ["rotate"]}]})
    with pytest.raises(ValueError, match="'transforms' must be a list"):
        jq.recipe_from_dict({"rules": [{"pattern": ".*", "transforms": "awq"}]})
    params = init_params(TINY, jax.random.key(0))
    toks = np.random.default_rng(0).integers(0, 64, (2, 8))
    mixed = jq.recipe_from_dict({"rules": [
        {"pattern": r".*/q_proj/kernel", "transforms": ["awq"], "method": "awq_clip", "format": "int4"},
        {"pattern": ".*kernel", "format": "int4"}]})
    with pytest.raises(ValueError, match=r"layers_0: layers .*q_proj.* share an input but their rules ask for "
                                         "different transforms"):
        quantize_sequential(block_spec(TINY), params, mixed, toks, progress=False)
