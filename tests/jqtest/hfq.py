"""NumPy references of the Hugging Face pre-quantized layouts, written from the published descriptions (AutoGPTQ /
GPTQModel, AutoAWQ GEMM, compressed-tensors pack-quantized) with plain integer loops, independent of
jq.models.io.hfq; random layers in each format with their reference dequantization; tiny Llama directories of them."""

from __future__ import annotations

import json

import ml_dtypes
import numpy as np
from safetensors.numpy import save_file

AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]  # AutoAWQ: nibble i of a word holds column 8c + AWQ_ORDER[i]


# --------------------------------------------------------------------------------------------------- packers


def gptq_pack_rows(u: np.ndarray, bits: int) -> np.ndarray:
    """AutoGPTQ's qweight packing: uint codes [K, N] → int32 [K·bits/32, N]. 2/4/8 bits: word r holds rows
    r·(32/b) + j at bits b·j. 3 bits: every 32 rows fill 3 words, rows 10 and 21 straddling word boundaries."""
    u = np.asarray(u).astype(np.uint64)
    k, n = u.shape
    out = np.zeros((k * bits // 32, n), np.uint64)
    if bits != 3:
        per = 32 // bits
        for r in range(out.shape[0]):
            for j in range(per):
                out[r] |= u[r * per + j] << np.uint64(bits * j)
    else:
        for blk in range(k // 32):
            v, w = u[blk * 32: blk * 32 + 32], blk * 3
            for j in range(10):
                out[w] |= v[j] << np.uint64(3 * j)
            out[w] |= (v[10] << np.uint64(30)) & np.uint64(0xFFFFFFFF)
            out[w + 1] |= v[10] >> np.uint64(2)
            for j in range(10):
                out[w + 1] |= v[11 + j] << np.uint64(3 * j + 1)
            out[w + 1] |= (v[21] << np.uint64(31)) & np.uint64(0xFFFFFFFF)
            out[w + 2] |= v[21] >> np.uint64(1)
            for j in range(10):
                out[w + 2] |= v[22 + j] << np.uint64(3 * j + 2)
    return out.astype(np.uint32).view(np.int32)


def awq_pack(u: np.ndarray) -> np.ndarray:
    """AutoAWQ GEMM packing: uint4 codes [R, N] → int32 [R, N/8]."""
    u = np.asarray(u).astype(np.uint32)
    out = np.zeros((u.shape[0], u.shape[1] // 8), np.uint32)
    for c in range(out.shape[1]):
        for i in range(8):
            out[:, c] |= u[:, 8 * c + AWQ_ORDER[i]] << np.uint32(4 * i)
    return out.view(np.int32)


def ct_pack(v: np.ndarray, bits: int) -> np.ndarray:
    """compressed-tensors pack_to_int32 along dim 1 of already offset (unsigned) values [R, C] → int32
    [R, ceil(C / (32/bits))], zero-padded; value j of word c is column c·(32/b) + j at bits b·j."""
    pf = 32 // bits
    v = np.asarray(v).astype(np.uint32)
    cols = -(-v.shape[1] // pf)
    v = np.pad(v, [(0, 0), (0, cols * pf - v.shape[1])])
    out = np.zeros((v.shape[0], cols), np.uint32)
    for c in range(cols):
        for j in range(pf):
            out[:, c] |= v[:, c * pf + j] << np.uint32(bits * j)
    return out.view(np.int32)


# ---------------------------------------------------------------------------------------- random layers


def _act_order_g_idx(rng, k: int, g: int) -> np.ndarray:
    perm = rng.permutation(k)
    g_idx = np.empty(k, np.int32)
    g_idx[perm] = np.arange(k) // g
    return g_idx


def _scales(rng, shape) -> np.ndarray:
    return rng.uniform(0.005, 0.05, shape).astype(np.float16)


def gptq_layer(rng, k: int, n: int, *, bits: int = 4, group_size: int = 16, sym: bool = False,
               act_order: bool = False, fmt: str = "gptq"):
    """(tensors by suffix, reference kernel float32 [K, N]) of a random GPTQ layer."""
    g = k if group_size == -1 else group_size
    half, top = 1 << (bits - 1), (1 << bits) - 1
    u = rng.integers(0, top + 1, (k, n))
    zero = np.full((k // g, n), half) if sym else rng.integers(1 if fmt == "gptq" else 0, top + 1, (k // g, n))
    scales = _scales(rng, (k // g, n))
    g_idx = _act_order_g_idx(rng, k, g) if act_order else (np.arange(k) // g).astype(np.int32)
    stored = zero - 1 if fmt == "gptq" else zero
    tensors = {"qweight": gptq_pack_rows(u, bits), "qzeros": gptq_pack_rows(stored.T, bits).T.copy(),
               "scales": scales, "g_idx": g_idx}
    ref = (u.astype(np.float32) - zero[g_idx].astype(np.float32)) * scales[g_idx].astype(np.float32)
    return tensors, ref


def awq_layer(rng, k: int, n: int, *, group_size: int = 16):
    """(tensors by suffix, reference kernel float32 [K, N]) of a random AWQ GEMM layer."""
    u, zero = rng.integers(0, 16, (k, n)), rng.integers(0, 16, (k // group_size, n))
    scales = _scales(rng, (k // group_size, n))
    tensors = {"qweight": awq_pack(u), "qzeros": awq_pack(zero), "scales": scales}
    rows = np.arange(k) // group_size
    return tensors, (u.astype(np.float32) - zero[rows].astype(np.float32)) * scales[rows].astype(np.float32)


def ct_layer(rng, k: int, n: int, *, bits: int = 4, group_size: int | None = 16, sym: bool = True,
             act_order: bool = False, scale_dtype=np.float16):
    """(tensors by suffix, reference kernel float32 [K, N]) of a random compressed-tensors pack-quantized layer
    (PyTorch weight [N, K]; q and zp signed)."""
    half = 1 << (bits - 1)
    g = k if group_size is None else group_size
    q = rng.integers(-half, half, (n, k))
    zp = np.zeros((n, k // g), np.int64) if sym else rng.integers(-half, half, (n, k // g))
    scale = rng.uniform(0.005, 0.05, (n, k // g)).astype(scale_dtype)
    tensors = {"weight_packed": ct_pack(q + half, bits), "weight_scale": scale,
               "weight_shape": np.array([n, k], np.int64)}
    if not sym:
        tensors["weight_zero_point"] = ct_pack((zp + half).T, bits).T.copy()
    g_idx = np.arange(k) // g
    if act_order:
        g_idx = tensors["weight_g_idx"] = _act_order_g_idx(rng, k, g)
    w = (q.astype(np.float32) - zp[:, g_idx].astype(np.float32)) * scale[:, g_idx].astype(np.float32)
    return tensors, np.ascontiguousarray(w.T)


# ------------------------------------------------------------------------------------------ directories

LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
           "mlp.up_proj", "mlp.down_proj")


def hf_config(cfg) -> dict:
    return {"model_type": "llama", "vocab_size": cfg.vocab_size, "hidden_size": cfg.dim,
            "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
            "num_key_value_heads": cfg.n_kv_heads, "intermediate_size": cfg.hidden_dim, "rope_theta": cfg.rope_theta,
            "rms_norm_eps": cfg.norm_eps, "tie_word_embeddings": cfg.tie_embeddings,
            "max_position_embeddings": cfg.max_seq_len, "hidden_act": "silu"}


def linear_shape(cfg, module: str) -> tuple[int, int]:
    """(in, out) of a Llama linear."""
    q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    return {"self_attn.q_proj": (cfg.dim, q), "self_attn.k_proj": (cfg.dim, kv), "self_attn.v_proj": (cfg.dim, kv),
            "self_attn.o_proj": (q, cfg.dim), "mlp.gate_proj": (cfg.dim, cfg.hidden_dim),
            "mlp.up_proj": (cfg.dim, cfg.hidden_dim), "mlp.down_proj": (cfg.hidden_dim, cfg.dim)}[module]


def write_quantized(directory, cfg, method: str, qc: dict, layer, seed: int = 0):
    """A tiny Llama directory whose linears are `layer(rng, k, n)` in `method`'s layout (config `qc`); returns the
    HF-named reference weights ((out, in) float32) for `jqtest.llama.np_forward`."""
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    tensors, ref = {}, {}
    for name, shape in [("model.embed_tokens.weight", (cfg.vocab_size, cfg.dim)), ("model.norm.weight", (cfg.dim,))]:
        ref[name] = tensors[name] = (0.3 * rng.standard_normal(shape)).astype(np.float32)
    for i in range(cfg.n_layers):
        for norm in ("input_layernorm", "post_attention_layernorm"):
            ref[f"model.layers.{i}.{norm}.weight"] = tensors[f"model.layers.{i}.{norm}.weight"] = \
                (1 + 0.1 * rng.standard_normal(cfg.dim)).astype(np.float32)
        for module in LINEARS:
            prefix = f"model.layers.{i}.{module}"
            parts, kernel = layer(rng, *linear_shape(cfg, module))
            tensors |= {f"{prefix}.{s}": np.ascontiguousarray(a) for s, a in parts.items()}
            ref[prefix + ".weight"] = np.ascontiguousarray(kernel.T)
    (directory / "config.json").write_text(json.dumps({**hf_config(cfg), "quantization_config": qc}))
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    return ref


BF16 = ml_dtypes.bfloat16
