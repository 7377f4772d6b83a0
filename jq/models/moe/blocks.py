"""The MoE decoder described for sequential calibration (`jq.calibration.sequential.BlockSpec`), per expert.

Stages of a block, each calibrated with the earlier ones quantized: q/k/v, o, the router (float unless a rule
forces it), then per expert its gate/up on the tokens routed to it, then its down on their hidden states (computed
with the expert's quantized gate/up). Routing is taken from the (possibly quantized) router, so each expert's
statistics come from the tokens the quantized model actually sends it; an expert no calibration token reaches is
quantized with RTN (`quantize_leaf`'s fallback), its warning naming the layer and the expert index.

Why a Python loop over experts here: the driver's stage callback (`quantize_stage(paths, inputs)`) quantizes whole
leaves from statistics it computes itself over the given inputs, so an expert is handed to it as its own [K, N]
slice with its routed tokens, and the slices are stacked back into one [E, K, N] QTensor. (`quantize_params` with
`jq.calibration.experts.capture_experts` statistics runs all experts at once by vmap instead.) AWQ / SmoothQuant
folds apply to the attention only; expert weights take methods without transforms.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import DTypeLike

from jq.algorithms.experts import stack_qtensors
from jq.calibration.sequential import BlockSpec, Fold
from jq.interop.linen import apply
from jq.models.llama import blocks as llama_blocks
from jq.models.moe.config import MoeConfig
from jq.models.moe.model import MoE, Block, Experts
from jq.numbers.qtensor import Layout, is_qtensor
from jq.tree.paths import get_path, set_path

__all__ = ["block_spec", "staged_block", "STAGES", "FOLDS"]

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


def _stacked_layout(inner: Layout, n: int) -> Layout:
    """The layout of n stacked experts [n, K, N] from one expert's layout [K, N]."""
    return Layout((n,) + tuple(inner.shape), tuple(a + 1 for a in inner.axes), inner.granularity, inner.group_size,
                  inner.padded, inner.flat)


def quantize_experts(block: dict, paths: tuple[str, ...], routed: Sequence[jax.Array],
                     quantize_stage: Callable[[tuple[str, ...], Sequence[jax.Array]], dict],
                     counts: Sequence[int] | None = None) -> dict:
    """Quantize the stacked expert leaves `paths` of `block` expert by expert: expert e's [K, N] slices go through
    `quantize_stage` with its routed inputs `routed[e]` ([n_e, K]; `counts[e]` = n_e), and the quantized slices
    are stacked into [E, K, N] QTensors (leaves no rule quantizes stay float). The stage's warnings (they name the
    layer) are re-issued with the expert index: an expert no token was routed to is quantized with RTN."""
    full = {p: get_path(block, p) for p in paths}
    n = int(jnp.shape(full[paths[0]])[0])
    done: dict[str, list] = {p: [] for p in paths}
    for e in range(n):
        for p in paths:
            set_path(block, p, jnp.asarray(full[p])[e])
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            block = quantize_stage(paths, [routed[e]])
        empty = counts is not None and counts[e] == 0
        for w in caught:
            why = " (no calibration token was routed to it)" if empty else ""
            warnings.warn(f"{w.message} [expert {e} of {n}{why}]", w.category, stacklevel=3)
        for p in paths:
            done[p].append(get_path(block, p))
    for p in paths:
        if not is_qtensor(done[p][0]):
            set_path(block, p, full[p])
            continue
        inner = done[p][0].layout
        if inner.axes != (0,):
            raise ValueError(f"{p}: the rule sets axes {tuple(a + 1 for a in inner.axes)} on a stacked expert "
                             "weight; leave axes unset (jq contracts [E, K, N] over axis 1, per expert)")
        q = jax.tree_util.tree_map(lambda *a: jnp.stack(a), *done[p])
        set_path(block, p, stack_qtensors(q, _stacked_layout(inner, n), p))
    return block


def _routed(xs: Sequence[jax.Array], masks: Sequence[np.ndarray]) -> tuple[list[jax.Array], list[int]]:
    """Per expert, the rows of the per-batch inputs xs ([B, T, K] shared, or [B, T, E, K] per expert) whose token
    is routed to it (masks [B, T, E] bool), concatenated over batches: [n_e, K] ([1, K] zeros when n_e = 0); and
    the counts n_e."""
    n = masks[0].shape[-1]
    out, counts = [], []
    for e in range(n):
        rows = [np.asarray(x)[m[..., e]] if x.ndim == 3 else np.asarray(x)[..., e, :][m[..., e]]
                for x, m in zip(xs, masks)]
        x = np.concatenate(rows, axis=0)
        counts.append(len(x))
        # no routed token: one zero row (it adds nothing to the sums; its zero Hessian is the "no data" case that
        # makes a calibrated method fall back to RTN and warn)
        out.append(jnp.asarray(x if len(x) else np.zeros((1, x.shape[-1]), x.dtype)))
    return out, counts


def staged_block(fns: dict, block: dict, hs: list[jax.Array], extras: list[tuple],
                 quantize_stage: Callable[[tuple[str, ...], Sequence[jax.Array]], dict],
                 ) -> tuple[dict, list[jax.Array]]:
    """One pass through a block (the `BlockSpec.staged` protocol): hs per-batch hidden states [B, T, D], extras
    per-batch (positions [B, T],) → (block with its weights quantized, outputs [B, T, D] per batch)."""
    block, h1, x2 = llama_blocks.staged_attention(fns, block, hs, extras, quantize_stage)
    block = quantize_stage(ROUTER, x2)
    masks = [np.asarray(fns["route"](block, x)) > 0 for x in x2]
    rows, counts = _routed(x2, masks)
    block = quantize_experts(block, EXPERT_IN, rows, quantize_stage, counts)
    hidden = [fns["hidden"](block, x) for x in x2]
    rows, counts = _routed(hidden, masks)
    del hidden
    block = quantize_experts(block, EXPERT_OUT, rows, quantize_stage, counts)
    del rows
    return block, [fns["moe_out"](block, h, x) for h, x in zip(h1, x2)]
