"""Embedding fidelity of weight-quantized all-MiniLM-L6-v2 (a BERT with real fp32 weights) to its float original:
per recipe, mean / min cosine between float and quantized embeddings of the same sentence, Spearman correlation of
the pairwise-similarity matrices, top-1 nearest-neighbour agreement (see `jq.apps.embeddings`), bits/weight and
quantize time; and, for HQQ against RTN at the same grid (w4 g64, w3 g64), paired differences per sentence with
bootstrap intervals. Sentences: persuasion.txt, 5-60 words, the first N. Writes OUT/minilm_fidelity.json and .png.

    python benchmarks/minilm_fidelity.py [--out out] [--sentences 512] [--recipes configs/a.yaml ...]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax
import numpy as np

import jq
from jq.tree.recipe import QuantConfig, recipe_from_dict, recipe_to_dict
from jq.apps import embeddings as embed_eval
from jq.models.bert.model import embed_texts, make_encoder
from jq.models.bert.weights import load_bert
from jq.apps.pipeline import default_eval_text
from jq.tree.report import summarize
from timing import environment  # benchmarks/ is on sys.path when a script here runs

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
RECIPES = ["rtn_w8", "rtn_w4_g128", "rtn_w4_g64", "hqq_w4_g64", "nf4_g64", "rtn_w3_g128"]
# int3 variants of the g64 pair: the same rules with format int3 (HQQ's advantage, if any, should grow at 3 bits)
INT3_VARIANTS = {"rtn_w3_g64": "rtn_w4_g64", "hqq_w3_g64": "hqq_w4_g64"}
COMPARE = [("hqq_w4_g64", "rtn_w4_g64"), ("hqq_w3_g64", "rtn_w3_g64")]  # (a, b): is a better than b?


def with_format(recipe: QuantConfig, fmt: str, name: str) -> QuantConfig:
    """`recipe` with every rule's format replaced by `fmt`, built through the YAML-shaped dict."""
    d = recipe_to_dict(recipe)
    for rule in d["rules"]:
        rule["format"] = fmt
    d.update(name=name, description=f"{recipe.name} with format {fmt}")
    return recipe_from_dict(d, source=f"{recipe.name} with format {fmt}")


def default_recipes() -> list[QuantConfig]:
    out = [jq.load_recipe(CONFIGS / f"{r}.yaml") for r in RECIPES]
    out += [with_format(jq.load_recipe(CONFIGS / f"{base}.yaml"), "int3", name) for name, base in INT3_VARIANTS.items()]
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="out")
    ap.add_argument("--model", default="minilm-l6", help="a BERT directory or a known name")
    ap.add_argument("--text", default=None, help="plain text to take sentences from (default: persuasion.txt)")
    ap.add_argument("--sentences", type=int, default=512)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--recipes", nargs="*", default=None, help="YAML recipes (default: the list in RECIPES + int3)")
    args = ap.parse_args()

    text_path = Path(args.text) if args.text else default_eval_text()
    sentences = embed_eval.split_sentences(text_path.read_text(encoding="utf-8"))[: args.sentences]
    if len(sentences) < 3:
        raise SystemExit(f"{text_path}: only {len(sentences)} sentences of 5-60 words; need at least 3")
    cfg, params, tok = load_bert(args.model, max_length=args.max_length)
    if tok is None:
        raise SystemExit(f"{args.model}: no tokenizer.json in the model directory")
    enc = make_encoder(cfg)
    recipes = [jq.load_recipe(r) for r in args.recipes] if args.recipes is not None else default_recipes()

    t0 = time.perf_counter()
    ref = embed_texts(enc, params, tok, sentences, args.batch_size)
    float_s = time.perf_counter() - t0
    n_params = sum(int(np.prod(x.shape)) for _, x in jq.leaf_paths(params))
    results = [{"recipe": "float", "description": "fp32 weights", **embed_eval.fidelity(ref, ref),
                "bits_per_weight": 32.0, "quantized_bits_per_weight": 32.0, "quantized_params": 0, "params": n_params,
                "weight_rel_error": 0.0, "quantize_seconds": 0.0, "encode_seconds": float_s}]
    print(f"{len(sentences)} sentences from {text_path.name}; float encode {float_s:.1f} s")
    print(f"{'recipe':<14} {'mean cos':>9} {'min cos':>9} {'spearman':>9} {'top-1':>6} {'bits/w':>7} {'w err':>7} "
          f"{'quant s':>8}")
    per_sentence = {}  # recipe -> {"cosine": [N], "top1": [N]} for the paired comparisons
    for recipe in recipes:
        t0 = time.perf_counter()
        q = jax.block_until_ready(jq.quantize_params(params, recipe))
        t1 = time.perf_counter()
        emb = embed_texts(enc, q, tok, sentences, args.batch_size)
        t2 = time.perf_counter()
        rows = jq.report(params, q)
        errs = [r.rel_error for r in rows if r.rel_error is not None]
        r = {"recipe": recipe.name, "description": recipe.description, **embed_eval.fidelity(ref, emb),
             **summarize(rows), "weight_rel_error": float(np.mean(errs)), "quantize_seconds": t1 - t0,
             "encode_seconds": t2 - t1}
        results.append(r)
        per_sentence[recipe.name] = {"cosine": embed_eval.row_cosine(ref, emb),
                                     "top1": embed_eval.top1_matches(ref, emb)}
        print(f"{r['recipe']:<14} {r['mean_cosine']:9.6f} {r['min_cosine']:9.6f} {r['spearman']:9.6f} "
              f"{r['top1_agreement']:6.3f} {r['quantized_bits_per_weight']:7.3f} {r['weight_rel_error']:7.4f} "
              f"{r['quantize_seconds']:8.2f}")

    comparisons = compare(per_sentence)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = environment(model=str(args.model), text=str(text_path), sentences=len(sentences),
                       max_length=args.max_length,
                       bits_note="quantized_bits_per_weight: over the quantized kernels, scales and zero points "
                                 "included; bits_per_weight: over all parameters (fp32 embeddings and norms included)")
    (out / "minilm_fidelity.json").write_text(json.dumps({"meta": meta, "results": results,
                                                                "comparisons": comparisons}, indent=1))
    plot(results, meta, out / "minilm_fidelity.png")
    print(f"wrote {out / 'minilm_fidelity.json'}, {out / 'minilm_fidelity.png'}")


