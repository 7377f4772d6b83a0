"""The Flax Llama against a plain-NumPy reference, and the GGUF / Hugging Face loaders against each other."""

from __future__ import annotations

import json

import gguf
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from safetensors.numpy import save_file

from jq.models.llama.config import LlamaConfig
from jq.models.io.gguf import load_gguf
from jq.models.io.safetensors import load_hf
from jq.models import load_model, resolve_model
from jq.models.llama.model import init_params, make_forward
from jq.models.io.tokenizer import Tokenizer

# ----------------------------------------------------------------------------------------------- NumPy reference


def np_rope(x: np.ndarray, theta: float, interleaved: bool) -> np.ndarray:
    """x: [T, H, D]. Rotate-half (HF) pairs (i, i+D/2); interleaved (llama.cpp) pairs (2i, 2i+1)."""
    t, _, d = x.shape
    inv = theta ** (-np.arange(0, d, 2) / d)
    ang = np.arange(t)[:, None] * inv[None]                               # [T, D/2]
    cos, sin = np.cos(ang)[:, None], np.sin(ang)[:, None]
    if interleaved:
        a, b = x[..., 0::2], x[..., 1::2]
        out = np.empty_like(x)
        out[..., 0::2], out[..., 1::2] = a * cos - b * sin, b * cos + a * sin
        return out
    a, b = x[..., : d // 2], x[..., d // 2:]
    return np.concatenate([a * cos - b * sin, b * cos + a * sin], -1)


def np_forward(cfg: LlamaConfig, w: dict[str, np.ndarray], tokens: np.ndarray, interleaved: bool = False) -> np.ndarray:
    """Reference Llama on HF-named (out, in) weights, float64. tokens: [T] -> logits [T, V]."""
    def norm(x, s):
        return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + cfg.norm_eps) * s

    t = len(tokens)
    x = w["model.embed_tokens.weight"].astype(np.float64)[tokens]
    mask = np.tril(np.ones((t, t), bool))
    for i in range(cfg.n_layers):
        p = f"model.layers.{i}."
        h = norm(x, w[p + "input_layernorm.weight"])
        q = (h @ w[p + "self_attn.q_proj.weight"].T).reshape(t, cfg.n_heads, cfg.head_dim)
        k = (h @ w[p + "self_attn.k_proj.weight"].T).reshape(t, cfg.n_kv_heads, cfg.head_dim)
        v = (h @ w[p + "self_attn.v_proj.weight"].T).reshape(t, cfg.n_kv_heads, cfg.head_dim)
        q, k = np_rope(q, cfg.rope_theta, interleaved), np_rope(k, cfg.rope_theta, interleaved)
        k, v = np.repeat(k, cfg.group_size, axis=1), np.repeat(v, cfg.group_size, axis=1)  # HF repeat_kv
        s = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(cfg.head_dim)
        s = np.where(mask, s, -np.inf)
        pr = np.exp(s - s.max(-1, keepdims=True))
        pr /= pr.sum(-1, keepdims=True)
        o = np.einsum("hqk,khd->qhd", pr, v).reshape(t, -1)
        x = x + o @ w[p + "self_attn.o_proj.weight"].T
        h = norm(x, w[p + "post_attention_layernorm.weight"])
        g = h @ w[p + "mlp.gate_proj.weight"].T
        x = x + ((g / (1 + np.exp(-g))) * (h @ w[p + "mlp.up_proj.weight"].T)) @ w[p + "mlp.down_proj.weight"].T
    x = norm(x, w["model.norm.weight"])
    head = w["model.embed_tokens.weight"] if cfg.tie_embeddings else w["lm_head.weight"]
    return x @ head.T


# --------------------------------------------------------------------------------------------- tiny checkpoints


