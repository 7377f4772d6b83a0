"""`Gemma3Config`: the hyperparameters of a Gemma 3 text decoder, and readers for GGUF / Hugging Face metadata."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np

__all__ = ["Gemma3Config"]


def _f32(value: Any) -> float:
    """GGUF stores floats as float32: the shortest decimal of that float32 (1e-6, not 9.99999997e-07)."""
    return float(str(np.float32(value)))


@dataclasses.dataclass(frozen=True)
class Gemma3Config:
    """Shape and numerics of a Gemma 3 decoder (text part).

    Layers alternate sliding-window ("local") and full ("global") attention: layer i is global when
    (i + 1) % global_every == 0 (Gemma 3: five local layers, then one global). Local layers attend to the
    `sliding_window` most recent positions (the query's own included) with RoPE base `rope_local`; global layers
    to all earlier positions with `rope_global`. Queries are scaled by `query_scale ** -0.5`
    (`query_pre_attn_scalar`). Norm scales are stored as the multiplier of the normalised input, i.e. 1 + w in
    the Hugging Face convention (GGUF files already store 1 + w). `residual_rotation` ("hadamard(seed=N)", set by
    `jq.models.gemma3.rotate`) rotates the pre-norms' outputs online (see there).
    """

    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    hidden_dim: int
    rope_global: float = 1_000_000.0
    rope_local: float = 10_000.0
    sliding_window: int = 512
    global_every: int = 6
    query_scale: float = 256.0
    norm_eps: float = 1e-6
    tie_embeddings: bool = True
    max_seq_len: int = 32768
    residual_rotation: str | None = None

    def __post_init__(self) -> None:
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "hidden_dim",
                     "sliding_window", "global_every"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"Gemma3Config.{name} must be positive, got {getattr(self, name)}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")
        if not self.tie_embeddings:
            raise ValueError("Gemma 3 ties its LM head to the embedding; tie_embeddings=False is not supported")

    @property
    def group_size(self) -> int:
        """Query heads served by one key/value head."""
        return self.n_heads // self.n_kv_heads

    def is_global(self, layer: int) -> bool:
        """Whether layer `layer` uses full (global) attention rather than the sliding window."""
        return (layer + 1) % self.global_every == 0

    @classmethod
    def tiny(cls, vocab_size: int = 64) -> Gemma3Config:
        """A small config for tests: 3 layers (local, global, local with global_every=2), 4 query heads over 1 kv
        head, sliding window 8."""
        return cls(vocab_size=vocab_size, dim=32, n_layers=3, n_heads=4, n_kv_heads=1, head_dim=16, hidden_dim=64,
                   sliding_window=8, global_every=2, query_scale=16.0, max_seq_len=128)

    @classmethod
    def from_gguf_metadata(cls, meta: Mapping[str, Any], *, vocab_size: int | None = None) -> Gemma3Config:
        """Build from GGUF key/values (`gemma3.*`). The local RoPE base (10000), the query scale (head_dim unless
        the file says otherwise) and the 5:1 local/global pattern are not stored in GGUF; llama.cpp fixes them
        for Gemma 3, and so does this reader."""
        def need(key: str) -> Any:
            if key not in meta:
                raise ValueError(f"GGUF metadata is missing {key!r}, needed for a gemma3 model")
            return meta[key]

        if meta.get("gemma3.rope.scaling.type") not in (None, "none"):
            raise ValueError(f"RoPE scaling {meta['gemma3.rope.scaling.type']!r} is not supported (Gemma 3 270M / "
                             "1B use none; the 4B+ models' linear scaling of global layers is not implemented)")
        head_dim = int(need("gemma3.attention.key_length"))
        vocab = meta.get("gemma3.vocab_size", vocab_size)
        if vocab is None:
            raise ValueError("GGUF has neither gemma3.vocab_size nor a tokenizer.ggml.tokens list to size the vocabulary")
        return cls(
            vocab_size=int(vocab), dim=int(need("gemma3.embedding_length")), n_layers=int(need("gemma3.block_count")),
            n_heads=int(need("gemma3.attention.head_count")),
            n_kv_heads=int(meta.get("gemma3.attention.head_count_kv", need("gemma3.attention.head_count"))),
            head_dim=head_dim, hidden_dim=int(need("gemma3.feed_forward_length")),
            rope_global=_f32(meta.get("gemma3.rope.freq_base", 1_000_000.0)),
            sliding_window=int(meta.get("gemma3.attention.sliding_window", 512)),
            query_scale=float(head_dim),
            norm_eps=_f32(meta.get("gemma3.attention.layer_norm_rms_epsilon", 1e-6)),
            max_seq_len=int(meta.get("gemma3.context_length", 32768)),
        )

    @classmethod
    def from_hf_config(cls, hf: Mapping[str, Any]) -> Gemma3Config:
        """Build from a Hugging Face `config.json` of a `Gemma3ForCausalLM` (`model_type` gemma3_text, or the text
        part of a gemma3 config)."""
        hf = hf.get("text_config", hf)
        if hf.get("rope_scaling"):
            raise ValueError(f"rope_scaling {hf['rope_scaling']!r} is not supported (only plain RoPE)")
        if hf.get("final_logit_softcapping") or hf.get("attn_logit_softcapping"):
            raise ValueError("logit soft-capping (Gemma 2) is not supported by the Gemma 3 family")
        act = hf.get("hidden_activation", hf.get("hidden_act", "gelu_pytorch_tanh"))
        if act not in ("gelu_pytorch_tanh", "gelu_tanh"):
            raise ValueError(f"hidden_activation {act!r} is not supported (Gemma 3 uses gelu_pytorch_tanh)")
        types = hf.get("layer_types")
        every = int(hf.get("sliding_window_pattern", 6))
        if types:
            globals_ = [i for i, t in enumerate(types) if t == "full_attention"]
            every = globals_[0] + 1 if globals_ else len(types) + 1
            cfg_types = ["full_attention" if (i + 1) % every == 0 else "sliding_attention" for i in range(len(types))]
            if cfg_types != list(types):
                raise ValueError(f"layer_types {types} is not a regular local/global pattern")
        dim, heads = int(hf["hidden_size"]), int(hf["num_attention_heads"])
        head_dim = int(hf.get("head_dim") or dim // heads)
        return cls(
            vocab_size=int(hf["vocab_size"]), dim=dim, n_layers=int(hf["num_hidden_layers"]), n_heads=heads,
            n_kv_heads=int(hf.get("num_key_value_heads") or heads), head_dim=head_dim,
            hidden_dim=int(hf["intermediate_size"]), rope_global=float(hf.get("rope_theta", 1_000_000.0)),
            rope_local=float(hf.get("rope_local_base_freq", 10_000.0)),
            sliding_window=int(hf.get("sliding_window", 512)), global_every=every,
            query_scale=float(hf.get("query_pre_attn_scalar", head_dim)), norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
            max_seq_len=int(hf.get("max_position_embeddings", 32768)),
        )
