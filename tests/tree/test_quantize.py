"""quantize_params / dequantize_params / report on nested dicts and NNX States: rule order, default ignores,
force, unmatched-rule warnings, non-finite weights, jit, and the per-leaf report against NumPy."""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jq
from jq import QTensor, QuantConfig, Rule, Scheme
from jq.tree.report import summarize
from jqtest.npref import NF4_QLORA, check_quantized

INT8 = Scheme("int8")
INT4 = Scheme("int4", symmetric=False, group_size=16)
NF4 = Scheme("nf4", group_size=16)


def make_params(seed=0):
    rng = np.random.default_rng(seed)
    n = lambda *s: (rng.standard_normal(s) * 0.5).astype(np.float32)  # noqa: E731
    return {
        "embed_tokens": {"embedding": n(48, 32)},
        "layers_0": {
            "attn": {"q_proj": {"kernel": n(32, 32), "bias": n(32)}, "o_proj": {"kernel": n(32, 32)}},
            "input_layernorm": {"scale": n(32)},
            "pre_norm": {"weight": n(4, 32)},  # a 2-D leaf, ignored by name
            "mlp": {"up": {"kernel": n(32, 64)}},
        },
        "lm_head": {"kernel": n(32, 48)},
        "final_norm": {"scale": n(32)},
    }


def get(tree, path):
    for p in path.split("/"):
        tree = tree[p]
    return tree


def codes_as_values(q):
    c = np.asarray(q.unpacked_codes())
    if q.fmt == "nf4":
        return NF4_QLORA[c.astype(np.int64)]
    return c.astype(np.float32)


def check_leaf(q, w, scheme, axes=(0,)):
    assert isinstance(q, QTensor)
    assert q.fmt == scheme.format and q.layout.axes == tuple(axes)
    zero = None if q.zero is None else np.asarray(q.zero, np.float32)
    check_quantized(np.asarray(w), np.asarray(q.scale, np.float32), zero, codes_as_values(q),
                    np.asarray(q.dequantize()), fmt=scheme.format, symmetric=scheme.symmetric,
                    granularity=scheme.granularity, group_size=scheme.group_size, axes=axes,
                    scale_dtype=scheme.scale_dtype)


CFG = QuantConfig(rules=(Rule(r".*q_proj/kernel", INT8), Rule(r".*kernel", INT4)), name="t")


def test_first_matching_rule_wins_and_defaults_are_ignored():
    params = make_params()
    out = jq.quantize_params(params, CFG)
    assert jax.tree.structure(params) == jax.tree.structure(
        jax.tree.map(lambda x: 0, out, is_leaf=lambda x: isinstance(x, QTensor))
    )
    check_leaf(out["layers_0"]["attn"]["q_proj"]["kernel"], params["layers_0"]["attn"]["q_proj"]["kernel"], INT8)
    check_leaf(out["layers_0"]["attn"]["o_proj"]["kernel"], params["layers_0"]["attn"]["o_proj"]["kernel"], INT4)
    check_leaf(out["layers_0"]["mlp"]["up"]["kernel"], params["layers_0"]["mlp"]["up"]["kernel"], INT4)
    # everything else is returned untouched (the very same objects)
    for path in ["embed_tokens/embedding", "layers_0/attn/q_proj/bias", "layers_0/input_layernorm/scale",
                 "layers_0/pre_norm/weight", "lm_head/kernel", "final_norm/scale"]:
        assert get(out, path) is get(params, path), path
    quantized = {p for p, v in jq.leaf_paths(out) if isinstance(v, QTensor)}
    assert quantized == {"layers_0/attn/q_proj/kernel", "layers_0/attn/o_proj/kernel", "layers_0/mlp/up/kernel"}