def bytes_to_unicode() -> list[str]:
    """GPT-2's byte -> printable character table (the byte-level BPE alphabet)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for _, c in sorted(zip(bs, cs))]


SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["Ġ t", "h e", "Ġt he", "Ġ c", "a t", "Ġc at", "1 2", "Ġ a"]
TOKENS = SPECIALS + bytes_to_unicode() + ["".join(m.split()) for m in MERGES]


def tiny_cfg(tie: bool) -> LlamaConfig:
    return LlamaConfig(vocab_size=len(TOKENS), dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64,
                       head_dim=8, rope_theta=10000.0, norm_eps=1e-5, tie_embeddings=tie, max_seq_len=64)


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py LlamaModel.permute: HF q/k rows -> llama.cpp interleaved rows."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# GGUF name, HF name, storage type in the tiny GGUF ("{i}" = layer)
LAYOUT = [
    ("blk.{i}.attn_norm.weight", "model.layers.{i}.input_layernorm.weight", Q.F32),
    ("blk.{i}.attn_q.weight", "model.layers.{i}.self_attn.q_proj.weight", Q.Q4_1),
    ("blk.{i}.attn_k.weight", "model.layers.{i}.self_attn.k_proj.weight", Q.Q8_0),
    ("blk.{i}.attn_v.weight", "model.layers.{i}.self_attn.v_proj.weight", Q.Q4_0),
    ("blk.{i}.attn_output.weight", "model.layers.{i}.self_attn.o_proj.weight", Q.F16),
    ("blk.{i}.ffn_norm.weight", "model.layers.{i}.post_attention_layernorm.weight", Q.F32),
    ("blk.{i}.ffn_gate.weight", "model.layers.{i}.mlp.gate_proj.weight", Q.BF16),
    ("blk.{i}.ffn_up.weight", "model.layers.{i}.mlp.up_proj.weight", Q.Q8_0),
    ("blk.{i}.ffn_down.weight", "model.layers.{i}.mlp.down_proj.weight", Q.F32),
]


def tiny_checkpoint(cfg: LlamaConfig, seed: int = 0) -> list[tuple[str, str, Q, np.ndarray]]:
    """(gguf name, hf name, type, HF-layout fp32 weight exactly representable in that type)."""
    rng = np.random.default_rng(seed)
    q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    shapes = {"attn_norm": (cfg.dim,), "ffn_norm": (cfg.dim,), "attn_q": (q, cfg.dim), "attn_k": (kv, cfg.dim),
              "attn_v": (kv, cfg.dim), "attn_output": (cfg.dim, q), "ffn_gate": (cfg.hidden_dim, cfg.dim),
              "ffn_up": (cfg.hidden_dim, cfg.dim), "ffn_down": (cfg.dim, cfg.hidden_dim)}
    rows = [(g.format(i=i), h.format(i=i), t) for i in range(cfg.n_layers) for g, h, t in LAYOUT]
    rows += [("token_embd.weight", "model.embed_tokens.weight", Q.Q8_0),
             ("output_norm.weight", "model.norm.weight", Q.F32)]
    if not cfg.tie_embeddings:
        rows.append(("output.weight", "lm_head.weight", Q.Q4_1))
    out = []
    for gname, hname, qtype in rows:
        key = gname.split(".")[-2]
        shape = shapes.get(key) or {"token_embd": (cfg.vocab_size, cfg.dim), "output_norm": (cfg.dim,),
                                     "output": (cfg.vocab_size, cfg.dim)}[key]
        w = (1.0 + 0.1 * rng.standard_normal(shape) if len(shape) == 1 else 0.3 * rng.standard_normal(shape))
        w = gguf.quants.dequantize(gguf.quants.quantize(w.astype(np.float32), qtype), qtype).reshape(shape)
        out.append((gname, hname, qtype, np.asarray(w, np.float32)))
    return out


def write_gguf(path, cfg: LlamaConfig, ckpt, *, pre: str = "default", add_bos: bool = False,
               arch: str = "llama", override: dict[str, Q] | None = None) -> None:
    """A llama.cpp-style GGUF: q/k rows permuted, weights stored in each row's type (or `override`)."""
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg.n_layers)
    w.add_context_length(cfg.max_seq_len)
    w.add_embedding_length(cfg.dim)
    w.add_feed_forward_length(cfg.hidden_dim)
    w.add_head_count(cfg.n_heads)
    w.add_head_count_kv(cfg.n_kv_heads)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(TOKENS)
    w.add_token_types([3 if t in SPECIALS else 1 for t in TOKENS])
    w.add_token_merges(MERGES)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(add_bos)
    for gname, _, qtype, weight in ckpt:
        qtype = (override or {}).get(gname, qtype)
        if gname.endswith("attn_q.weight"):
            weight = llama_cpp_permute(weight, cfg.n_heads)
        elif gname.endswith("attn_k.weight"):
            weight = llama_cpp_permute(weight, cfg.n_kv_heads)
        if qtype in (Q.F32, Q.F16):
            w.add_tensor(gname, weight.astype(np.float32 if qtype == Q.F32 else np.float16))
        else:
            w.add_tensor(gname, gguf.quants.quantize(weight, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def write_hf(directory, cfg: LlamaConfig, ckpt, *, shards: int = 1, dtype=np.float32) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    hf_cfg = {"model_type": "llama", "vocab_size": cfg.vocab_size, "hidden_size": cfg.dim,
              "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
              "num_key_value_heads": cfg.n_kv_heads, "intermediate_size": cfg.hidden_dim, "rope_theta": cfg.rope_theta,
              "rms_norm_eps": cfg.norm_eps, "tie_word_embeddings": cfg.tie_embeddings,
              "max_position_embeddings": cfg.max_seq_len, "hidden_act": "silu"}
    (directory / "config.json").write_text(json.dumps(hf_cfg))
    tensors = {h: np.ascontiguousarray(w.astype(dtype)) for _, h, _, w in ckpt}
    if shards == 1:
        save_file(tensors, str(directory / "model.safetensors"))
        return
    names = sorted(tensors)
    weight_map = {}
    for s in range(shards):
        fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = names[s::shards]
        save_file({n: tensors[n] for n in part}, str(directory / fname))
        weight_map |= {n: fname for n in part}
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def flat(tree, prefix=""):
    out = {}
    for k, v in tree.items():
        out |= flat(v, f"{prefix}{k}/") if isinstance(v, dict) else {prefix + k: np.asarray(v)}
    return out


TOKENS_IN = np.array([5, 17, 3, 200, 42, 9, 120, 77, 1, 260, 33, 64], np.int32)

# --------------------------------------------------------------------------------------------------------- model


def test_param_paths_match_the_documented_names():
    for tie in (True, False):
        paths = set(flat(init_params(tiny_cfg(tie), jax.random.key(0))))
        expected = {"embed/embedding", "final_norm/scale"} | ({"lm_head/kernel"} if not tie else set())
        for i in range(2):
            expected |= {f"layers_{i}/input_norm/scale", f"layers_{i}/post_attn_norm/scale"}
            expected |= {f"layers_{i}/attn/{p}/kernel" for p in ("q_proj", "k_proj", "v_proj", "o_proj")}
            expected |= {f"layers_{i}/mlp/{p}/kernel" for p in ("gate_proj", "up_proj", "down_proj")}
        assert paths == expected


@pytest.mark.parametrize("tie", [True, False])
def test_flax_forward_matches_numpy_reference(tie):
    cfg = tiny_cfg(tie)
    ckpt = tiny_checkpoint(cfg, seed=1)
    hf = {h: w for _, h, _, w in ckpt}
    params = {}
    from jq.models.llama.weights import hf_tensor
    from jq.tree.paths import set_path

    for name, w in hf.items():
        m = hf_tensor(name, cfg)
        set_path(params, m.path, m.apply(w))
    logits = np.asarray(jax.jit(make_forward(cfg))(params, jnp.asarray(TOKENS_IN[None])))[0]
    ref = np_forward(cfg, {k: v.astype(np.float64) for k, v in hf.items()}, TOKENS_IN)
    assert logits.shape == (len(TOKENS_IN), cfg.vocab_size) and logits.dtype == np.float32
    np.testing.assert_allclose(logits, ref, rtol=1e-4, atol=1e-4)


def test_causal_mask_future_tokens_do_not_change_earlier_logits():
    cfg = tiny_cfg(True)
    params = init_params(cfg, jax.random.key(3))
    fwd = jax.jit(make_forward(cfg))
    a = TOKENS_IN[None]
    b = a.copy()
    b[0, 7:] = (b[0, 7:] + 11) % cfg.vocab_size
    la, lb = np.asarray(fwd(params, jnp.asarray(a))), np.asarray(fwd(params, jnp.asarray(b)))
    np.testing.assert_array_equal(la[:, :7], lb[:, :7])
    assert np.abs(la[:, 7:] - lb[:, 7:]).max() > 1e-3


def test_bfloat16_compute_stays_close_to_fp32():
    cfg = tiny_cfg(True)
    params = init_params(cfg, jax.random.key(4))
    ids = jnp.asarray(TOKENS_IN[None])
    l32 = np.asarray(make_forward(cfg)(params, ids))
    l16 = make_forward(cfg, jnp.bfloat16)(params, ids)
    assert l16.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(l16), l32, atol=0.1 * np.abs(l32).max())


def test_config_rejects_bad_gqa():
    with pytest.raises(ValueError, match="multiple of n_kv_heads"):
        LlamaConfig(vocab_size=8, dim=24, n_layers=1, n_heads=3, n_kv_heads=2, hidden_dim=8, head_dim=8)


# ------------------------------------------------------------------------------------------------------ loaders


@pytest.mark.parametrize("tie", [True, False])
def test_gguf_and_hf_loaders_agree_and_match_reference(tmp_path, tie):
    cfg = tiny_cfg(tie)
    ckpt = tiny_checkpoint(cfg, seed=2)
    write_gguf(tmp_path / "m.gguf", cfg, ckpt)
    write_hf(tmp_path / "hf", cfg, ckpt)
    g, h = load_gguf(tmp_path / "m.gguf"), load_hf(tmp_path / "hf")
    gcfg, gparams, hcfg, hparams = g.cfg, g.params, h.cfg, h.params
    assert gcfg == hcfg == cfg and h.tokenizer is None and g.family.name == h.family.name == "llama"
    gflat, hflat = flat(gparams), flat(hparams)
    assert gflat.keys() == hflat.keys()
    for k in gflat:
        assert gflat[k].dtype == np.float32
        np.testing.assert_array_equal(gflat[k], hflat[k], err_msg=k)
    fwd = jax.jit(make_forward(cfg))
    ids = jnp.asarray(TOKENS_IN[None])
    np.testing.assert_array_equal(np.asarray(fwd(gparams, ids)), np.asarray(fwd(hparams, ids)))
    # The GGUF q/k rows really are llama.cpp's interleaved layout: an interleaved-RoPE reference on the raw
    # (permuted) weights gives the same logits as the rotate-half reference on the HF weights.
    hf = {h: w.astype(np.float64) for _, h, _, w in ckpt}
    permuted = {k: (llama_cpp_permute(v, cfg.n_heads) if "q_proj" in k else
                    llama_cpp_permute(v, cfg.n_kv_heads) if "k_proj" in k else v) for k, v in hf.items()}
    np.testing.assert_allclose(np_forward(cfg, permuted, TOKENS_IN, interleaved=True),
                               np_forward(cfg, hf, TOKENS_IN), rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(np.asarray(fwd(gparams, ids))[0], np_forward(cfg, hf, TOKENS_IN), rtol=1e-4, atol=1e-4)


def test_hf_loader_bf16_sharded(tmp_path):
    cfg = tiny_cfg(False)
    ckpt = tiny_checkpoint(cfg, seed=5)
    write_hf(tmp_path / "a", cfg, ckpt, shards=3, dtype=ml_dtypes.bfloat16)
    params = load_hf(tmp_path / "a").params
    got = flat(params)
    assert got["layers_1/attn/q_proj/kernel"].dtype == np.float32
    w = dict((h, w) for _, h, _, w in ckpt)["model.layers.1.self_attn.q_proj.weight"]
    np.testing.assert_array_equal(got["layers_1/attn/q_proj/kernel"], w.astype(ml_dtypes.bfloat16).astype(np.float32).T)


def test_hf_loader_errors_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_hf(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": 8, "hidden_size": 16,
                                                      "num_hidden_layers": 1, "num_attention_heads": 2,
                                                      "intermediate_size": 8}))
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        load_hf(tmp_path)


