"""The Llama decoder described for sequential calibration (`jq.calibration.sequential.BlockSpec`)."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.typing import DTypeLike

from jq.interop.layers import LayerCall, layer_interceptor
from jq.interop.linen import apply
from jq import ops
from jq.models.llama.config import LlamaConfig
from jq.models.llama.model import MLP, Attention, Block, RMSNorm
from jq.calibration.sequential import BlockSpec, Fold

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


def block_spec(cfg: LlamaConfig, dtype: DTypeLike = jnp.float32) -> BlockSpec:
    """BlockSpec for `jq.models.llama.model.Llama(cfg)` params: embeds tokens [B, T] int32 → hidden [B, T, D]."""

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
        head_dim=cfg.head_dim,
        staged=functools.partial(staged_block, stage_fns(cfg, jnp.dtype(dtype).name)),
    )


def grab(target: str, box: dict) -> Callable[..., Any]:
    """An interceptor keeping the input of the layer whose kernel is at `target` (path inside the module) in
    box["x"]."""

    def keep(c: LayerCall):
        if c.path == target:
            box["x"] = c.x
        return c.proceed()

    return layer_interceptor(keep)


@functools.lru_cache(maxsize=None)
def stage_fns(cfg: LlamaConfig, dtype: str) -> dict:
    """The block's dataflow cut at its linear layers' inputs, each piece jitted once per config (the attention
    half also serves families with Llama's attention and norms, e.g. `jq.models.moe`)."""
    attn, mlp, norm = Attention(cfg, dtype), MLP(cfg, dtype), RMSNorm(cfg.norm_eps, dtype)

    def attn_core(p, x, positions):  # -> o_proj's input; XLA drops the float o_proj itself
        box: dict = {}
        apply(attn, {"params": p}, x, positions, interceptor=grab("o_proj/kernel", box))
        return box["x"]

    def mlp_core(p, x):  # -> down_proj's input
        box: dict = {}
        apply(mlp, {"params": p}, x, interceptor=grab("down_proj/kernel", box))
        return box["x"]

    def attn_out(block, h, a):  # residual after o_proj, and the MLP input
        h1 = h + ops.qdot(a, block["attn"]["o_proj"]["kernel"]).astype(h.dtype)
        return h1, norm.apply({"params": block["post_attn_norm"]}, h1)

    return {
        "norm_in": jax.jit(lambda block, h: norm.apply({"params": block["input_norm"]}, h)),
        "attn_core": jax.jit(lambda block, x, pos: attn_core(block["attn"], x, pos)),
        "attn_out": jax.jit(attn_out),
        "mlp_core": jax.jit(lambda block, x: mlp_core(block["mlp"], x)),
        "mlp_out": jax.jit(lambda block, h1, m: h1 + ops.qdot(m, block["mlp"]["down_proj"]["kernel"]).astype(h1.dtype)),
    }


def staged_attention(fns: dict, block: dict, hs: list[jax.Array], extras: list[tuple],
                     quantize_stage: Callable[[tuple[str, ...], Sequence[jax.Array]], dict],
                     ) -> tuple[dict, tuple[jax.Array, ...], tuple[jax.Array, ...]]:
    """The attention half of `staged_block`: q/k/v on the normed input, then o on the attention output; returns
    (block, residuals after attention [B, T, D] per batch, the MLP's inputs per batch). Shared by the families
    whose blocks start with this attention (Llama, Gemma 3 through `staged_block`, MoE)."""
    x0 = [fns["norm_in"](block, h) for h in hs]
    block = quantize_stage(ATTN_IN, x0)
    a = [fns["attn_core"](block, x, *e) for x, e in zip(x0, extras)]
    del x0
    block = quantize_stage(("attn/o_proj/kernel",), a)
    h1, x2 = zip(*[fns["attn_out"](block, h, ai) for h, ai in zip(hs, a)])
    return block, h1, x2


def staged_block(fns: dict, block: dict, hs: list[jax.Array], extras: list[tuple],
                 quantize_stage: Callable[[tuple[str, ...], Sequence[jax.Array]], dict],
                 ) -> tuple[dict, list[jax.Array]]:
    """One pass through a block, quantizing each stage on the inputs computed with the earlier stages quantized
    (the `BlockSpec.staged` protocol). hs: per-batch hidden states [B, T, D]; extras: per-batch (positions [B, T],);
    returns (block, outputs [B, T, D] per batch)."""
    block, h1, x2 = staged_attention(fns, block, hs, extras, quantize_stage)
    block = quantize_stage(MLP_IN, x2)
    m = [fns["mlp_core"](block, x) for x in x2]
    del x2
    block = quantize_stage(("mlp/down_proj/kernel",), m)
    return block, [fns["mlp_out"](block, h, mi) for h, mi in zip(h1, m)]