def test_force_reaches_ignored_leaves_and_skip_keeps_float():
    params = make_params(1)
    cfg = QuantConfig(
        rules=(
            Rule(r"lm_head/kernel", NF4, force=True),
            Rule(r"embed_tokens/embedding", INT8, force=True),
            Rule(r".*o_proj/kernel", None),  # skip
            Rule(r".*kernel", INT4),
            Rule(r"final_norm/scale", INT8, force=True),  # 1-D leaves are ignored by rank; force reaches them too
            Rule(r"layers_0/input_layernorm/scale", INT8),  # ... but not without force
        )
    )
    with pytest.warns(UserWarning, match=r"rule pattern 'layers_0/input_layernorm/scale' matched no parameter"):
        out = jq.quantize_params(params, cfg)
    check_leaf(out["lm_head"]["kernel"], params["lm_head"]["kernel"], NF4)
    # embeddings contract their last axis (as in `attend`): one scale per row
    emb = out["embed_tokens"]["embedding"]
    assert emb.layout.axes == (1,) and emb.scale.shape == (48, 1)
    check_leaf(emb, params["embed_tokens"]["embedding"], INT8, axes=(1,))
    assert out["layers_0"]["attn"]["o_proj"]["kernel"] is params["layers_0"]["attn"]["o_proj"]["kernel"]
    assert isinstance(out["layers_0"]["attn"]["q_proj"]["kernel"], QTensor)
    check_leaf(out["final_norm"]["scale"], params["final_norm"]["scale"], INT8)
    assert out["final_norm"]["scale"].scale.shape == (1,)
    assert out["layers_0"]["input_layernorm"]["scale"] is params["layers_0"]["input_layernorm"]["scale"]


def test_unmatched_rule_warns_naming_the_pattern():
    params = make_params()
    cfg = QuantConfig(rules=(Rule(r".*kernel", INT4), Rule(r".*qproj.*", INT8)), name="typo")
    with pytest.warns(UserWarning, match=r"recipe 'typo': rule pattern '\.\*qproj\.\*' matched no parameter"):
        jq.quantize_params(params, cfg)
    # a rule that only matches ignored leaves also never applies
    cfg = QuantConfig(rules=(Rule(r".*kernel", INT4), Rule(r".*bias", INT8)))
    with pytest.warns(UserWarning, match=r"rule pattern '\.\*bias' matched no parameter"):
        jq.quantize_params(params, cfg)
    # a recipe written for other names lists the matrices it could have matched
    cfg = QuantConfig(rules=(Rule(r".*/w", INT4),), name="other_names")
    with pytest.warns(UserWarning, match=r"'\.\*/w' matched no parameter.*matrices no rule quantizes include "
                                         r"layers_0/\S+/kernel \(\d+, \d+\).*embed_tokens/embedding"):
        jq.quantize_params(params, cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        jq.quantize_params(params, cfg, warn_unmatched=False)
        jq.quantize_params(params, CFG)


@pytest.mark.parametrize("bad,idx", [(np.nan, (3, 5)), (np.inf, (0, 31)), (-np.inf, (31, 0))])
def test_non_finite_weight_names_path_and_index(bad, idx):
    params = make_params()
    w = params["layers_0"]["mlp"]["up"]["kernel"]
    w[idx] = bad
    w[31, 63] = bad  # the first one (row-major) is reported
    with pytest.raises(
        ValueError,
        match=rf"^layers_0/mlp/up/kernel: 2 non-finite value\(s\) in a weight of shape \(32, 64\) "
        rf"\(first at index \({idx[0]}, {idx[1]}\): .*ignore: \['layers_0/mlp/up/kernel'\]",
    ):
        jq.quantize_params(params, CFG)
    # a non-finite value in a leaf that stays float is not an error
    params = make_params()
    params["lm_head"]["kernel"][0, 0] = bad
    jq.quantize_params(params, CFG)


def test_non_finite_bfloat16_weight():
    w = np.ones((16, 16), np.float32)
    w[2, 7] = np.inf
    with pytest.raises(ValueError, match=r"^k: 1 non-finite value\(s\).*first at index \(2, 7\)"):
        jq.quantize_params({"k": jnp.asarray(w, jnp.bfloat16)}, QuantConfig(rules=(Rule("k", INT8),)))


def test_non_float_and_bad_group_errors_name_the_path():
    with pytest.raises(ValueError, match=r"^a/kernel: dtype int32 is not floating point"):
        jq.quantize_params({"a": {"kernel": np.ones((16, 16), np.int32)}}, CFG, warn_unmatched=False)
    with pytest.raises(ValueError, match=r"^a/kernel: group_size 16 does not divide axis 0 of length 20.*pad: true"):
        jq.quantize_params({"a": {"kernel": np.ones((20, 16), np.float32)}}, CFG, warn_unmatched=False)


def test_jit_equals_eager():
    params = jax.tree.map(jnp.asarray, make_params(2))
    eager = jq.quantize_params(params, CFG)
    jitted = jax.jit(lambda p: jq.quantize_params(p, CFG))(params)
    is_q = lambda x: isinstance(x, QTensor)  # noqa: E731
    assert jax.tree.structure(eager) == jax.tree.structure(jitted)  # same static layouts / formats
    assert jax.tree.structure(eager, is_leaf=is_q) == jax.tree.structure(jitted, is_leaf=is_q)
    for a, b in zip(jax.tree.leaves(eager), jax.tree.leaves(jitted)):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_already_quantized_leaves_pass_through():
    params = make_params()
    out = jq.quantize_params(params, CFG)
    again = jq.quantize_params(out, CFG, warn_unmatched=False)
    q = out["layers_0"]["mlp"]["up"]["kernel"]
    assert again["layers_0"]["mlp"]["up"]["kernel"] is q


def test_dequantize_params_inverts_structure():
    params = make_params(3)
    out = jq.quantize_params(params, CFG)
    deq = jq.dequantize_params(out)
    assert jax.tree.structure(deq) == jax.tree.structure(params)
    for (p, a), (_, b) in zip(jq.leaf_paths(deq), jq.leaf_paths(params)):
        assert a.shape == b.shape and a.dtype == b.dtype, p
        q = get(out, p)
        if isinstance(q, QTensor):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(q.dequantize()))
            assert 0 < np.linalg.norm(a - b) / np.linalg.norm(b) < 0.2
        else:
            assert a is b
    bf = jq.dequantize_params(out, jnp.bfloat16)
    assert bf["layers_0"]["mlp"]["up"]["kernel"].dtype == jnp.bfloat16
    assert bf["lm_head"]["kernel"].dtype == np.float32  # float leaves are left alone


