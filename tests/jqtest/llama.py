"""A tiny Llama: a float64 NumPy reference forward, random checkpoints, and GGUF / Hugging Face files of them."""

from __future__ import annotations

import json

import gguf
import numpy as np
from gguf import GGMLQuantizationType as Q
from safetensors.numpy import save_file

from jq.models.llama.config import LlamaConfig

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
        if qtype in (Q.F32, Q.F16, Q.F64):
            w.add_tensor(gname, weight.astype({Q.F32: np.float32, Q.F16: np.float16, Q.F64: np.float64}[qtype]))
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

