"""The Gemma 3 family: the module against a NumPy reference, decoding against the full forward (past the sliding
window), GGUF (K-quants included) and Hugging Face readers, and calibrated quantization through its blocks."""

from __future__ import annotations

import dataclasses
import json

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from safetensors.numpy import save_file

import jq
from jq.models import family_for_gguf, load_model
from jq.models.gemma3 import Gemma3Config, init_cache, init_params, make_decode, make_forward
from jq.models.decoder import kv_bytes_per_token
from jq.models.gemma3.blocks import block_spec
from jq.models.gemma3.model import cache_bytes_per_token
from jq.numbers.kvcache import KVCacheConfig
from jq.tree.recipe import recipe_from_dict
from jqtest.llama import MERGES, SPECIALS, TOKENS, flat

CFG = Gemma3Config.tiny(vocab_size=len(TOKENS))


def np_rms(x, s, eps):
    return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * s


def np_rope(x, pos, theta):  # x [T, H, D], rotate-half
    d = x.shape[-1]
    inv = 1.0 / theta ** (np.arange(0, d, 2) / d)
    a = pos[:, None] * inv
    c, s = np.cos(a)[:, None], np.sin(a)[:, None]
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return np.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], -1)


def np_gemma(cfg: Gemma3Config, p: dict, tokens: np.ndarray) -> np.ndarray:
    """Gemma 3 written out from its description, in float64, one sequence: tokens [T] -> logits [T, V]."""
    p = {k: np.asarray(v, np.float64) for k, v in p.items()}
    t, eps, hd = len(tokens), cfg.norm_eps, cfg.head_dim
    x = p["embed/embedding"][tokens] * np.sqrt(cfg.dim)
    pos = np.arange(t, dtype=np.float64)
    gelu = lambda z: 0.5 * z * (1 + np.tanh(np.sqrt(2 / np.pi) * (z + 0.044715 * z ** 3)))  # noqa: E731
    for i in range(cfg.n_layers):
        w = {k.split("/", 1)[1]: v for k, v in p.items() if k.startswith(f"layers_{i}/")}
        h = np_rms(x, w["input_norm/scale"], eps)
        q = (h @ w["attn/q_proj/kernel"]).reshape(t, cfg.n_heads, hd)
        k = (h @ w["attn/k_proj/kernel"]).reshape(t, cfg.n_kv_heads, hd)
        v = (h @ w["attn/v_proj/kernel"]).reshape(t, cfg.n_kv_heads, hd)
        theta = cfg.rope_global if cfg.is_global(i) else cfg.rope_local
        q = np_rope(np_rms(q, w["attn/q_norm/scale"], eps), pos, theta)
        k = np_rope(np_rms(k, w["attn/k_norm/scale"], eps), pos, theta)
        out = np.zeros((t, cfg.n_heads, hd))
        for head in range(cfg.n_heads):
            kv = head // cfg.group_size
            s = q[:, head] @ k[:, kv].T / np.sqrt(cfg.query_scale)
            qi, ki = np.meshgrid(np.arange(t), np.arange(t), indexing="ij")
            ok = (ki <= qi) & ((qi - ki < cfg.sliding_window) | cfg.is_global(i))
            s = np.where(ok, s, -np.inf)
            e = np.exp(s - s.max(-1, keepdims=True))
            out[:, head] = (e / e.sum(-1, keepdims=True)) @ v[:, kv]
        x = x + np_rms(out.reshape(t, -1) @ w["attn/o_proj/kernel"], w["post_attn_norm/scale"], eps)
        h = np_rms(x, w["pre_mlp_norm/scale"], eps)
        m = (gelu(h @ w["mlp/gate_proj/kernel"]) * (h @ w["mlp/up_proj/kernel"])) @ w["mlp/down_proj/kernel"]
        x = x + np_rms(m, w["post_mlp_norm/scale"], eps)
    return np_rms(x, p["final_norm/scale"], eps) @ p["embed/embedding"].T


def random_params(cfg: Gemma3Config, seed: int = 0) -> dict:
    params = init_params(cfg, jax.random.key(seed))
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map_with_path(  # norms away from 1, so a missed norm shows
        lambda k, v: (1 + 0.3 * rng.standard_normal(v.shape)).astype(np.float32) if "scale" in jax.tree_util.keystr(k)
        else np.asarray(v), params)