def test_report_rows_and_summary():
    params = make_params(4)
    out = jq.quantize_params(params, CFG)
    rows = jq.report(params, out)
    by = {r.path: r for r in rows}
    assert set(by) == {p for p, _ in jq.leaf_paths(params)}
    # quantized rows: honest bits and the relative Frobenius error, against NumPy
    for path, scheme, bpw in [
        ("layers_0/attn/q_proj/kernel", "int8 sym channel", 8 + 16 / 32),
        ("layers_0/attn/o_proj/kernel", "int4 asym g16", 4 + 16 / 16 + 8 / 16),
        ("layers_0/mlp/up/kernel", "int4 asym g16", 4 + 16 / 16 + 8 / 16),
    ]:
        r = by[path]
        w = get(params, path).astype(np.float64)
        d = np.asarray(get(out, path).dequantize(), np.float64)
        assert r.scheme == scheme and r.shape == w.shape
        assert r.bits_per_weight == pytest.approx(bpw)
        assert r.nbytes == get(out, path).nbytes == pytest.approx(bpw * w.size / 8)
        assert r.rel_error == pytest.approx(np.linalg.norm(d - w) / np.linalg.norm(w), rel=1e-5)
        assert 0 < r.rel_error < (0.02 if "int8" in scheme else 0.2)
    for path in ["embed_tokens/embedding", "lm_head/kernel", "final_norm/scale"]:
        r = by[path]
        assert r.scheme == "float (float32)" and r.rel_error is None and r.bits_per_weight == 32.0
        assert r.nbytes == get(params, path).size * 4
    s = summarize(rows)
    sizes = {p: v.size for p, v in jq.leaf_paths(params)}
    qpaths = ["layers_0/attn/q_proj/kernel", "layers_0/attn/o_proj/kernel", "layers_0/mlp/up/kernel"]
    total_bytes = sum(by[p].nbytes for p in by)
    assert s["params"] == sum(sizes.values())
    assert s["model_bytes"] == total_bytes == sum(4 * n for p, n in sizes.items() if p not in qpaths) + sum(
        get(out, p).nbytes for p in qpaths
    )
    assert s["bits_per_weight"] == pytest.approx(8 * total_bytes / s["params"])
    assert s["quantized_params"] == sum(sizes[p] for p in qpaths)
    assert s["quantized_bits_per_weight"] == pytest.approx(8 * sum(by[p].nbytes for p in qpaths) / s["quantized_params"])
    table = jq.format_report(rows, only_quantized=True)
    assert table.row_count == 3