def compare(per_sentence: dict[str, dict[str, np.ndarray]]) -> list[dict]:
    """For each pair of COMPARE that was run: the paired per-sentence difference (a − b) of cosine to float and of
    top-1 agreement, with a bootstrap 95% interval over sentences (`jq.apps.embeddings.paired_difference`)."""
    rows = []
    for a, b in COMPARE:
        if a in per_sentence and b in per_sentence:
            for metric in ("cosine", "top1"):
                d = embed_eval.paired_difference(per_sentence[a][metric], per_sentence[b][metric])
                rows.append({"a": a, "b": b, "metric": metric, **d})
                print(f"{a} - {b} {metric:>6}: {d['mean_diff']:+.5f} [{d['ci_low']:+.5f}, {d['ci_high']:+.5f}]  "
                      f"{a} better on {d['a_better']:.0%} of sentences, {b} on {d['b_better']:.0%}")
    return rows


def plot(results: list[dict], meta: dict, path: Path) -> None:
    """Per recipe (labelled with its bits/weight), 1 − mean cosine and 1 − Spearman on a log scale; HQQ in red."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rs = [r for r in results if r["recipe"] != "float"]
    labels = [f"{r['recipe']}  ({r['quantized_bits_per_weight']:.2f} b/w)" for r in rs]
    colors = ["tab:red" if "hqq" in r["recipe"] else "tab:blue" for r in rs]
    y = np.arange(len(rs))[::-1]
    fig, axes = plt.subplots(1, 2, figsize=(11, 0.45 * len(rs) + 1.6), sharey=True)
    for ax, key, title in ((axes[0], "mean_cosine", "1 − mean cosine(float, quantized)"),
                           (axes[1], "spearman", "1 − Spearman of pairwise similarities")):
        vals = [max(1.0 - r[key], 1e-9) for r in rs]
        ax.barh(y, vals, color=colors)
        for yi, v in zip(y, vals):
            ax.annotate(f"{v:.2g}", (v, yi), textcoords="offset points", xytext=(3, -3), fontsize=7)
        ax.set_xscale("log")
        ax.set_xlim(right=max(vals) * 4)  # room for the value labels
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3, which="both", axis="x")
    axes[0].set_yticks(y, labels, fontsize=8)
    fig.suptitle(f"all-MiniLM-L6-v2 weight quantization, {meta['sentences']} Persuasion sentences "
                 "(lower is better; bits/weight of the quantized kernels)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
