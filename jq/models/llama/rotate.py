"""QuaRot-style rotation of the Llama model (Ashkboos et al. 2024, "QuaRot"; Chee et al. 2023, "QuIP").

An orthogonal change of basis of the residual stream leaves the float model's function unchanged, but spreads
the few huge activation channels (and weight outliers) over all channels, so that activations and weights
quantize with a much smaller range. Steps, all exact in float arithmetic:

1. **Fold the RMSNorm scales** into the linears that read the norm's output: q/k/v rows ·= input_norm.scale,
   gate/up rows ·= post_attn_norm.scale, lm_head rows ·= final_norm.scale; the scales become 1. A tied output
   projection is untied first (the input embedding and the LM head get different rotations of their rows).
   With unit scales, RMSNorm(x Q) = RMSNorm(x) Q for any orthogonal Q (it only divides by ‖x‖/√d).
2. **Rotate the residual stream** by Q [dim, dim] (a randomized Hadamard matrix): the embedding rows E ← E Q;
   every linear reading the stream (q, k, v, gate, up, lm_head; kernels are (in, out)) W ← Qᵀ W; every linear
   writing it (o, down) W ← W Q.
3. **Head-wise rotation of v / o** by H [head_dim, head_dim]: v's output columns of every kv head W ← W H, o's
   input rows of every query head W ← Hᵀ W. Attention mixes tokens, not channels, inside a head, so the product
   is unchanged; the o_proj input becomes quantization friendly.

Online rotations — the Hadamard transform of the down_proj input, and of q / k after RoPE for a quantized KV cache
— cannot be folded into weights; they are carried by the quantized pytree (a rule with `rotate: hadamard`, see
`jq.numbers.scheme.Scheme.rotate`, stores Hᵀ W with the `Rotation` in the QTensor's policy, and `jq.ops` rotates the
input) and by the recipe's `kv_cache: {rotate: true}`.

`rotate(params, cfg, seed)` is a pure function (params, model config) → (params, model config); the config only
changes `tie_embeddings` to False.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jq.tree.recipe import RotationConfig
from jq.models.llama.config import LlamaConfig
from jq.numbers.qtensor import QTensor

__all__ = ["rotate", "rotate_heads"]


def _mm(a, b):
    return jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST)


def _copy(tree):
    return {k: _copy(v) if isinstance(v, dict) else v for k, v in tree.items()}


def rotate_heads(attn: dict, h: jax.Array, head_dim: int) -> None:
    """In place on one layer's attention params: v's output columns of every kv head W <- W H, o's input rows of
    every query head W <- Hᵀ W (kernels (in, out); h [head_dim, head_dim] orthogonal). Exact: attention mixes
    positions, not channels, within a head."""
    wv = jnp.asarray(attn["v_proj"]["kernel"], jnp.float32)
    attn["v_proj"]["kernel"] = _mm(wv.reshape(wv.shape[0], -1, head_dim), h).reshape(wv.shape)
    wo = jnp.asarray(attn["o_proj"]["kernel"], jnp.float32)
    attn["o_proj"]["kernel"] = jnp.einsum("hij,ik->hkj", wo.reshape(-1, head_dim, wo.shape[1]), h,
                                          precision=jax.lax.Precision.HIGHEST).reshape(wo.shape)


def rotate(params: dict, cfg: LlamaConfig, spec: RotationConfig = RotationConfig()) -> tuple[dict, LlamaConfig]:
    """Rotate a float Llama parameter tree (linen `params`, paths as in `jq.models.llama.model`).

    Args:
      params: float parameters; not modified.
      cfg: the model config (dim, heads, head_dim, tie_embeddings).
      spec: which rotations to apply and the seed of the residual rotation's random signs.

    Returns:
      (params, cfg): the rotated tree (norm scales 1, `lm_head/kernel` present) and cfg with
      tie_embeddings=False. Logits equal the original model's to float rounding.
    """
    for k, v in jax.tree_util.tree_leaves_with_path(params, is_leaf=lambda x: isinstance(x, QTensor)):
        if isinstance(v, QTensor) or not jnp.issubdtype(jnp.result_type(v), jnp.floating):
            raise ValueError(f"rotate: leaf {jax.tree_util.keystr(k)} is {type(v).__name__}, not a float array; "
                             "rotate the float model before quantizing it")
    p = _copy(params)
    f32 = jnp.float32
    layers = sorted((k for k in p if k.startswith("layers_")), key=lambda s: int(s.split("_")[1]))
    if len(layers) != cfg.n_layers:
        raise ValueError(f"rotate: params hold {len(layers)} layers_* blocks, the config says {cfg.n_layers}")
    if spec.residual:
        emb = jnp.asarray(p["embed"]["embedding"], f32)
        head = emb.T if cfg.tie_embeddings else jnp.asarray(p["lm_head"]["kernel"], f32)
        p["lm_head"] = {"kernel": head * jnp.asarray(p["final_norm"]["scale"], f32)[:, None]}
        p["final_norm"]["scale"] = jnp.ones_like(p["final_norm"]["scale"])
        cfg = dataclasses.replace(cfg, tie_embeddings=False)
        q = spec.residual_rotation.matrix(cfg.dim)
        p["embed"]["embedding"] = _mm(emb, q)
        p["lm_head"]["kernel"] = _mm(q.T, p["lm_head"]["kernel"])
        for name in layers:
            blk = p[name]
            for norm, mod, projs in (("input_norm", "attn", ("q_proj", "k_proj", "v_proj")),
                                     ("post_attn_norm", "mlp", ("gate_proj", "up_proj"))):
                s = jnp.asarray(blk[norm]["scale"], f32)
                for pr in projs:
                    blk[mod][pr]["kernel"] = _mm(q.T, jnp.asarray(blk[mod][pr]["kernel"], f32) * s[:, None])
                blk[norm]["scale"] = jnp.ones_like(blk[norm]["scale"])
            for mod, pr in (("attn", "o_proj"), ("mlp", "down_proj")):
                blk[mod][pr]["kernel"] = _mm(jnp.asarray(blk[mod][pr]["kernel"], f32), q)
    if spec.heads:
        for name in layers:
            rotate_heads(p[name]["attn"], spec.head_rotation.matrix(cfg.head_dim), cfg.head_dim)
    return p, cfg