def test_calibration_statistics_reach_the_method():
    """act_sq statistics (flat by path, or nested) weight the MSE clip search: same result as calling rtn."""
    rng = np.random.default_rng(5)
    w = rng.standard_t(3, size=(32, 16)).astype(np.float32)
    act = np.exp(rng.standard_normal(32) * 2).astype(np.float32)
    scheme = Scheme("int4", group_size=16, range="mse", mse_grid=20, mse_max_shrink=0.5)
    cfg = QuantConfig(rules=(Rule(".*kernel", scheme),))
    expect = jq.algorithms.get_method("rtn")(jnp.asarray(w), scheme, scheme.layout(w.shape, (0,)),
                                            {"act_sq": jnp.asarray(act)})
    without = jq.quantize_params({"d": {"kernel": w}}, cfg)["d"]["kernel"]
    for calib in ({"d/kernel": {"act_sq": act}}, {"d": {"kernel": {"act_sq": act}}}):
        got = jq.quantize_params({"d": {"kernel": w}}, cfg, calib=calib)["d"]["kernel"]
        np.testing.assert_array_equal(np.asarray(got.dequantize()), np.asarray(expect.dequantize()))
    assert not np.array_equal(np.asarray(without.dequantize()), np.asarray(expect.dequantize()))


# ---------------------------------------------------------------------------------------------------------- NNX


class Tiny(nnx.Module):
    def __init__(self, rngs):
        self.lin = nnx.Linear(32, 16, rngs=rngs)
        self.norm = nnx.LayerNorm(16, rngs=rngs)
        self.out = nnx.Linear(16, 32, rngs=rngs)


