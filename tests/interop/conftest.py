"""A "third-party style" Gemma-like linen model (its own `Einsum` module holding `w`, MLP weights `gating_einsum` /
`linear`, a tied `embedder/input_embedding` used by gather and by `attend`), a scanned-layers variant and an NNX
model: what jq must handle without knowing their names (the Gemma 3 user report)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from flax import linen as nn

D, HEADS, HD, HIDDEN, VOCAB, LAYERS = 32, 4, 16, 64, 48, 2


class Einsum(nn.Module):
    """A weight `w` of `shape` applied with an einsum equation given at call time (as Gemma's own module)."""

    shape: tuple[int, ...]

    @nn.compact
    def __call__(self, eqn: str, x: jax.Array) -> jax.Array:
        w = self.param("w", nn.initializers.normal(0.2), self.shape)
        return jnp.einsum(eqn, x, w)


class Embedder(nn.Module):
    vocab: int
    d: int

    def setup(self):
        self.input_embedding = self.param("input_embedding", nn.initializers.normal(1.0), (self.vocab, self.d))

    def encode(self, x):
        return self.input_embedding[(x,)] * jnp.sqrt(self.d).astype(jnp.float32)

    def decode(self, x):
        return jnp.dot(x, self.input_embedding.T)


class RMSNorm(nn.Module):
    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.initializers.zeros_init(), (x.shape[-1],))
        x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + 1e-6)
        return x * (1 + scale)


class Attention(nn.Module):
    def setup(self):
        self.q_einsum = Einsum((HEADS, D, HD))
        self.kv_einsum = Einsum((2, HEADS, D, HD))
        self.attn_vec_einsum = Einsum((HEADS, HD, D))

    def __call__(self, x):
        q = self.q_einsum("BTD,NDH->BTNH", x)
        k, v = self.kv_einsum("BSD,CKDH->CBSKH", x)
        logits = jnp.einsum("BTNH,BSNH->BTNS", q, k) / jnp.sqrt(HD)
        t = x.shape[1]
        logits = jnp.where(jnp.tril(jnp.ones((t, t), bool))[None, :, None, :], logits, -1e9)
        enc = jnp.einsum("BTNS,BSNH->BTNH", jax.nn.softmax(logits, axis=-1), v)
        return self.attn_vec_einsum("BTNH,NHD->BTD", enc)


class FeedForward(nn.Module):
    @nn.compact
    def __call__(self, x):
        w_gating = self.param("gating_einsum", nn.initializers.normal(0.2), (2, HIDDEN, D))
        gate = jnp.einsum("...F,NHF->...NH", x, w_gating)
        act = nn.gelu(gate[..., 0, :]) * gate[..., 1, :]
        w_linear = self.param("linear", nn.initializers.normal(0.2), (HIDDEN, D))
        return jnp.einsum("...H,HF->...F", act, w_linear)


class Block(nn.Module):
    def setup(self):
        self.pre_attention_norm = RMSNorm()
        self.attn = Attention()
        self.pre_ffw_norm = RMSNorm()
        self.mlp = FeedForward()

    def __call__(self, x):
        x = x + self.attn(self.pre_attention_norm(x))
        return x + self.mlp(self.pre_ffw_norm(x))


class Gemma(nn.Module):
    """Token ids [B, T] → logits [B, T, VOCAB]; layers `layer_0`, `layer_1`, a tied embedding."""

    def setup(self):
        self.embedder = Embedder(VOCAB, D)
        self.layers = [Block(name=f"layer_{i}") for i in range(LAYERS)]
        self.final_norm = RMSNorm()

    def __call__(self, tokens):
        x = self.embedder.encode(tokens)
        for blk in self.layers:
            x = blk(x)
        return self.embedder.decode(self.final_norm(x))


class ScanBlock(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        return Block()(x), None


class ScannedGemma(nn.Module):
    """The same model with its layers under `nn.scan` (weights stacked on a leading layer axis)."""

    @nn.compact
    def __call__(self, tokens):
        emb = Embedder(VOCAB, D, name="embedder")
        x = emb.encode(tokens)
        x, _ = nn.scan(ScanBlock, variable_axes={"params": 0}, split_rngs={"params": True}, length=LAYERS)(
            name="layers")(x, None)
        return emb.decode(RMSNorm(name="final_norm")(x))


def _tokens(seed: int, b: int = 2, t: int = 8) -> jax.Array:
    return jax.random.randint(jax.random.key(seed), (b, t), 0, VOCAB)


@pytest.fixture(scope="session")
def gemma():
    """(module, variables, tokens) of the Gemma-like model."""
    m, x = Gemma(), _tokens(0)
    return m, m.init(jax.random.key(1), x), x


@pytest.fixture(scope="session")
def scanned_gemma():
    """(module, variables, tokens) of the scanned-layers model."""
    m, x = ScannedGemma(), _tokens(0)
    return m, m.init(jax.random.key(1), x), x


@pytest.fixture
def tokens():
    """Draw token batches [B, T]."""
    return _tokens
