"""`MoeConfig`: the hyperparameters of a mixture-of-experts decoder (Mixtral / Qwen-MoE style), and the parameter
shapes it implies."""

from __future__ import annotations

import dataclasses

__all__ = ["MoeConfig", "expected_shapes"]


@dataclasses.dataclass(frozen=True)
class MoeConfig:
    """Shape and numerics of a mixture-of-experts decoder: Llama attention (grouped-query, RoPE, RMSNorm pre-norm
    blocks) with the MLP replaced by `n_experts` SwiGLU experts of width `expert_dim`, `top_k` of them per token.

    Field names follow `jq.models.llama.LlamaConfig` where they mean the same (the attention reads them):
    `dim` is d_model, `head_dim` the per-head width of q/k/v, `tie_embeddings` reuses `embed/embedding` as the
    output projection (no `lm_head`).
    """

    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    n_experts: int
    top_k: int
    expert_dim: int
    max_seq_len: int = 2048
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True

    def __post_init__(self) -> None:
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "n_experts", "top_k",
                     "expert_dim", "max_seq_len"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"MoeConfig.{name} must be positive, got {getattr(self, name)}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"MoeConfig: n_heads ({self.n_heads}) must be a multiple of n_kv_heads "
                             f"({self.n_kv_heads}) for grouped-query attention")
        if self.head_dim % 2:
            raise ValueError(f"MoeConfig.head_dim must be even for RoPE, got {self.head_dim}")
        if self.top_k > self.n_experts:
            raise ValueError(f"MoeConfig.top_k ({self.top_k}) exceeds n_experts ({self.n_experts}); a token is "
                             "routed to at most every expert")

    @property
    def group_size(self) -> int:
        """Query heads served by one key/value head (what the Llama attention reads)."""
        return self.n_heads // self.n_kv_heads

    @classmethod
    def tiny(cls, *, vocab_size: int = 256, n_experts: int = 8, top_k: int = 2) -> MoeConfig:
        """A small config for tests: d 64, 2 layers, 4 query heads over 2 kv heads, 8 experts of width 64."""
        return cls(vocab_size=vocab_size, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16,
                   n_experts=n_experts, top_k=top_k, expert_dim=64, max_seq_len=128)


def expected_shapes(c: MoeConfig) -> dict[str, tuple[int, ...]]:
    """Every parameter of `jq.models.moe.model.MoeLM(c)` by path (see that module's docstring)."""
    q, kv = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
    shapes: dict[str, tuple[int, ...]] = {"embed/embedding": (c.vocab_size, c.dim), "final_norm/scale": (c.dim,)}
    if not c.tie_embeddings:
        shapes["lm_head/kernel"] = (c.dim, c.vocab_size)
    for i in range(c.n_layers):
        p = f"layers_{i}"
        shapes |= {
            f"{p}/input_norm/scale": (c.dim,), f"{p}/post_attn_norm/scale": (c.dim,),
            f"{p}/attn/q_proj/kernel": (c.dim, q), f"{p}/attn/k_proj/kernel": (c.dim, kv),
            f"{p}/attn/v_proj/kernel": (c.dim, kv), f"{p}/attn/o_proj/kernel": (q, c.dim),
            f"{p}/moe/router/kernel": (c.dim, c.n_experts),
            f"{p}/moe/experts/gate/kernel": (c.n_experts, c.dim, c.expert_dim),
            f"{p}/moe/experts/up/kernel": (c.n_experts, c.dim, c.expert_dim),
            f"{p}/moe/experts/down/kernel": (c.n_experts, c.expert_dim, c.dim),
        }
    return shapes