def test_nnx_state():
    _, state = nnx.split(Tiny(nnx.Rngs(0)))
    paths = [p for p, _ in jq.leaf_paths(state)]
    assert "lin/kernel" in paths and "out/kernel" in paths  # no trailing 'value'
    cfg = QuantConfig(rules=(Rule(r"lin/kernel", INT4), Rule(r"out/kernel", INT8)))  # exact paths
    q = jq.quantize_params(state, cfg)
    assert type(q) is type(state)
    qpaths = {p: v for p, v in jq.leaf_paths(q)}
    check_leaf(qpaths["lin/kernel"], np.asarray(state["lin"]["kernel"][...]), INT4)
    check_leaf(qpaths["out/kernel"], np.asarray(state["out"]["kernel"][...]), INT8)
    for p in ["lin/bias", "norm/scale", "norm/bias", "out/bias"]:
        assert not isinstance(qpaths[p], QTensor)
    deq = jq.dequantize_params(q)
    assert jax.tree.structure(deq) == jax.tree.structure(state)
    np.testing.assert_array_equal(np.asarray(deq["lin"]["kernel"][...]), np.asarray(qpaths["lin/kernel"].dequantize()))
    jitted = jax.jit(lambda s: jq.quantize_params(s, cfg))(state)
    for a, b in zip(jax.tree.leaves(jitted), jax.tree.leaves(q)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_requantizing_a_quantized_tree_passes_leaves_through_without_warning():
    import warnings as _w

    params = {"dense": {"kernel": np.random.default_rng(0).normal(size=(32, 8)).astype(np.float32)}}
    cfg = jq.QuantConfig.simple(jq.Scheme("int4", group_size=16))
    q1 = jq.quantize_params(params, cfg)
    with _w.catch_warnings():
        _w.simplefilter("error")
        q2 = jq.quantize_params(q1, cfg)
    assert q2["dense"]["kernel"] is q1["dense"]["kernel"]


# -- scales that do not fit their dtype ------------------------------------------------------------------------


def test_scale_overflow_is_refused_naming_leaf_range_and_fix():
    """float16 scales top out at 65504: an int4 asym group spanning ~1e6 would store an infinite scale and
    dequantize to NaN. It is refused at quantization time; float32 / bfloat16 scales hold it."""
    w = np.random.default_rng(0).standard_normal((64, 8)).astype(np.float32)
    w[3, 2] = 1.0e6
    params = {"blk": {"kernel": w}}
    cfg = QuantConfig.simple(Scheme("int4", symmetric=False, group_size=32))
    with pytest.raises(ValueError, match=r"blk/kernel: 1 of 16 scales overflow scale_dtype float16 \(largest finite "
                                         r"value 6\.55e\+04\): a group of 32 spans 1e\+06 \(max − min\).*"
                                         r"scale_dtype: float32 \(or bfloat16\).*ignore: \['blk/kernel'\]"):
        jq.quantize_params(params, cfg)
    for sdt in ("float32", "bfloat16"):
        q = jq.quantize_params(params, QuantConfig.simple(Scheme("int4", symmetric=False, group_size=32,
                                                                 scale_dtype=sdt)))
        deq = np.asarray(q["blk"]["kernel"].dequantize())
        assert np.isfinite(deq).all() and abs(deq[3, 2] - 1.0e6) < 0.1e6
    w[3, 2] = 1.0e7  # int8 symmetric: scale = max |w| / 127.5
    with pytest.raises(ValueError, match=r"blk/kernel: 1 of 8 scales overflow .* an output channel spans 1e\+07 "
                                         r"\(max \|w\|\), so its int8 scale would be about 7\.843e\+04"):
        jq.quantize_params(params, QuantConfig.simple(Scheme("int8", scale_dtype="float16")))


def test_scale_underflow_warns_that_the_groups_dequantize_to_zero():
    w = np.random.default_rng(0).standard_normal((64, 8)).astype(np.float32)
    w[:32, 0] *= 1e-9  # one group far below float16's smallest subnormal scale
    with pytest.warns(UserWarning, match=r"blk/kernel: 1 of 16 scales underflow scale_dtype float16 .* dequantize to "
                                         r"zero"):
        q = jq.quantize_params({"blk": {"kernel": w}}, QuantConfig.simple(Scheme("int4", group_size=32)))
    assert np.all(np.asarray(q["blk"]["kernel"].dequantize())[:32, 0] == 0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an all-zero group is exact, not lost
        jq.quantize_params({"blk": {"kernel": np.zeros((64, 8), np.float32)}}, QuantConfig.simple(INT4))


def test_verify_refuses_a_stored_overflowed_scale(tmp_path):
    """A checkpoint written before the refusal (CRCs all fine) is caught by verify / jq inspect."""
    import dataclasses

    from jq import checkpoint

    q = jq.quantize_params({"blk": {"kernel": np.ones((32, 8), np.float32)}}, QuantConfig.simple(INT4))
    k = q["blk"]["kernel"]
    bad = dataclasses.replace(k, scale=jnp.asarray(k.scale).at[0, 0].set(jnp.inf))
    d = checkpoint.save(tmp_path / "q", {"blk": {"kernel": bad}})
    with pytest.raises(checkpoint.CheckpointError, match=r"leaf 'blk/kernel': 1 of 16 scale values are not finite"):
        checkpoint.verify(d)
