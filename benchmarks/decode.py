"""Decode speed: tokens/s of bf16 vs W8A16 vs W4A16 weights (RTN recipes) with a KV cache, batch 1.

Models: SmolLM2-135M (`jq.apps.pipeline.load("smollm2-135m")`) and a randomly initialised Llama-7B-shaped
decoder cut to 2 layers (dim 4096, hidden 11008, 32 heads, vocab 32000, untied head). Weights: bf16 (float),
W8A16 = configs/rtn_w8.yaml (int8 per channel), W4A16 = configs/rtn_w4_g128.yaml (int4 asym g128); activations
and the KV cache in bf16 (or `--kv int8|int4`). Quantized kernels go through `jq.ops` (a registered kernel, or the
XLA fallback that dequantizes the weight inside the jitted step). Prefill and decode are timed separately after
one warm-up run; compile time is excluded and reported. Writes OUT/decode.json and OUT/decode.png.

    python benchmarks/decode.py [--out out] [--quick] [--models smollm2 llama7b-2l] [--kv int8]

Defaults: prompt 32, 64 new tokens; --quick: prompt 16, 16 new tokens (CPU).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import jq
from jq.numbers.kvcache import KVCacheConfig
from jq.models.llama.config import LlamaConfig
from jq.apps.generate import generate_timed
from jq.models.llama.model import init_params
from jq.apps.pipeline import size_summary
from timing import environment  # benchmarks/ is on sys.path when a script here runs

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
WEIGHTS = {"bf16": None, "W8A16": "rtn_w8.yaml", "W4A16": "rtn_w4_g128.yaml"}
LLAMA7B_2L = LlamaConfig(vocab_size=32000, dim=4096, n_layers=2, n_heads=32, n_kv_heads=32, hidden_dim=11008,
                         head_dim=128, rope_theta=10000.0, norm_eps=1e-5, tie_embeddings=False, max_seq_len=4096)
TINY = LlamaConfig.tiny()  # for a smoke run of this script


def random_params(cfg: LlamaConfig, seed: int = 0, dtype=jnp.bfloat16) -> dict:
    """N(0, 0.02) weights and unit norm scales in `dtype`, built leaf by leaf (no fp32 copy of the model)."""
    shapes = jax.eval_shape(lambda k: init_params(cfg, k), jax.random.key(0))
    leaves, treedef = jax.tree_util.tree_flatten_with_path(shapes)
    out = []
    for i, (path, s) in enumerate(leaves):
        if "scale" in jax.tree_util.keystr(path):
            out.append(jnp.ones(s.shape, dtype))
        else:
            out.append(jax.jit(lambda k, s=s: (0.02 * jax.random.normal(k, s.shape, jnp.float32)).astype(dtype))(
                jax.random.key(seed * 1000 + i)))
    return jax.tree_util.tree_unflatten(treedef, out)


def load_model(name: str) -> tuple[LlamaConfig, dict]:
    if name == "smollm2":
        from jq.apps import pipeline

        m = pipeline.load("smollm2-135m")
        return m.cfg, jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.bfloat16), m.params)
    if name == "llama7b-2l":
        return LLAMA7B_2L, random_params(LLAMA7B_2L)
    if name == "tiny":
        return TINY, random_params(TINY)
    raise ValueError(f"unknown model {name!r}; choose smollm2, llama7b-2l or tiny")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="out")
    ap.add_argument("--quick", action="store_true", help="prompt 16, 16 new tokens (CPU)")
    ap.add_argument("--models", nargs="+", default=["smollm2", "llama7b-2l"])
    ap.add_argument("--weights", nargs="+", default=list(WEIGHTS), choices=list(WEIGHTS))
    ap.add_argument("--kv", choices=["int8", "int4"], help="quantize the KV cache too (default bf16 cache)")
    ap.add_argument("--prompt-len", type=int)
    ap.add_argument("--new", type=int)
    args = ap.parse_args()
    prompt_len = args.prompt_len or (16 if args.quick else 32)
    new = args.new or (16 if args.quick else 64)
    kv = KVCacheConfig(args.kv) if args.kv else None
    backend = jax.default_backend()
    results = []
    for model in args.models:
        t0 = time.perf_counter()
        cfg, params = load_model(model)
        print(f"{model}: loaded in {time.perf_counter() - t0:.1f} s", flush=True)
        prompt = np.random.default_rng(0).integers(0, cfg.vocab_size, size=(1, prompt_len), dtype=np.int32)
        for wname in args.weights:
            recipe = jq.load_recipe(CONFIGS / WEIGHTS[wname]) if WEIGHTS[wname] else None
            t0 = time.perf_counter()
            qparams = jax.block_until_ready(jq.quantize_params(params, recipe)) if recipe else params
            quant_s = time.perf_counter() - t0
            r = generate_timed(cfg, qparams, prompt, new, kv, dtype=jnp.bfloat16, warmup=1)
            size = size_summary(qparams)
            row = {"model": model, "weights": wname, "recipe": WEIGHTS[wname],
                   "kv_cache": kv.describe() if kv else "bf16",
                   **r.summary(), "quantize_seconds": quant_s, "weight_bytes": size["model_bytes"],
                   "linear_bits_per_weight": size["linear_bits_per_weight"]}
            results.append(row)
            print(f"{model:>11} {wname:<6} prefill {row['prefill_tokens_per_s']:9.1f} tok/s  decode "
                  f"{row['decode_tokens_per_s']:8.2f} tok/s  compile {row['compile_seconds']:6.1f} s  weights "
                  f"{row['weight_bytes'] / 2**20:8.1f} MiB  KV {row['kv_cache_bytes_per_token']} B/token", flush=True)
            del qparams
        del params
    meta = environment(batch=1, prompt_len=prompt_len, new_tokens=new, quick=args.quick,
                       note=("CPU: XLA fallback (quantized weights are dequantized inside each jitted step), "
                             "not kernel figures" if backend == "cpu" else ""))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "decode.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    plot(results, meta, out / "decode.png")
    print(f"wrote {out / 'decode.json'}, {out / 'decode.png'}")


def plot(results: list[dict], meta: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in results))
    fig, axes = plt.subplots(1, len(models), figsize=(4.5 * len(models), 3.8), squeeze=False)
    for ax, model in zip(axes[0], models):
        rows = [r for r in results if r["model"] == model]
        names = [r["weights"] for r in rows]
        vals = [r["decode_tokens_per_s"] or 0.0 for r in rows]
        bars = ax.bar(names, vals, color=["#777777", "#3b75af", "#e1812c"][: len(rows)])
        for b, r in zip(bars, rows):
            ax.annotate(f"{b.get_height():.1f}\n{r['weight_bytes'] / 2**20:.0f} MiB", (b.get_x() + b.get_width() / 2,
                        b.get_height()), ha="center", va="bottom", fontsize=8)
        ax.set_title(model, fontsize=10)
        ax.set_ylabel("decode tokens/s (batch 1)")
        ax.set_ylim(0, max(vals) * 1.3 if vals and max(vals) > 0 else 1)
    fig.suptitle(f"jq decode, prompt {meta['prompt_len']} + {meta['new_tokens']} new, {meta['device']}"
                 + (" (XLA fallback)" if meta["backend"] == "cpu" else ""), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
