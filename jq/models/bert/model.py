"""A Flax linen BERT encoder with sentence-transformers pooling (mean over real tokens, L2-normalised).

Post-LN layers as in the original BERT: x = LN(x + Attn(x)); x = LN(x + MLP(x)), with exact (erf) GELU. Every
projection is a plain `nn.Dense` with bias and an (in, out) kernel, so `jq.quantize_params` with a `.*kernel` rule
quantizes them and `jq.interop.linen.apply` runs them unmodified. Parameter paths (inside the `params` collection):

    embeddings/word/embedding                         (vocab, dim)
    embeddings/position/embedding                     (max_positions, dim)
    embeddings/token_type/embedding                   (type_vocab, dim)
    embeddings/norm/{scale,bias}                      (dim,)
    layers_{i}/attn/{query,key,value,out}/kernel      (dim, dim)
    layers_{i}/attn/{query,key,value,out}/bias        (dim,)
    layers_{i}/attn_norm/{scale,bias}                 (dim,)
    layers_{i}/mlp/up/kernel, bias                    (dim, hidden), (hidden,)
    layers_{i}/mlp/down/kernel, bias                  (hidden, dim), (dim,)
    layers_{i}/mlp_norm/{scale,bias}                  (dim,)

Embeddings and norms fall under `jq.tree.recipe.DEFAULT_IGNORE`, so recipes quantize exactly the 6 kernels per layer.
The Hugging Face pooler (`pooler.dense`) is not part of the model: sentence-transformers pools the last hidden
states itself.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jq.interop.linen import apply

__all__ = ["BertConfig", "Bert", "encode", "make_encoder", "mean_pool", "expected_shapes", "embed_texts"]


@dataclasses.dataclass(frozen=True)
class BertConfig:
    """Shape and numerics of a BERT encoder (the fields of a Hugging Face `config.json` of `model_type: bert`)."""

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            if f.name != "layer_norm_eps" and int(getattr(self, f.name)) <= 0:
                raise ValueError(f"BertConfig.{f.name} must be positive, got {getattr(self, f.name)}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size ({self.hidden_size}) must be a multiple of num_attention_heads "
                             f"({self.num_attention_heads})")

    @property
    def head_dim(self) -> int:
        """hidden_size / num_attention_heads."""
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def tiny(cls, vocab_size: int = 50) -> BertConfig:
        """A test-sized config: 2 layers, hidden 32 over 4 heads, MLP 64, 16 positions."""
        return cls(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                   intermediate_size=64, max_position_embeddings=16, type_vocab_size=2, layer_norm_eps=1e-12)

    @classmethod
    def from_hf_config(cls, hf: Mapping[str, Any], source: str = "config.json") -> BertConfig:
        """From a Hugging Face `config.json` dict; `source` names the file in errors."""
        if hf.get("model_type", "bert") != "bert":
            raise ValueError(f"{source}: model_type {hf['model_type']!r} is not supported (only 'bert')")
        if hf.get("hidden_act", "gelu") != "gelu":
            raise ValueError(f"{source}: hidden_act {hf['hidden_act']!r} is not supported (only exact 'gelu')")
        if hf.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError(f"{source}: position_embedding_type {hf['position_embedding_type']!r} is not "
                             "supported (only 'absolute')")
        need = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
        missing = [k for k in need if k not in hf]
        if missing:
            raise ValueError(f"{source}: missing field(s) {missing} needed for a BERT encoder")
        return cls(**{k: int(hf[k]) for k in need},
                   max_position_embeddings=int(hf.get("max_position_embeddings", 512)),
                   type_vocab_size=int(hf.get("type_vocab_size", 2)),
                   layer_norm_eps=float(hf.get("layer_norm_eps", 1e-12)))


def expected_shapes(cfg: BertConfig) -> dict[str, tuple[int, ...]]:
    """Every parameter path of `Bert(cfg)` with its shape."""
    d, h = cfg.hidden_size, cfg.intermediate_size
    shapes = {"embeddings/word/embedding": (cfg.vocab_size, d),
              "embeddings/position/embedding": (cfg.max_position_embeddings, d),
              "embeddings/token_type/embedding": (cfg.type_vocab_size, d),
              "embeddings/norm/scale": (d,), "embeddings/norm/bias": (d,)}
    for i in range(cfg.num_hidden_layers):
        p = f"layers_{i}/"
        for name in ("query", "key", "value", "out"):
            shapes |= {f"{p}attn/{name}/kernel": (d, d), f"{p}attn/{name}/bias": (d,)}
        shapes |= {f"{p}mlp/up/kernel": (d, h), f"{p}mlp/up/bias": (h,), f"{p}mlp/down/kernel": (h, d),
                   f"{p}mlp/down/bias": (d,)}
        for norm in ("attn_norm", "mlp_norm"):
            shapes |= {f"{p}{norm}/scale": (d,), f"{p}{norm}/bias": (d,)}
    return shapes


class Attention(nn.Module):
    """Bidirectional multi-head self-attention over the real (unpadded) keys."""

    cfg: BertConfig

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        """x: [B, T, dim]; mask: [B, T] (1 real token, 0 padding) -> [B, T, dim]."""
        c = self.cfg
        b, t, d = x.shape
        q, k, v = (nn.Dense(d, name=n)(x).reshape(b, t, c.num_attention_heads, c.head_dim)
                   for n in ("query", "key", "value"))
        s = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(c.head_dim)                 # [B, H, T, T]
        s = jnp.where(mask[:, None, None, :] > 0, s, jnp.finfo(s.dtype).min)
        o = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s, axis=-1), v).reshape(b, t, d)
        return nn.Dense(d, name="out")(o)


class MLP(nn.Module):
    """dim -> intermediate_size (exact erf GELU) -> dim."""

    cfg: BertConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [B, T, dim] -> [B, T, dim]."""
        h = jax.nn.gelu(nn.Dense(self.cfg.intermediate_size, name="up")(x), approximate=False)
        return nn.Dense(self.cfg.hidden_size, name="down")(h)


