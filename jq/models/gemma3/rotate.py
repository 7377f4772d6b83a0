"""QuaRot-style rotation of Gemma 3 (Ashkboos et al. 2024), adapted to its sandwich norms.

In Llama every write to the residual stream is a linear (o, down), so the stream's rotation Q folds into weights.
Gemma normalises each write first (post_attn_norm, post_mlp_norm): RMSNorm(z)·s cannot be followed by a weight
that carries Q. So the stream is rotated *online* where it is written — after the embedding (scaled by √d), after
each post-norm — and un-rotated before the final norm (a fast Hadamard transform per token, `cfg.residual_rotation`);
the readers fold instead: q/k/v rows ·= input_norm scale and gate/up rows ·= pre_mlp_norm scale, those scales
become 1 (RMSNorm(x Q) = RMSNorm(x) Q with unit scale), then W ← Qᵀ W. The LM head stays tied (the embedding is
not rotated; the final norm sees the unrotated stream). What quantization gains: the inputs of q/k/v and gate/up
are rotated, spreading the massive channels over all 640; o/down keep their basis. Per-head rotation of v / o
(`heads`) is exact as in Llama. Logits equal the original model's to float rounding.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jq.models.gemma3.config import Gemma3Config
from jq.models.llama.rotate import rotate_heads
from jq.numbers.qtensor import QTensor
from jq.tree.recipe import RotationConfig

__all__ = ["rotate"]


def _mm(a, b):
    return jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST)


def rotate(params: dict, cfg: Gemma3Config, spec: RotationConfig = RotationConfig()) -> tuple[dict, Gemma3Config]:
    """Rotate a float Gemma 3 parameter tree -> (params, cfg with `residual_rotation` set when `spec.residual`).
    `params` is not modified."""
    for k, v in jax.tree_util.tree_leaves_with_path(params, is_leaf=lambda x: isinstance(x, QTensor)):
        if isinstance(v, QTensor) or not jnp.issubdtype(jnp.result_type(v), jnp.floating):
            raise ValueError(f"rotate: leaf {jax.tree_util.keystr(k)} is {type(v).__name__}, not a float array; "
                             "rotate the float model before quantizing it")
    if cfg.residual_rotation is not None:
        raise ValueError(f"rotate: the model is already rotated ({cfg.residual_rotation})")
    p = jax.tree_util.tree_map(lambda x: x, params)
    f32 = jnp.float32
    layers = [f"layers_{i}" for i in range(cfg.n_layers)]
    if spec.residual:
        rot = spec.residual_rotation
        q = rot.matrix(cfg.dim)
        for name in layers:
            blk = p[name]
            for norm, mod, projs in (("input_norm", "attn", ("q_proj", "k_proj", "v_proj")),
                                     ("pre_mlp_norm", "mlp", ("gate_proj", "up_proj"))):
                s = jnp.asarray(blk[norm]["scale"], f32)
                for pr in projs:
                    blk[mod][pr]["kernel"] = _mm(q.T, jnp.asarray(blk[mod][pr]["kernel"], f32) * s[:, None])
                blk[norm]["scale"] = jnp.ones_like(blk[norm]["scale"])
        cfg = dataclasses.replace(cfg, residual_rotation=str(rot))
    if spec.heads:
        for name in layers:
            rotate_heads(p[name]["attn"], spec.head_rotation.matrix(cfg.head_dim), cfg.head_dim)
    return p, cfg
