"""`LlamaConfig`: the hyperparameters of a Llama-family decoder, and readers for GGUF / Hugging Face metadata."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np


def _shortest_f32(value: Any) -> float:
    """GGUF stores floats as float32 (1e-5 reads back as 9.9999997e-06): the shortest decimal for that float32."""
    return float(str(np.float32(value)))


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Shape and numerics of a Llama-family decoder.

    `head_dim` is the per-head width of q/k/v (usually `dim // n_heads`); `hidden_dim` is the SwiGLU width.
    `tie_embeddings` means the output projection reuses `embed/embedding` (no `lm_head`).
    """

    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    hidden_dim: int
    head_dim: int
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    max_seq_len: int = 2048

    def __post_init__(self) -> None:
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "hidden_dim", "head_dim"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"LlamaConfig.{name} must be positive, got {getattr(self, name)}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads}) for grouped-query attention"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")

    @property
    def group_size(self) -> int:
        """Query heads served by one key/value head."""
        return self.n_heads // self.n_kv_heads

    @classmethod
    def tiny(cls, *, tie_embeddings: bool = True, vocab_size: int = 64) -> LlamaConfig:
        """A few-thousand-parameter config for tests: 2 layers, 4 query heads over 2 kv heads (GQA)."""
        return cls(
            vocab_size=vocab_size, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64, head_dim=8,
            rope_theta=10000.0, norm_eps=1e-5, tie_embeddings=tie_embeddings, max_seq_len=128,
        )

    @classmethod
    def from_gguf_metadata(cls, meta: Mapping[str, Any], *, vocab_size: int | None = None,
                           has_output: bool = False) -> LlamaConfig:
        """Build from GGUF key/values (`llama.*` keys, already decoded to Python values).

        `vocab_size` is the fallback when `llama.vocab_size` is absent (the token list length);
        `has_output` says whether the file has an untied `output.weight`.
        """
        arch = meta.get("general.architecture")
        if arch != "llama":
            raise ValueError(
                f"unsupported GGUF architecture {arch!r}: only 'llama' (Llama, SmolLM, Mistral-style) decoders are supported"
            )

        def need(key: str) -> Any:
            if key not in meta:
                raise ValueError(f"GGUF metadata is missing {key!r}, needed for a llama model")
            return meta[key]

        dim = int(need("llama.embedding_length"))
        n_heads = int(need("llama.attention.head_count"))
        head_dim = int(meta.get("llama.attention.key_length", dim // n_heads))
        rope_dims = int(meta.get("llama.rope.dimension_count", head_dim))
        if rope_dims != head_dim:
            raise ValueError(
                f"llama.rope.dimension_count={rope_dims} differs from head_dim={head_dim}: partial rotary is not supported"
            )
        scaling = meta.get("llama.rope.scaling.type")
        if scaling not in (None, "none"):
            raise ValueError(f"RoPE scaling {scaling!r} is not supported (only plain RoPE)")
        vocab = meta.get("llama.vocab_size", vocab_size)
        if vocab is None:
            raise ValueError("GGUF has neither llama.vocab_size nor a tokenizer.ggml.tokens list to size the vocabulary")
        return cls(
            vocab_size=int(vocab), dim=dim, n_layers=int(need("llama.block_count")), n_heads=n_heads,
            n_kv_heads=int(meta.get("llama.attention.head_count_kv", n_heads)),
            hidden_dim=int(need("llama.feed_forward_length")), head_dim=head_dim,
            rope_theta=_shortest_f32(meta.get("llama.rope.freq_base", 10000.0)),
            norm_eps=_shortest_f32(need("llama.attention.layer_norm_rms_epsilon")),
            tie_embeddings=not has_output, max_seq_len=int(meta.get("llama.context_length", 2048)),
        )

    @classmethod
    def from_hf_config(cls, hf: Mapping[str, Any]) -> LlamaConfig:
        """Build from a Hugging Face `config.json` dict of a `LlamaForCausalLM`."""
        model_type = hf.get("model_type")
        if model_type != "llama":
            hint = " (a BERT encoder loads with jq.models.load_bert)" if model_type == "bert" else ""
            raise ValueError(f"unsupported Hugging Face model_type {model_type!r}: only 'llama' is supported{hint}")
        if hf.get("rope_scaling"):
            raise ValueError(f"rope_scaling {hf['rope_scaling']!r} is not supported (only plain RoPE)")
        if hf.get("attention_bias") or hf.get("mlp_bias"):
            raise ValueError("Llama variants with attention_bias / mlp_bias are not supported (projections have no bias)")
        if hf.get("hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act {hf['hidden_act']!r} is not supported (SwiGLU uses silu)")
        dim = int(hf["hidden_size"])
        n_heads = int(hf["num_attention_heads"])
        return cls(
            vocab_size=int(hf["vocab_size"]), dim=dim, n_layers=int(hf["num_hidden_layers"]), n_heads=n_heads,
            n_kv_heads=int(hf.get("num_key_value_heads") or n_heads), hidden_dim=int(hf["intermediate_size"]),
            head_dim=int(hf.get("head_dim") or dim // n_heads), rope_theta=float(hf.get("rope_theta", 10000.0)),
            norm_eps=float(hf.get("rms_norm_eps", 1e-6)), tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            max_seq_len=int(hf.get("max_position_embeddings", 2048)),
        )


def hf_config(cfg: LlamaConfig) -> dict[str, Any]:
    """The Hugging Face `config.json` dict of a `LlamaForCausalLM` with config `cfg` (`LlamaConfig.from_hf_config`
    reads it back to an equal config)."""
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.dim, "intermediate_size": cfg.hidden_dim, "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim,
        "rope_theta": cfg.rope_theta, "rms_norm_eps": cfg.norm_eps, "tie_word_embeddings": cfg.tie_embeddings,
        "max_position_embeddings": cfg.max_seq_len, "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
    }
