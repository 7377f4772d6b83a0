"""The Gemma 3 decoder described for sequential calibration (`jq.calibration.sequential.BlockSpec`).

Sandwich norms: the pre-norms (input_norm, pre_mlp_norm) produce q/k/v and gate/up's inputs, so AWQ / SmoothQuant
scales fold into them; the post-norms act on o / down's outputs, which no input scale touches. o_proj's input comes
from v (scales tied over the query heads of Gemma's one kv head: `head_dim` in the spec); down's from up.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.typing import DTypeLike

from jq.calibration.sequential import BlockSpec, Fold
from jq.models.gemma3.config import Gemma3Config
from jq import ops
from jq.interop.linen import apply
from jq.models.gemma3.model import MLP, Attention, Block, input_rotation
from jq.models.llama.blocks import ATTN_IN, MLP_IN, STAGES, grab, staged_block
from jq.models.llama.model import RMSNorm

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

    def embed(params, tokens):
        x = jnp.take(jnp.asarray(params["embed"]["embedding"]), tokens, axis=0).astype(dtype)
        return x * jnp.asarray(cfg.dim ** 0.5, dtype)

    def extra(tokens):
        return (jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape),)

    fns = {g: _stage_fns(cfg, jnp.dtype(dtype).name, g) for g in (False, True)}
    return BlockSpec(
        staged=tuple(functools.partial(staged_block, fns[cfg.is_global(i)]) for i in range(cfg.n_layers)),
        module=local,
        modules=tuple(glob if cfg.is_global(i) else local for i in range(cfg.n_layers)),
        names=tuple(f"layers_{i}" for i in range(cfg.n_layers)),
        embed=embed,
        extra=extra,
        stages=STAGES,
        folds=FOLDS,
        head_dim=cfg.head_dim,
    )


@functools.lru_cache(maxsize=None)
def _stage_fns(cfg: Gemma3Config, dtype: str, is_global: bool) -> dict:
    """The block's dataflow cut at its linear layers' inputs (the protocol of `jq.models.llama.blocks.staged_block`),
    jitted once per config and attention kind: the sandwich norms sit in the residual updates, the rotation (if
    any) on the pre-norms' outputs."""
    attn, mlp, norm = Attention(cfg, is_global, dtype), MLP(cfg, dtype), RMSNorm(cfg.norm_eps, dtype)
    rot = input_rotation(cfg)

    def core(module, name, target):
        def run(block, x, *extra):
            box: dict = {}
            apply(module, {"params": block[name]}, x, *extra, interceptor=grab(target, box))
            return box["x"]
        return jax.jit(run)

    def update(block, h, y, post):
        return h + norm.apply({"params": block[post]}, y).astype(h.dtype)

    def attn_out(block, h, a):  # residual after o_proj and its post-norm, and the MLP input
        h1 = update(block, h, ops.qdot(a, block["attn"]["o_proj"]["kernel"]), "post_attn_norm")
        return h1, rot(norm.apply({"params": block["pre_mlp_norm"]}, h1))

    return {
        "norm_in": jax.jit(lambda block, h: rot(norm.apply({"params": block["input_norm"]}, h))),
        "attn_core": core(attn, "attn", "o_proj/kernel"),
        "attn_out": jax.jit(attn_out),
        "mlp_core": core(mlp, "mlp", "down_proj/kernel"),
        "mlp_out": jax.jit(lambda block, h1, m: update(block, h1, ops.qdot(m, block["mlp"]["down_proj"]["kernel"]),
                                                       "post_mlp_norm")),
    }
