"""Gemma 3 270M's real weights in *third-party* model code, quantized as a new user would: `jq.quantize_model` with no
block spec, no family, no hand-written axes.

The model below is written in the style of the published Flax Gemma (google-deepmind/gemma): its own `Einsum`
module holding `w`, `q_einsum` (heads, d_model, head_dim), `kv_einsum` (2, kv_heads, d_model, head_dim),
`attn_vec_einsum` (heads, head_dim, d_model), MLP `gating_einsum` (2, hidden, d_model) and `linear`
(hidden, d_model), norms as `1 + scale`, the tied `embedder/input_embedding` gathered and attended. Nothing in jq
knows these names. The weights come from the GGUF through jq's loader and are re-laid out into that tree.

    python benchmarks/third_party_gemma.py [--recipes rtn_w4_g128 gptq_w4_g128_actorder] [--windows 16]

For each recipe the rule patterns are rewritten from Llama's `.*kernel` to this model's weight names (what a user
does after jq's warning names them); the JSON (benchmarks/results/third_party_gemma.json) records float
perplexity (against jq's own Gemma 3 family, same protocol: BOS + 511 tokens per window), each recipe's
perplexity, bits, the calibration mode and what the routing report counts.
"""

from __future__ import annotations

import argparse
import resource
import dataclasses
import json
import time
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import linen as nn

import jq
from jq.apps import data as jq_data
from jq.apps.perplexity import perplexity
from jq.apps.pipeline import quantized_forward
from jq.models.load import load_model
from jq.numbers.qtensor import is_qtensor
from jq.tree.paths import leaf_paths

ROOT = Path(__file__).resolve().parents[1]
PATTERN = r".*(_einsum/w|gating_einsum|mlp/linear)"  # this model's matmul weights (not the embedding)


class Einsum(nn.Module):
    shape: tuple[int, ...]

    @nn.compact
    def __call__(self, eqn: str, x: jax.Array) -> jax.Array:
        return jnp.einsum(eqn, x, self.param("w", nn.initializers.zeros_init(), self.shape))


class RMSNorm(nn.Module):
    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param("scale", nn.initializers.zeros_init(), (x.shape[-1],))
        x32 = x.astype(jnp.float32)
        return x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + 1e-6) * (1 + scale)


