"""The Gemma 3 decoder described for sequential calibration (`jq.calibration.sequential.BlockSpec`).

Sandwich norms: the pre-norms (input_norm, pre_mlp_norm) produce q/k/v and gate/up's inputs, so AWQ / SmoothQuant
scales fold into them; the post-norms act on o / down's outputs, which no input scale touches. o_proj's input comes
from v only without grouped-query attention (the driver skips that fold for Gemma's one kv head); down's from up.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax.typing import DTypeLike

from jq.calibration.sequential import BlockSpec, Fold
from jq.models.gemma3.config import Gemma3Config
from jq.models.gemma3.model import Block, stream_rotation
from jq.models.llama.blocks import ATTN_IN, MLP_IN, STAGES

__all__ = ["block_spec", "STAGES", "FOLDS"]

FOLDS = (  # Llama's, with the pre-MLP norm in place of post_attn_norm
    Fold("input_norm/scale", ATTN_IN),
    Fold("attn/v_proj/kernel", ("attn/o_proj/kernel",)),
    Fold("pre_mlp_norm/scale", MLP_IN),
    Fold("mlp/up_proj/kernel", ("mlp/down_proj/kernel",)),
)


def block_spec(cfg: Gemma3Config, dtype: DTypeLike = jnp.float32) -> BlockSpec:
    """BlockSpec for `Gemma3(cfg)` params: embeds tokens [B, T] int32 -> hidden [B, T, D] (scaled by sqrt(D));
    local and global layers get their own block module."""
    local, glob = Block(cfg, False, dtype), Block(cfg, True, dtype)
    rotate = stream_rotation(cfg)

    def embed(params, tokens):
        x = jnp.take(jnp.asarray(params["embed"]["embedding"]), tokens, axis=0).astype(dtype)
        return rotate(x * jnp.asarray(cfg.dim ** 0.5, dtype))

    def extra(tokens):
        return (jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape),)

    return BlockSpec(
        module=local,
        modules=tuple(glob if cfg.is_global(i) else local for i in range(cfg.n_layers)),
        names=tuple(f"layers_{i}" for i in range(cfg.n_layers)),
        embed=embed,
        extra=extra,
        stages=STAGES,
        folds=FOLDS,
    )