def test_the_module_matches_a_numpy_reference_past_the_sliding_window():
    params = random_params(CFG)
    tokens = np.random.default_rng(1).integers(0, CFG.vocab_size, 20)  # 20 > window 8: the local mask matters
    got = np.asarray(make_forward(CFG)(params, jnp.asarray(tokens[None], jnp.int32)))[0]
    np.testing.assert_allclose(got, np_gemma(CFG, flat(params), tokens), rtol=2e-4, atol=2e-4)


@pytest.mark.parametrize("kv", [None, KVCacheConfig(format="int8", group_size=16)])
def test_decoding_with_a_cache_equals_the_full_forward(kv):
    params = random_params(CFG, seed=2)
    tokens = jnp.asarray(np.random.default_rng(3).integers(0, CFG.vocab_size, (2, 20)), jnp.int32)
    full = make_forward(CFG, kv_cache=kv)(params, tokens)
    prefill, step = (jax.jit(f) for f in make_decode(CFG, kv_cache=kv))
    cache = init_cache(CFG, 2, 24, kv)
    logits, cache = prefill(params, cache, tokens[:, :5])
    rows = [logits]
    for pos in range(5, 20):
        lg, cache = step(params, cache, tokens[:, pos], pos)
        rows.append(lg[:, None])
    np.testing.assert_allclose(np.concatenate(rows, 1), full, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kv", [KVCacheConfig(format="int4", group_size=8),
                                KVCacheConfig(format="int4", keys="channel", key_group=4)], ids=lambda k: k.describe())
def test_local_layers_decode_from_a_ring_of_window_rows(kv):
    """Local layers keep `sliding_window` rows (a ring), the global one every row; a prefill longer than the window,
    then decoding past max_len's worth of wraps, equals the full forward (float and int8 rings: the test above;
    per-channel keys: complete key blocks in the ring, the open one exact beside it)."""
    params = random_params(CFG, seed=4)
    tokens = jnp.asarray(np.random.default_rng(5).integers(0, CFG.vocab_size, (2, 30)), jnp.int32)
    cache = init_cache(CFG, 2, 40, kv)
    rows = {name: jax.tree.leaves(layer["k"])[0].shape[1] for name, layer in cache.items()}
    assert rows == {"layers_0": 8, "layers_1": 40, "layers_2": 8} and "pos" not in cache["layers_1"]
    prefill, step = (jax.jit(f) for f in make_decode(CFG, kv_cache=kv))
    logits, cache = prefill(params, cache, tokens[:, :13])  # 13 > window 8: only the newest 8 rows are kept
    assert sorted(np.asarray(cache["layers_0"]["pos"]).tolist()) == list(range(5, 13))
    out = [logits]
    for pos in range(13, 30):  # the ring wraps twice
        lg, cache = step(params, cache, tokens[:, pos], pos)
        out.append(lg[:, None])
    np.testing.assert_allclose(np.concatenate(out, 1), make_forward(CFG, kv_cache=kv)(params, tokens), rtol=1e-4,
                               atol=1e-4)
    # what each further token adds: the one global layer's rows of three layers' worth
    assert cache_bytes_per_token(CFG, kv) == kv_bytes_per_token(CFG, kv) // 3


LAYOUT = {  # GGUF block tensor -> (parameter under layers_i, storage type)
    "attn_norm": ("input_norm/scale", Q.F32), "attn_q": ("attn/q_proj/kernel", Q.Q5_0),
    "attn_k": ("attn/k_proj/kernel", Q.Q8_0), "attn_v": ("attn/v_proj/kernel", Q.Q8_0),
    "attn_output": ("attn/o_proj/kernel", Q.F16), "attn_q_norm": ("attn/q_norm/scale", Q.F32),
    "attn_k_norm": ("attn/k_norm/scale", Q.F32), "post_attention_norm": ("post_attn_norm/scale", Q.F32),
    "ffn_norm": ("pre_mlp_norm/scale", Q.F32), "ffn_gate": ("mlp/gate_proj/kernel", Q.Q5_0),
    "ffn_up": ("mlp/up_proj/kernel", Q.Q4_0), "ffn_down": ("mlp/down_proj/kernel", Q.F32),
    "post_ffw_norm": ("post_mlp_norm/scale", Q.F32),
}


