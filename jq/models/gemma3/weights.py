"""The Gemma 3 family's parameter tree: every path with its shape, and where each GGUF / Hugging Face tensor goes.

GGUF files store norm scales as 1 + w (llama.cpp adds Gemma's offset when converting) and q/k rows in the
rotate-half order; Hugging Face files store w, so their norms get the 1 added here.
"""

from __future__ import annotations

import numpy as np

from jq.models.decoder import gguf_path, hf_path
from jq.models.family import TensorMap
from jq.models.gemma3.config import Gemma3Config

__all__ = ["expected_shapes", "gguf_tensor", "hf_tensor"]

# per block: parameter path under layers_{i} -> (GGUF name under blk.{i}., Hugging Face name under model.layers.{i}.)
_BLOCK = {
    "input_norm/scale": ("attn_norm", "input_layernorm"),
    "attn/q_proj/kernel": ("attn_q", "self_attn.q_proj"),
    "attn/k_proj/kernel": ("attn_k", "self_attn.k_proj"),
    "attn/v_proj/kernel": ("attn_v", "self_attn.v_proj"),
    "attn/o_proj/kernel": ("attn_output", "self_attn.o_proj"),
    "attn/q_norm/scale": ("attn_q_norm", "self_attn.q_norm"),
    "attn/k_norm/scale": ("attn_k_norm", "self_attn.k_norm"),
    "post_attn_norm/scale": ("post_attention_norm", "post_attention_layernorm"),
    "pre_mlp_norm/scale": ("ffn_norm", "pre_feedforward_layernorm"),
    "mlp/gate_proj/kernel": ("ffn_gate", "mlp.gate_proj"),
    "mlp/up_proj/kernel": ("ffn_up", "mlp.up_proj"),
    "mlp/down_proj/kernel": ("ffn_down", "mlp.down_proj"),
    "post_mlp_norm/scale": ("post_ffw_norm", "post_feedforward_layernorm"),
}
_GLOBAL = {"embed/embedding": ("token_embd", "model.embed_tokens"), "final_norm/scale": ("output_norm", "model.norm")}
_GGUF = {g: p for p, (g, _) in _BLOCK.items()}
_HF = {h: p for p, (_, h) in _BLOCK.items()}


def expected_shapes(cfg: Gemma3Config) -> dict[str, tuple[int, ...]]:
    """Every parameter path of `Gemma3(cfg)` with its shape."""
    q, kv, d, f = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim, cfg.dim, cfg.hidden_dim
    shapes = {"embed/embedding": (cfg.vocab_size, d), "final_norm/scale": (d,)}
    for i in range(cfg.n_layers):
        p = f"layers_{i}/"
        shapes |= {p + n: (d,) for n in ("input_norm/scale", "post_attn_norm/scale", "pre_mlp_norm/scale",
                                          "post_mlp_norm/scale")}
        shapes |= {p + "attn/q_norm/scale": (cfg.head_dim,), p + "attn/k_norm/scale": (cfg.head_dim,),
                   p + "attn/q_proj/kernel": (d, q), p + "attn/k_proj/kernel": (d, kv), p + "attn/v_proj/kernel": (d, kv),
                   p + "attn/o_proj/kernel": (q, d), p + "mlp/gate_proj/kernel": (d, f), p + "mlp/up_proj/kernel": (d, f),
                   p + "mlp/down_proj/kernel": (f, d)}
    return shapes


def _map(path: str, hf: bool = False) -> TensorMap:
    if path.endswith("scale"):
        return TensorMap(path, convert=(lambda w: w + np.float32(1)) if hf else None)
    return TensorMap(path, transpose=path.endswith("kernel"))


def gguf_tensor(name: str, cfg: Gemma3Config) -> TensorMap:
    """A GGUF tensor name (`blk.3.attn_q.weight`) -> where it goes; ValueError for one this family lacks."""
    path = gguf_path(name, cfg.n_layers, _GGUF, {g: p for p, (g, _) in _GLOBAL.items()})
    if path is None:
        raise ValueError(f"unexpected GGUF tensor {name!r} for a gemma3 text model (vision towers and untied "
                         "output heads are not supported)")
    return _map(path)


def hf_tensor(name: str, cfg: Gemma3Config) -> TensorMap | None:
    """A Hugging Face tensor name (`model.layers.3.self_attn.q_proj.weight`, or under `language_model.`) -> where
    it goes; None for a tied `lm_head.weight`."""
    name = name.removeprefix("language_model.")
    if name == "lm_head.weight":
        return None
    path = hf_path(name, cfg.n_layers, _HF, {h: p for p, (_, h) in _GLOBAL.items()})
    if path is None:
        raise ValueError(f"unexpected tensor {name!r} for a Gemma3ForCausalLM checkpoint")
    return _map(path, hf=True)