def test_unsupported_gguf_tensor_type_names_the_tensor(tmp_path):
    cfg = tiny_cfg(True)
    write_gguf(tmp_path / "m.gguf", cfg, tiny_checkpoint(cfg), override={"blk.1.ffn_up.weight": Q.Q5_0})
    with pytest.raises(ValueError, match=r"blk\.1\.ffn_up\.weight.*Q5_0.*Q8_0"):
        load_gguf(tmp_path / "m.gguf")


def test_truncated_or_foreign_gguf_names_the_file_and_the_missing_bytes(tmp_path):
    cfg = tiny_cfg(True)
    full = tmp_path / "m.gguf"
    write_gguf(full, cfg, tiny_checkpoint(cfg))
    data = full.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: len(data) - 100])  # the tensor data ends early
    with pytest.raises(ValueError, match=rf"cut\.gguf: truncated GGUF file: its tensor table needs {len(data):,} "
                                         rf"bytes .*, found {len(data) - 100:,}"):
        load_gguf(cut)
    head = tmp_path / "head.gguf"
    head.write_bytes(data[:600])  # cut inside the metadata
    with pytest.raises(ValueError, match=r"head\.gguf: damaged or truncated GGUF file: its header .* does not parse "
                                         r"within its 600 bytes"):
        load_gguf(head)
    other = tmp_path / "other.gguf"
    other.write_bytes(b"PK\x03\x04" + data[4:])
    with pytest.raises(ValueError, match=r"other\.gguf: not a GGUF file \(it starts with b'PK"):
        load_gguf(other)