def apply_rope(x: jax.Array, positions: jax.Array, base: float) -> jax.Array:
    """x [B, T, N, H]: the first and second halves of each head rotated together."""
    h = x.shape[-1]
    freq = base ** (-2 * jnp.arange(h // 2, dtype=jnp.float32) / h)
    ang = positions[..., None, None].astype(jnp.float32) * freq
    a, b = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([a * jnp.cos(ang) - b * jnp.sin(ang), b * jnp.cos(ang) + a * jnp.sin(ang)], -1)


class Attention(nn.Module):
    heads: int
    kv_heads: int
    d: int
    hd: int
    window: int | None
    base: float
    query_scale: float

    def setup(self):
        self.q_einsum = Einsum((self.heads, self.d, self.hd))
        self.kv_einsum = Einsum((2, self.kv_heads, self.d, self.hd))
        self.attn_vec_einsum = Einsum((self.heads, self.hd, self.d))
        self._query_norm = RMSNorm()
        self._key_norm = RMSNorm()

    def __call__(self, x: jax.Array, positions: jax.Array) -> jax.Array:
        q = self.q_einsum("BTD,NDH->BTNH", x)
        k, v = self.kv_einsum("BSD,CKDH->CBSKH", x)
        q = apply_rope(self._query_norm(q), positions, self.base) * self.query_scale ** -0.5
        k = apply_rope(self._key_norm(k), positions, self.base)
        q = q.reshape(q.shape[:2] + (self.kv_heads, self.heads // self.kv_heads, self.hd))
        logits = jnp.einsum("BTKGH,BSKH->BTKGS", q, k)
        t = x.shape[1]
        i, j = jnp.arange(t)[:, None], jnp.arange(t)[None, :]
        mask = (j <= i) if self.window is None else (j <= i) & (i - j < self.window)
        logits = jnp.where(mask[None, :, None, None, :], logits, -1e30)
        enc = jnp.einsum("BTKGS,BSKH->BTKGH", jax.nn.softmax(logits, axis=-1), v)
        return self.attn_vec_einsum("BTNH,NHD->BTD", enc.reshape(enc.shape[:2] + (self.heads, self.hd)))


class FeedForward(nn.Module):
    d: int
    hidden: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        gate = jnp.einsum("...F,NHF->...NH", x, self.param("gating_einsum", nn.initializers.zeros_init(),
                                                            (2, self.hidden, self.d)))
        act = nn.gelu(gate[..., 0, :], approximate=True) * gate[..., 1, :]
        return jnp.einsum("...H,HF->...F", act, self.param("linear", nn.initializers.zeros_init(),
                                                           (self.hidden, self.d)))


class Block(nn.Module):
    attn: Attention
    d: int
    hidden: int

    def setup(self):
        self.pre_attention_norm = RMSNorm()
        self.post_attention_norm = RMSNorm()
        self.pre_ffw_norm = RMSNorm()
        self.post_ffw_norm = RMSNorm()
        self.mlp = FeedForward(self.d, self.hidden)

    def __call__(self, x: jax.Array, positions: jax.Array) -> jax.Array:
        x = x + self.post_attention_norm(self.attn(self.pre_attention_norm(x), positions))
        return x + self.post_ffw_norm(self.mlp(self.pre_ffw_norm(x)))


class Embedder(nn.Module):
    vocab: int
    d: int

    def setup(self):
        self.input_embedding = self.param("input_embedding", nn.initializers.zeros_init(), (self.vocab, self.d))

    def encode(self, tokens: jax.Array) -> jax.Array:
        return self.input_embedding[(tokens,)] * jnp.sqrt(jnp.float32(self.d))

    def decode(self, x: jax.Array) -> jax.Array:
        return jnp.dot(x, self.input_embedding.T)


class Transformer(nn.Module):
    """Token ids [B, T] -> logits [B, T, V]. `c`: jq's Gemma3Config, read for the sizes only."""

    c: object

    def setup(self):
        c = self.c
        self.embedder = Embedder(c.vocab_size, c.dim)
        self.layers = [Block(Attention(c.n_heads, c.n_kv_heads, c.dim, c.head_dim,
                                       None if c.is_global(i) else c.sliding_window,
                                       c.rope_global if c.is_global(i) else c.rope_local, c.query_scale),
                             c.dim, c.hidden_dim, name=f"layer_{i}") for i in range(c.n_layers)]
        self.final_norm = RMSNorm()

    def __call__(self, tokens: jax.Array) -> jax.Array:
        x = self.embedder.encode(tokens)
        positions = jnp.arange(tokens.shape[1])[None]
        for layer in self.layers:
            x = layer(x, positions)
        return self.embedder.decode(self.final_norm(x))


def third_party_params(p: dict, c) -> dict:
    """jq's Gemma 3 family params (Dense kernels [in, out], norms 1 + w) -> the third-party tree."""
    n, k, d, h = c.n_heads, c.n_kv_heads, c.dim, c.head_dim
    out = {"embedder": {"input_embedding": p["embed"]["embedding"]},
           "final_norm": {"scale": p["final_norm"]["scale"] - 1}}
    for i in range(c.n_layers):
        b, a, m = p[f"layers_{i}"], p[f"layers_{i}"]["attn"], p[f"layers_{i}"]["mlp"]
        kv = [a[x]["kernel"].reshape(d, k, h).transpose(1, 0, 2) for x in ("k_proj", "v_proj")]
        out[f"layer_{i}"] = {
            "pre_attention_norm": {"scale": b["input_norm"]["scale"] - 1},
            "post_attention_norm": {"scale": b["post_attn_norm"]["scale"] - 1},
            "pre_ffw_norm": {"scale": b["pre_mlp_norm"]["scale"] - 1},
            "post_ffw_norm": {"scale": b["post_mlp_norm"]["scale"] - 1},
            "attn": {"q_einsum": {"w": a["q_proj"]["kernel"].reshape(d, n, h).transpose(1, 0, 2)},
                     "kv_einsum": {"w": jnp.stack(kv)},
                     "attn_vec_einsum": {"w": a["o_proj"]["kernel"].reshape(n, h, d)},
                     "_query_norm": {"scale": a["q_norm"]["scale"] - 1},
                     "_key_norm": {"scale": a["k_norm"]["scale"] - 1}},
            "mlp": {"gating_einsum": jnp.stack([m["gate_proj"]["kernel"].T, m["up_proj"]["kernel"].T]),
                    "linear": m["down_proj"]["kernel"]},
        }
    return out


def recipe_for_this_model(name: str) -> jq.QuantConfig:
    """The shipped recipe with its rule patterns pointed at this model's weights."""
    cfg = jq.load_recipe(ROOT / "configs" / f"{name}.yaml")
    rules = tuple(dataclasses.replace(r, pattern=PATTERN) for r in cfg.rules)
    return dataclasses.replace(cfg, rules=rules)


def _peak_rss_gb() -> float:
    """This process's peak resident memory so far (Linux ru_maxrss, KiB), in GiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipes", nargs="*", default=["rtn_w4_g128", "gptq_w4_g128_actorder"])
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--calib-samples", type=int, default=128)
    ap.add_argument("--one-shot", action="store_true", help="calibrate on the float model's activations "
                    "(quantize_model(..., sequential=False)) instead of weight by weight through the traced jaxpr")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "third_party_gemma.json"))
    args = ap.parse_args()
    m = load_model("gemma3-270m")
    c = m.cfg
    austen = jq_data.data_dir()
    ids, bos = jq_data.text_ids(m.tokenizer, jq_data.read_text(austen / "persuasion.txt"))
    model = Transformer(c)
    params = jax.tree.map(jnp.asarray, third_party_params(m.params, c))
    fwd = jax.jit(lambda p, x: jq.apply(model, {"params": p}, x))
    res = {"model": "gemma3-270m in third-party Flax code (benchmarks/third_party_gemma.py)", "pattern": PATTERN,
           "protocol": f"persuasion.txt, {args.windows} windows of BOS + 511", "jax": jax.__version__,
           "float": perplexity(fwd, params, ids, 512, args.windows, 4, bos)["perplexity"], "recipes": {}}
    family = jax.jit(quantized_forward(c))
    res["float_jq_family"] = perplexity(family, m.params, ids, 512, args.windows, 4, bos)["perplexity"]
    print(json.dumps({k: v for k, v in res.items() if k != "recipes"}), flush=True)
    calib = jq_data.calibration_tokens(m.tokenizer, jq_data.default_calib_files(austen / "persuasion.txt"),
                                       args.calib_samples, 512)
    for name in args.recipes:
        cfg = recipe_for_this_model(name)
        t0, rss0 = time.perf_counter(), _peak_rss_gb()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            q, log = jq.quantize_model(model, params, cfg, calib, batch_size=4, sequential=not args.one_shot)
        secs, rss1 = time.perf_counter() - t0, _peak_rss_gb()
        qt = [x for x in jax.tree.leaves(q, is_leaf=is_qtensor) if is_qtensor(x)]
        bits = sum(x.bits_per_weight * x.size for x in qt) / sum(x.size for x in qt)
        report = jq.routing_report(model, {"params": q}, jnp.asarray(calib[:1]))
        row = {"perplexity": perplexity(fwd, q, ids, 512, args.windows, 4, bos)["perplexity"],
               "linear_bits_per_weight": bits, "quantized_leaves": len(qt), "mode": log["mode"],
               "routing": report.counts, "quantize_seconds": secs,
               "peak_rss_gb": {"before_quantize": rss0, "after_quantize": rss1},
               "axes": {p: str(x.layout.axes) for p, x in leaf_paths(q["layer_0"]) if is_qtensor(x)},
               "warnings": sorted({str(w.message)[:200] for w in caught})}
        res["recipes"][name] = row
        print(name, json.dumps(row), flush=True)
    Path(args.out).write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