def write_gemma_gguf(path, cfg: Gemma3Config, params: dict, arch: str = "gemma3") -> dict:
    """A llama.cpp-style gemma3 GGUF of `params` (each weight stored in its LAYOUT type); returns the flat params
    the file holds exactly (after that type's rounding)."""
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg.n_layers)
    w.add_context_length(cfg.max_seq_len)
    w.add_embedding_length(cfg.dim)
    w.add_feed_forward_length(cfg.hidden_dim)
    w.add_head_count(cfg.n_heads)
    w.add_head_count_kv(cfg.n_kv_heads)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_rope_freq_base(cfg.rope_global)
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    w.add_sliding_window(cfg.sliding_window)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(TOKENS)
    w.add_token_types([3 if t in SPECIALS else 1 for t in TOKENS])
    w.add_token_merges(MERGES)
    stored = {}

    def put(name, value, qtype, path_):
        arr = value.T if path_.endswith("kernel") else value  # GGUF keeps linears (out, in)
        arr = np.ascontiguousarray(arr, np.float32)
        if qtype in (Q.F32, Q.F16):
            data = arr.astype(np.float32 if qtype == Q.F32 else np.float16)
            w.add_tensor(name, data)
            back = data.astype(np.float32)
        else:
            data = gguf.quants.quantize(arr, qtype)
            w.add_tensor(name, data, raw_dtype=qtype)
            back = gguf.quants.dequantize(data, qtype).reshape(arr.shape)
        stored[path_] = back.T if path_.endswith("kernel") else back

    fp = flat(params)
    put("token_embd.weight", fp["embed/embedding"], Q.Q8_0, "embed/embedding")
    put("output_norm.weight", fp["final_norm/scale"], Q.F32, "final_norm/scale")
    for i in range(cfg.n_layers):
        for g, (p, qt) in LAYOUT.items():
            put(f"blk.{i}.{g}.weight", fp[f"layers_{i}/{p}"], qt, f"layers_{i}/{p}")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return stored


def tiny_cfg_gguf() -> Gemma3Config:
    # what a gemma3 GGUF implies: query scale = head_dim, the 5:1 pattern
    return Gemma3Config(vocab_size=len(TOKENS), dim=32, n_layers=6, n_heads=4, n_kv_heads=1, head_dim=32,
                        hidden_dim=64, sliding_window=8, query_scale=32.0, max_seq_len=64)


def test_a_gemma3_gguf_loads_exactly_and_runs(tmp_path):
    cfg = tiny_cfg_gguf()
    stored = write_gemma_gguf(tmp_path / "g.gguf", cfg, random_params(cfg, seed=4))
    m = load_model(str(tmp_path / "g.gguf"))
    assert m.family.name == "gemma3" and m.cfg == cfg
    got = flat(m.params)
    assert sorted(got) == sorted(stored)
    for k in stored:
        np.testing.assert_array_equal(got[k], stored[k], err_msg=k)
    tokens = np.arange(1, 21) % cfg.vocab_size
    logits = np.asarray(make_forward(cfg)(m.params, jnp.asarray(tokens[None], jnp.int32)))[0]
    np.testing.assert_allclose(logits, np_gemma(cfg, stored, tokens), rtol=2e-4, atol=2e-4)