def test_unknown_gguf_architecture(tmp_path):
    cfg = tiny_cfg(True)
    write_gguf(tmp_path / "m.gguf", cfg, tiny_checkpoint(cfg), arch="gpt2")
    with pytest.raises(ValueError, match="architecture 'gpt2'"):
        load_gguf(tmp_path / "m.gguf")


def test_load_model_dispatches_on_file_or_directory(tmp_path):
    cfg = tiny_cfg(True)
    ckpt = tiny_checkpoint(cfg)
    write_gguf(tmp_path / "m.gguf", cfg, ckpt)
    write_hf(tmp_path / "hf", cfg, ckpt)
    assert resolve_model(tmp_path / "m.gguf") == tmp_path / "m.gguf"
    assert load_model(str(tmp_path / "m.gguf")).cfg == load_model(tmp_path / "hf").cfg == cfg
    with pytest.raises(ValueError, match="smollm2-135m"):
        resolve_model("no-such-model")


# ---------------------------------------------------------------------------------------------------- tokenizer


def gguf_tokenizer(tmp_path, **kw) -> Tokenizer:
    cfg = tiny_cfg(True)
    write_gguf(tmp_path / "t.gguf", cfg, tiny_checkpoint(cfg), **kw)
    return load_gguf(tmp_path / "t.gguf").tokenizer


