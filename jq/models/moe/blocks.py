"""The MoE decoder described for sequential calibration (`jq.calibration.sequential.BlockSpec`), per expert.

Stages of a block, each calibrated with the earlier ones quantized: q/k/v, o, the router (float unless a rule
forces it), then per expert its gate/up on the tokens routed to it, then its down on their hidden states (computed
with the expert's quantized gate/up). Routing is taken from the (possibly quantized) router, so each expert's
statistics come from the tokens the quantized model actually sends it; an expert no calibration token reaches is
quantized with RTN (`quantize_leaf`'s fallback), its warning naming the layer and the expert index.

The experts' statistics are summed per expert over the routed tokens (`jq.calibration.experts.expert_sums`) and
handed to the driver's stage callback whole (`quantize_stage(paths, (), stats=...)`, hessian [E, K, K]), which
quantizes every expert at once by vmap (`jq.algorithms.experts.quantize_stacked`), as `quantize_params` does with
`capture_experts` statistics. AWQ / SmoothQuant folds apply to the attention only; expert weights take methods
without transforms.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.typing import DTypeLike

from jq.algorithms.stats import StatSums
from jq.calibration.experts import expert_sums
from jq.calibration.sequential import BlockSpec, Fold
from jq.interop.linen import apply
from jq.models.llama import blocks as llama_blocks
from jq.models.moe.config import MoeConfig
from jq.models.moe.model import MoE, Block, Experts

__all__ = ["block_spec", "staged_block", "quantize_experts", "STAGES", "FOLDS"]

_expert_sums = jax.jit(expert_sums, static_argnums=2)

ATTN_IN = llama_blocks.ATTN_IN
ROUTER = ("moe/router/kernel",)
EXPERT_IN = ("moe/experts/gate/kernel", "moe/experts/up/kernel")
EXPERT_OUT = ("moe/experts/down/kernel",)
STAGES = (ATTN_IN, ("attn/o_proj/kernel",), ROUTER, EXPERT_IN, EXPERT_OUT)
FOLDS = (Fold("input_norm/scale", ATTN_IN), Fold("attn/v_proj/kernel", ("attn/o_proj/kernel",)))


def block_spec(cfg: MoeConfig, dtype: DTypeLike = jnp.float32) -> BlockSpec:
    """BlockSpec for `MoeLM(cfg)` params: embeds tokens [B, T] int32 → hidden [B, T, D]; staged per expert."""

    def embed(params, tokens):
        return jnp.take(jnp.asarray(params["embed"]["embedding"]), tokens, axis=0).astype(dtype)

    def extra(tokens):
        return (jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape),)

    return BlockSpec(module=Block(cfg, dtype), names=tuple(f"layers_{i}" for i in range(cfg.n_layers)),
                     embed=embed, extra=extra, stages=STAGES, folds=FOLDS, head_dim=cfg.head_dim,
                     staged=functools.partial(staged_block, _stage_fns(cfg, jnp.dtype(dtype).name)))


@functools.lru_cache(maxsize=None)
def _stage_fns(cfg: MoeConfig, dtype: str) -> dict[str, Callable[..., Any]]:
    """The block's dataflow cut at its weights' inputs, each piece jitted once per config: the attention half is
    Llama's (same modules and paths), then routing, the experts' hidden states and the MoE output."""
    moe, experts = MoE(cfg, dtype), Experts(cfg, dtype)
    llama = llama_blocks.stage_fns(cfg, dtype)
    return {
        **{k: llama[k] for k in ("norm_in", "attn_core", "attn_out")},
        "route": jax.jit(lambda block, x: apply(moe, {"params": block["moe"]}, x, method=MoE.route)),
        "hidden": jax.jit(lambda block, x: apply(experts, {"params": block["moe"]["experts"]}, x,
                                                 method=Experts.hidden)),
        "moe_out": jax.jit(lambda block, h1, x: h1 + apply(moe, {"params": block["moe"]}, x).astype(h1.dtype)),
    }


def quantize_experts(block: dict, paths: tuple[str, ...], xs: Sequence[jax.Array], masks: Sequence[jax.Array],
                     quantize_stage: Callable[..., dict], expert_axis: int | None = None) -> dict:
    """Quantize the stacked expert leaves `paths` [E, K, N] of `block` on per-expert statistics of the tokens routed
    to each expert: xs per batch, [B, T, K] shared by the experts or [B, T, E, K] (`expert_axis` 2), masks [B, T, E].
    Every expert at once (`quantize_stacked` vmaps the method); an expert no token reached is rounded by RTN, with
    a warning naming its index."""
    sums = None
    for x, m in zip(xs, masks):
        s = _expert_sums(x, m, expert_axis)
        sums = s if sums is None else sums.merge(s)
    return quantize_stage(paths, (), stats=jax.vmap(StatSums.finalize)(sums))


def staged_block(fns: dict, block: dict, hs: list[jax.Array], extras: list[tuple],
                 quantize_stage: Callable[[tuple[str, ...], Sequence[jax.Array]], dict],
                 ) -> tuple[dict, list[jax.Array]]:
    """One pass through a block (the `BlockSpec.staged` protocol): hs per-batch hidden states [B, T, D], extras
    per-batch (positions [B, T],) → (block with its weights quantized, outputs [B, T, D] per batch)."""
    block, h1, x2 = llama_blocks.staged_attention(fns, block, hs, extras, quantize_stage)
    block = quantize_stage(ROUTER, x2)
    masks = [fns["route"](block, x) > 0 for x in x2]
    block = quantize_experts(block, EXPERT_IN, x2, masks, quantize_stage)
    hidden = [fns["hidden"](block, x) for x in x2]
    block = quantize_experts(block, EXPERT_OUT, hidden, masks, quantize_stage, expert_axis=2)
    del hidden
    return block, [fns["moe_out"](block, h, x) for h, x in zip(h1, x2)]
