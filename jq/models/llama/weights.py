"""The Llama family's parameter tree: every path with its shape, and where each GGUF / Hugging Face tensor goes.

llama.cpp's converter interleaves the rows of attn_q / attn_k for its RoPE kernel; `unpermute_qk` puts them back
in the Hugging Face rotate-half layout that `jq.models.llama.model` uses, so a GGUF and the safetensors it came
from give the same logits.
"""

from __future__ import annotations

import functools

import numpy as np

from jq.models.decoder import gguf_path, hf_path
from jq.models.family import TensorMap
from jq.models.llama.config import LlamaConfig

__all__ = ["expected_shapes", "gguf_tensor", "hf_tensor", "hf_name", "unpermute_qk", "permute_qk"]

# per block: parameter path under layers_{i} -> (GGUF name under blk.{i}., Hugging Face name under model.layers.{i}.)
_BLOCK = {
    "input_norm/scale": ("attn_norm", "input_layernorm"),
    "attn/q_proj/kernel": ("attn_q", "self_attn.q_proj"),
    "attn/k_proj/kernel": ("attn_k", "self_attn.k_proj"),
    "attn/v_proj/kernel": ("attn_v", "self_attn.v_proj"),
    "attn/o_proj/kernel": ("attn_output", "self_attn.o_proj"),
    "post_attn_norm/scale": ("ffn_norm", "post_attention_layernorm"),
    "mlp/gate_proj/kernel": ("ffn_gate", "mlp.gate_proj"),
    "mlp/up_proj/kernel": ("ffn_up", "mlp.up_proj"),
    "mlp/down_proj/kernel": ("ffn_down", "mlp.down_proj"),
}
_GLOBAL = {  # parameter path -> (GGUF name, Hugging Face name)
    "embed/embedding": ("token_embd", "model.embed_tokens"),
    "final_norm/scale": ("output_norm", "model.norm"),
    "lm_head/kernel": ("output", "lm_head"),
}
_GGUF = {g: p for p, (g, _) in _BLOCK.items()}
_HF = {h: p for p, (_, h) in _BLOCK.items()}
_IGNORED_HF = ("rotary_emb.inv_freq",)  # buffers some exports carry that hold no weights


def expected_shapes(cfg: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """Every parameter path ("layers_0/attn/q_proj/kernel", ...) of `Llama(cfg)` with its shape."""
    q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    shapes = {"embed/embedding": (cfg.vocab_size, cfg.dim), "final_norm/scale": (cfg.dim,)}
    if not cfg.tie_embeddings:
        shapes["lm_head/kernel"] = (cfg.dim, cfg.vocab_size)
    for i in range(cfg.n_layers):
        p = f"layers_{i}/"
        shapes |= {
            p + "input_norm/scale": (cfg.dim,), p + "post_attn_norm/scale": (cfg.dim,),
            p + "attn/q_proj/kernel": (cfg.dim, q), p + "attn/k_proj/kernel": (cfg.dim, kv),
            p + "attn/v_proj/kernel": (cfg.dim, kv), p + "attn/o_proj/kernel": (q, cfg.dim),
            p + "mlp/gate_proj/kernel": (cfg.dim, cfg.hidden_dim), p + "mlp/up_proj/kernel": (cfg.dim, cfg.hidden_dim),
            p + "mlp/down_proj/kernel": (cfg.hidden_dim, cfg.dim),
        }
    return shapes


def unpermute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation. w: [n_heads*head_dim, in] (GGUF order) -> same shape, HF order.

    llama.cpp stores, within each head, rows (0, D/2, 1, D/2+1, ...) so that RoPE pairs are adjacent;
    HF keeps the halves apart (rotate-half). Inverse of `reshape(H, 2, D/2, in).swapaxes(1, 2)`.
    """
    out, cols = w.shape
    return w.reshape(n_heads, out // n_heads // 2, 2, cols).swapaxes(1, 2).reshape(out, cols)


def permute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's converter permutation (HF order -> GGUF order). w: [n_heads*head_dim, in]."""
    out, cols = w.shape
    return w.reshape(n_heads, 2, out // n_heads // 2, cols).swapaxes(1, 2).reshape(out, cols)


def gguf_tensor(name: str, cfg: LlamaConfig) -> TensorMap:
    """A GGUF tensor name (`blk.3.attn_q.weight`) -> where it goes; ValueError for a tensor this family lacks."""
    path = gguf_path(name, cfg.n_layers, _GGUF, {g: p for p, (g, _) in _GLOBAL.items()})
    if path is None:
        raise ValueError(f"unexpected GGUF tensor {name!r} for a plain llama model (RoPE scaling via rope_freqs, "
                         "biases and MoE experts are not supported)")
    heads = {"attn/q_proj/kernel": cfg.n_heads, "attn/k_proj/kernel": cfg.n_kv_heads}.get(path.split("/", 1)[-1])
    convert = None if heads is None else functools.partial(unpermute_qk, n_heads=heads)
    return TensorMap(path, transpose=path.endswith("kernel"), convert=convert)


def hf_tensor(name: str, cfg: LlamaConfig) -> TensorMap | None:
    """A Hugging Face tensor name (`model.layers.3.self_attn.q_proj.weight`) -> where it goes; None for buffers
    and for the `lm_head.weight` a tied checkpoint may still ship (the model reads `embed/embedding`)."""
    if name.endswith(_IGNORED_HF) or (cfg.tie_embeddings and name == "lm_head.weight"):
        return None
    path = hf_path(name, cfg.n_layers, _HF, {h: p for p, (_, h) in _GLOBAL.items()})
    if path is None:
        raise ValueError(f"unexpected tensor {name!r} for a LlamaForCausalLM checkpoint")
    return TensorMap(path, transpose=path.endswith("kernel"))


def hf_name(path: str, cfg: LlamaConfig) -> str:
    """The Hugging Face tensor name of parameter `path` (`layers_3/attn/q_proj/kernel` ->
    `model.layers.3.self_attn.q_proj.weight`), the inverse of `hf_tensor`; ValueError for a path `Llama(cfg)` lacks.
    A kernel (in, out) is stored transposed, (out, in)."""
    if path in _GLOBAL and (path != "lm_head/kernel" or not cfg.tie_embeddings):
        return _GLOBAL[path][1] + ".weight"
    layer, _, rest = path.partition("/")
    i = layer.removeprefix("layers_")
    if layer.startswith("layers_") and i.isdigit() and int(i) < cfg.n_layers and rest in _BLOCK:
        return f"model.layers.{i}.{_BLOCK[rest][1]}.weight"
    raise ValueError(f"parameter {path!r} is not one of a LlamaForCausalLM with this config "
                     f"({cfg.n_layers} layers, tie_embeddings={cfg.tie_embeddings})")
