"""The Llama decoder described for sequential calibration (`jq.sequential.BlockSpec`)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jq.models.config import LlamaConfig
from jq.models.llama import Block
from jq.sequential import BlockSpec, Fold

ATTN_IN = ("attn/q_proj/kernel", "attn/k_proj/kernel", "attn/v_proj/kernel")
MLP_IN = ("mlp/gate_proj/kernel", "mlp/up_proj/kernel")

# Execution order inside a block: each stage is calibrated with the ones before it already quantized.
STAGES = (ATTN_IN, ("attn/o_proj/kernel",), MLP_IN, ("mlp/down_proj/kernel",))

# Who produces each linear's input. v -> o applies only when the shapes allow it (no grouped-query attention:
# with GQA one v channel feeds several heads' o rows); the driver skips a fold whose shapes do not match.
FOLDS = (
    Fold("input_norm/scale", ATTN_IN),
    Fold("attn/v_proj/kernel", ("attn/o_proj/kernel",)),
    Fold("post_attn_norm/scale", MLP_IN),
    Fold("mlp/up_proj/kernel", ("mlp/down_proj/kernel",)),
)


def block_spec(cfg: LlamaConfig, dtype=jnp.float32) -> BlockSpec:
    """BlockSpec for `jq.models.llama.Llama(cfg)` params."""

    def embed(params, tokens):
        return jnp.take(jnp.asarray(params["embed"]["embedding"]), tokens, axis=0).astype(dtype)

    def extra(tokens):
        return (jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape),)

    return BlockSpec(
        module=Block(cfg, dtype),
        names=tuple(f"layers_{i}" for i in range(cfg.n_layers)),
        embed=embed,
        extra=extra,
        stages=STAGES,
        folds=FOLDS,
    )