def pieces(tok: Tokenizer, text: str) -> list[str]:
    return [tok.backend.id_to_token(i) for i in tok.encode(text)]


def test_gguf_tokenizer_bpe_specials_and_round_trip(tmp_path):
    tok = gguf_tokenizer(tmp_path)
    assert (tok.bos_id, tok.eos_id) == (1, 2)
    assert pieces(tok, "the cat") == ["t", "he", "Ġcat"]
    assert pieces(tok, "x 12") == ["x", "Ġ", "12"]
    ids = tok.encode("<|im_start|>the cat<|im_end|>")
    assert ids[0] == 1 and ids[-1] == 2
    for text in ["the cat sat on 12 mats.\n\n  Ünïcödé ✓", "<|im_start|>user\nhi<|im_end|>"]:
        assert tok.decode(tok.encode(text)) == text


def test_gguf_tokenizer_smollm_splits_digits_and_bos(tmp_path):
    tok = gguf_tokenizer(tmp_path, pre="smollm", add_bos=True)
    assert pieces(tok, "x 12") == ["<|im_start|>", "x", "Ġ", "1", "2"]
    assert tok.encode("x", add_special_tokens=False) == [TOKENS.index("x")]


def test_gguf_tokenizer_unknown_pre_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="'qwen2'"):
        gguf_tokenizer(tmp_path, pre="qwen2")


def test_tokenizer_json_round_trip(tmp_path):
    tok = gguf_tokenizer(tmp_path, pre="smollm")
    tok.backend.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<|im_start|>",
                                                                "eos_token": {"content": "<|im_end|>"}}))
    again = Tokenizer.from_file(tmp_path / "tokenizer.json")
    assert (again.bos_id, again.eos_id) == (1, 2)
    text = "<|im_start|>the 123 cat"
    assert again.encode(text) == tok.encode(text)