def test_k_quant_tensors_are_read_with_the_gguf_package(tmp_path, monkeypatch):
    """Q4_K / Q6_K blocks (which the gguf package reads but cannot write) reach the parameters as the gguf package
    dequantizes them, in the family's layout: raw K-quant blocks replace two linears of a tiny file."""
    cfg = dataclasses.replace(tiny_cfg_gguf(), dim=256, head_dim=64)  # K-quant blocks hold 256 values
    rng = np.random.default_rng(0)
    raw = {}

    def k_block(qt, out_features):
        block, size = gguf.GGML_QUANT_SIZES[qt]
        data = rng.integers(0, 256, (out_features, cfg.dim // block * size), dtype=np.uint8)
        if qt == Q.Q4_K:  # d, dmin: small positive f16 values, so no inf / nan
            data[:, :4] = np.frombuffer(np.array([1e-3, 1e-3], np.float16).tobytes(), np.uint8)
        else:  # Q6_K ends with its f16 d
            data[:, -2:] = np.frombuffer(np.array([1e-3], np.float16).tobytes(), np.uint8)
        return data

    orig = gguf.GGUFWriter.add_tensor

    def add_tensor(self, name, tensor, raw_shape=None, raw_dtype=None, **kw):
        for qt, key in ((Q.Q4_K, "blk.0.ffn_gate.weight"), (Q.Q6_K, "blk.1.ffn_up.weight")):
            if name == key:
                raw[key] = (qt, k_block(qt, cfg.hidden_dim))
                return orig(self, name, raw[key][1], raw_dtype=qt)
        return orig(self, name, tensor, raw_shape=raw_shape, raw_dtype=raw_dtype, **kw)

    monkeypatch.setattr(gguf.GGUFWriter, "add_tensor", add_tensor)
    write_gemma_gguf(tmp_path / "k.gguf", cfg, random_params(cfg, seed=5))
    monkeypatch.undo()
    m = load_model(str(tmp_path / "k.gguf"))
    for key, path in (("blk.0.ffn_gate.weight", "layers_0/mlp/gate_proj/kernel"),
                      ("blk.1.ffn_up.weight", "layers_1/mlp/up_proj/kernel")):
        qt, data = raw[key]
        want = gguf.quants.dequantize(data, qt).reshape(cfg.hidden_dim, cfg.dim).T
        assert np.isfinite(want).all()
        np.testing.assert_array_equal(flat(m.params)[path], want)


def test_an_unknown_gguf_architecture_names_the_known_families():
    with pytest.raises(ValueError, match=r"'qwen9'.*gemma3.*llama"):
        family_for_gguf("qwen9")


def test_hugging_face_norms_get_the_one_added(tmp_path):
    cfg = tiny_cfg_gguf()
    params = flat(random_params(cfg, seed=6))
    hf = {"model_type": "gemma3_text", "vocab_size": cfg.vocab_size, "hidden_size": cfg.dim,
          "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads,
          "head_dim": cfg.head_dim, "intermediate_size": cfg.hidden_dim, "rope_theta": cfg.rope_global,
          "rope_local_base_freq": cfg.rope_local, "sliding_window": cfg.sliding_window, "query_pre_attn_scalar": 32,
          "rms_norm_eps": cfg.norm_eps, "max_position_embeddings": cfg.max_seq_len,
          "hidden_activation": "gelu_pytorch_tanh",
          "layer_types": ["full_attention" if cfg.is_global(i) else "sliding_attention" for i in range(cfg.n_layers)]}
    (tmp_path / "config.json").write_text(json.dumps(hf))
    names = {p: (g, "self_attn." if p.startswith("attn/") else "") for g, (p, _) in LAYOUT.items()}
    from jq.models.gemma3.weights import _BLOCK
    tensors = {"model.embed_tokens.weight": params["embed/embedding"], "model.norm.weight": params["final_norm/scale"] - 1}
    for i in range(cfg.n_layers):
        for p, (_, h) in _BLOCK.items():
            v = params[f"layers_{i}/{p}"]
            tensors[f"model.layers.{i}.{h}.weight"] = v.T if p.endswith("kernel") else v - 1
    del names
    save_file({k: np.ascontiguousarray(v, np.float32) for k, v in tensors.items()}, str(tmp_path / "model.safetensors"))
    tok = {"version": "1.0", "model": {"type": "BPE", "vocab": {t: i for i, t in enumerate(TOKENS)}, "merges": []}}
    (tmp_path / "tokenizer.json").write_text(json.dumps(tok))
    m = load_model(str(tmp_path))
    assert m.family.name == "gemma3" and m.cfg == cfg
    for k, v in flat(m.params).items():
        np.testing.assert_allclose(v, params[k], rtol=1e-6, atol=1e-6, err_msg=k)


def test_gptq_runs_block_by_block_with_local_and_global_blocks():
    cfg = Gemma3Config.tiny(vocab_size=len(TOKENS))
    params = random_params(cfg, seed=7)
    spec = block_spec(cfg)
    assert spec.module_for(0) is not spec.module_for(1) and spec.module_for(0) is spec.module_for(2)
    tokens = np.random.default_rng(8).integers(0, cfg.vocab_size, (8, 24)).astype(np.int32)
    rules = [{"pattern": r".*(q|k|v|o|gate|up|down)_proj/kernel", "format": "int4", "group_size": 16}]
    rtn = recipe_from_dict({"rules": rules})
    gptq = recipe_from_dict({"rules": [{**rules[0], "method": "gptq"}]})
    from jq.calibration.sequential import quantize_sequential

    q_gptq, log = quantize_sequential(spec, params, gptq, tokens, progress=False)
    q_rtn = jq.quantize_params(params, rtn)
    fwd = jax.jit(lambda p, t: jq.apply(jq.models.gemma3.Gemma3(cfg), {"params": p}, t))
    ref = fwd(params, tokens)
    err = {k: float(jnp.mean((fwd(q, tokens) - ref) ** 2)) for k, q in (("gptq", q_gptq), ("rtn", q_rtn))}
    assert len(log["blocks"]) == cfg.n_layers
    assert err["gptq"] < err["rtn"], err


@pytest.mark.parametrize("residual,heads", [(True, True), (True, False), (False, True)])
def test_rotation_keeps_the_function_and_rotates_the_quantized_inputs(residual, heads):
    from jq.models.gemma3.rotate import rotate
    from jq.tree.recipe import RotationConfig

    params = random_params(CFG, seed=9)
    tokens = jnp.asarray(np.random.default_rng(10).integers(0, CFG.vocab_size, (2, 20)), jnp.int32)
    rp, rcfg = rotate(params, CFG, RotationConfig(residual=residual, heads=heads, seed=3))
    assert (rcfg.residual_rotation == "hadamard(seed=3)") == residual
    np.testing.assert_allclose(make_forward(rcfg)(rp, tokens), make_forward(CFG)(params, tokens), rtol=1e-4, atol=1e-4)
    if residual:
        np.testing.assert_array_equal(rp["layers_0"]["input_norm"]["scale"], params["layers_0"]["input_norm"]["scale"])
        np.testing.assert_array_equal(rp["embed"]["embedding"], params["embed"]["embedding"])
        with pytest.raises(ValueError, match="already rotated"):
            rotate(rp, rcfg)
    # the sequential path sees the same blocks: chaining them reproduces the full model's logits
    spec = block_spec(rcfg)
    h = spec.embed(rp, tokens)
    ref = jax.jit(make_forward(rcfg))(rp, tokens)
    for i, name in enumerate(spec.names):
        h = spec.module_for(i).apply({"params": rp[name]}, h, *spec.extra(tokens))
    from jq.models.llama.model import RMSNorm

    x = RMSNorm(rcfg.norm_eps).apply({"params": rp["final_norm"]}, h)
    np.testing.assert_allclose(x @ rp["embed"]["embedding"].T, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("rotated", [False, True])
def test_the_staged_fast_path_equals_the_generic_sequential_pass(rotated):
    from jq.calibration.sequential import quantize_sequential
    from jq.models.gemma3.rotate import rotate

    cfg, params = CFG, random_params(CFG, seed=11)
    if rotated:
        params, cfg = rotate(params, cfg)
    spec = block_spec(cfg)
    assert isinstance(spec.staged, tuple) and spec.staged[0].args[0] is not spec.staged[1].args[0]
    tokens = np.random.default_rng(12).integers(0, cfg.vocab_size, (8, 24)).astype(np.int32)
    rcp = recipe_from_dict({"rules": [{"pattern": ".*kernel", "format": "int4", "group_size": 16, "method": "gptq"}]})
    fast, _ = quantize_sequential(spec, params, rcp, tokens, progress=False)
    slow, _ = quantize_sequential(dataclasses.replace(spec, staged=None), params, rcp, tokens, progress=False)
    for (p, a), (_, b) in zip(jq.leaf_paths(fast), jq.leaf_paths(slow)):
        a = a.dequantize() if isinstance(a, jq.QTensor) else a
        b = b.dequantize() if isinstance(b, jq.QTensor) else b
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5, err_msg=p)


def test_gemma3_configs_it_cannot_run_are_refused_by_name():
    from jq.models.gemma3 import _config_from_gguf

    meta = {"gemma3.embedding_length": 640, "gemma3.block_count": 18, "gemma3.attention.head_count": 4,
            "gemma3.attention.key_length": 256, "gemma3.feed_forward_length": 2048, "gemma3.vocab_size": 100}
    assert Gemma3Config.from_gguf_metadata(meta).query_scale == 256.0
    with pytest.raises(ValueError, match="untied output.weight"):
        _config_from_gguf(meta, {"output.weight"})
    with pytest.raises(ValueError, match="RoPE scaling 'linear' is not supported"):
        Gemma3Config.from_gguf_metadata({**meta, "gemma3.rope.scaling.type": "linear"})
    with pytest.raises(ValueError, match="missing 'gemma3.block_count'"):
        Gemma3Config.from_gguf_metadata({k: v for k, v in meta.items() if k != "gemma3.block_count"})
    hf = {"hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 3, "intermediate_size": 128,
          "vocab_size": 100}
    for bad, msg in ((dict(final_logit_softcapping=30.0), "soft-capping"),
                     (dict(hidden_activation="silu"), "hidden_activation 'silu'"),
                     (dict(rope_scaling={"type": "linear"}), "rope_scaling"),
                     (dict(layer_types=["sliding_attention", "full_attention", "full_attention"]),
                      "not a regular local/global pattern")):
        with pytest.raises(ValueError, match=msg):
            Gemma3Config.from_hf_config({**hf, **bad})