class Embeddings(nn.Module):
    """word + absolute position + token type embeddings, then LayerNorm."""

    cfg: BertConfig

    @nn.compact
    def __call__(self, ids: jax.Array, types: jax.Array) -> jax.Array:
        """ids, types: [B, T] int -> [B, T, dim]."""
        c = self.cfg
        x = nn.Embed(c.vocab_size, c.hidden_size, name="word")(ids)
        x = x + nn.Embed(c.max_position_embeddings, c.hidden_size, name="position")(jnp.arange(ids.shape[1]))[None]
        x = x + nn.Embed(c.type_vocab_size, c.hidden_size, name="token_type")(types)
        return nn.LayerNorm(c.layer_norm_eps, name="norm")(x)


class Layer(nn.Module):
    """One post-LN encoder layer: x = LN(x + Attn(x)); x = LN(x + MLP(x))."""

    cfg: BertConfig

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        """x: [B, T, dim]; mask: [B, T] (1 for real tokens) -> [B, T, dim]."""
        eps = self.cfg.layer_norm_eps
        x = nn.LayerNorm(eps, name="attn_norm")(x + Attention(self.cfg, name="attn")(x, mask))
        return nn.LayerNorm(eps, name="mlp_norm")(x + MLP(self.cfg, name="mlp")(x))


class Bert(nn.Module):
    """The encoder: `Bert(cfg).apply({"params": p}, ids, mask)` -> last hidden states [B, T, dim] (fp32)."""

    cfg: BertConfig

    @nn.compact
    def __call__(self, ids: jax.Array, mask: jax.Array, token_type_ids: jax.Array | None = None) -> jax.Array:
        """ids, mask: [B, T] int (mask 1 for real tokens); token_type_ids: [B, T] int, zeros when None."""
        c = self.cfg
        if ids.shape[1] > c.max_position_embeddings:
            raise ValueError(f"sequence length {ids.shape[1]} exceeds max_position_embeddings="
                             f"{c.max_position_embeddings}; truncate the input (tokenizer max_length)")
        types = jnp.zeros_like(ids) if token_type_ids is None else token_type_ids
        x = Embeddings(c, name="embeddings")(ids, types)
        for i in range(c.num_hidden_layers):
            x = Layer(c, name=f"layers_{i}")(x, mask)
        return x


def mean_pool(hidden: jax.Array, mask: jax.Array, normalize: bool = True) -> jax.Array:
    """sentence-transformers pooling. hidden: [B, T, D]; mask: [B, T] -> [B, D]: the mean over real tokens
    (count clamped at 1e-9 as in sentence-transformers), L2-normalised (norm clamped at 1e-12) when `normalize`."""
    m = mask.astype(hidden.dtype)[..., None]
    pooled = jnp.sum(hidden * m, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1e-9)
    if not normalize:
        return pooled
    return pooled / jnp.maximum(jnp.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)


def encode(model: Bert, params: Any, ids: jax.Array, mask: jax.Array, normalize: bool = True) -> jax.Array:
    """Sentence embeddings [B, D] of ids, mask [B, T]; `params` may hold QTensors (run through `jq.interop.apply`)."""
    ids, mask = jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32)
    return mean_pool(apply(model, {"params": params}, ids, mask), mask, normalize)


def make_encoder(cfg: BertConfig, normalize: bool = True) -> Callable[[Any, jax.Array, jax.Array], jax.Array]:
    """A jitted `encode(params, ids[B, T], mask[B, T]) -> [B, D]` for float or quantized params."""
    model = Bert(cfg)
    return jax.jit(lambda params, ids, mask: encode(model, params, ids, mask, normalize))


def embed_texts(encoder: Callable[[Any, jax.Array, jax.Array], jax.Array], params: Any,
                tokenize: Callable[[Sequence[str]], tuple[np.ndarray, np.ndarray]], texts: Sequence[str],
                batch_size: int = 64) -> np.ndarray:
    """Embeddings [N, D] of `texts` in their order, `batch_size` at a time.

    `tokenize(texts) -> (ids, mask)` int32 [n, T] (e.g. a `jq.models.bert.weights.BertTokenizer`, which pads to
    the longest text of the batch rounded up to a multiple, so few distinct shapes compile). Texts are batched in
    order of token count, so a batch pads little.
    """
    texts = list(texts)
    if batch_size < 1 or not texts:
        raise ValueError(f"embed_texts needs batch_size >= 1 and at least one text, got batch_size={batch_size} "
                         f"and {len(texts)} texts")
    _, mask = tokenize(texts)
    order = np.argsort(mask.sum(axis=1), kind="stable")
    out: list[np.ndarray | None] = [None] * len(texts)
    for start in range(0, len(texts), batch_size):
        idx = order[start:start + batch_size]
        ids, m = tokenize([texts[i] for i in idx])
        emb = np.asarray(encoder(params, ids, m))
        for row, i in enumerate(idx):
            out[i] = emb[row]
    return np.stack(out)
