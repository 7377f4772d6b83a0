"""QuEST's gradient-alignment check on a real model: per QAT recipe, the cosine between the gradient its estimator
gives the float masters and the float model's own gradient at the same weights (`jq.qat.gradient_alignment`), on
training windows (the Austen books but the evaluation text), with the share of entries it zeroes and the quantized
loss. The loss is next-token cross-entropy: under KD the float teacher's gradient at its own weights is zero.

    python benchmarks/qat_alignment.py [--model smollm2-135m] [--windows 4] [--seq-len 512]
        [--recipes quest_w4a4 quest_w4a4:ste=identity qat_ste_w4a4 ...] [--out benchmarks/results/qat_alignment]

`NAME:key=value[,key=value]` sets QAT options (ste, act_ste, trust) on every rule of recipe NAME. Writes OUT.json
and OUT.png (per recipe: the cosine, and the gradient's norm against the float one).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from jq import qat
from jq.apps.finetune_setup import corpus_windows, default_corpus, make_loss, training_model
from jq.tree.recipe import load_recipe, recipe_from_dict, recipe_to_dict
from timing import environment  # noqa: E402  (benchmarks/ is on sys.path when a script here runs)

DEFAULT = [f"{r}{b}a{b}{v}" for b in (4, 3, 2) for r, v in (("quest_w", ""), ("quest_w", ":ste=identity"),
                                                              ("qat_ste_w", ""))]


def variant(spec: str):
    """A recipe from NAME or NAME:key=value,...: the options set on every rule (values parsed as YAML scalars)."""
    import yaml

    name, _, opts = spec.partition(":")
    cfg = load_recipe(name)
    if not opts:
        return cfg
    extra = {}
    for item in opts.split(","):
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise ValueError(f"recipe variant {spec!r}: options are key=value separated by commas, got {item!r}")
        extra[key.strip()] = yaml.safe_load(value)
    d = recipe_to_dict(cfg)
    d["name"] = spec
    d["rules"] = [{**r, "options": {**(r.get("options") or {}), **extra}} for r in d["rules"]]
    return recipe_from_dict(d, source=spec)


def plot(rows: dict, path: Path) -> None:
    """Two panels per recipe: the cosine, and |g_qat| / |g_float| on a log scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(rows)
    colors = ["tab:orange" if ":" in n else "tab:blue" if Path(n).name.startswith("quest") else "tab:gray"
              for n in names]
    fig, axes = plt.subplots(1, 2, figsize=(max(9, 1.3 * len(names)), 4.2))
    for ax, key, label in ((axes[0], "cosine", "cosine(QAT gradient, float gradient)"),
                           (axes[1], "norm_ratio", "|QAT gradient| / |float gradient|")):
        ax.bar(range(len(names)), [rows[n][key] for n in names], color=colors)
        ax.set_xticks(range(len(names)), [Path(n).stem if "/" in n else n for n in names], rotation=40, ha="right",
                      fontsize=8)
        ax.set_ylabel(label)
    axes[0].set_ylim(min(-0.05, min(rows[n]["cosine"] for n in names) - 0.02), 1)
    axes[0].axhline(0, color="black", lw=0.6)
    axes[1].set_yscale("log")
    fig.suptitle("QuEST (blue), its Gaussian clips with the identity STE (orange), plain STE (grey): at QAT's start")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--windows", type=int, default=4, help="training windows, one gradient each")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--recipes", nargs="+", default=DEFAULT)
    ap.add_argument("--out", default="benchmarks/results/qat_alignment")
    args = ap.parse_args()
    cfgs = [variant(s) for s in args.recipes]  # bad names fail before the model loads
    m = training_model(args.model, 0)
    model = m.family.module(m.cfg)
    windows = corpus_windows(m.tokenizer, default_corpus(), args.seq_len)
    pick = np.random.default_rng(0).choice(len(windows), size=args.windows, replace=False)
    batches = [windows[i][None] for i in sorted(pick)]

    def loss(params, ids, act_cfg):
        return make_loss(model, act_cfg)(params, ids)

    rows = {}
    for spec, cfg in zip(args.recipes, cfgs):
        t0 = time.perf_counter()
        rows[spec] = {**qat.gradient_alignment(loss, m.params, cfg, batches), "seconds": time.perf_counter() - t0}
        r = rows[spec]
        print(f"{spec:<28} cosine {r['cosine']:.4f}  per batch {np.mean(r['cosine_per_batch']):.4f}  "
              f"|g|/|g_f| {r['norm_ratio']:.3f}  zeroed {r['zero_fraction']:.4f}  loss {r['loss_float']:.3f} → "
              f"{r['loss_qat']:.3f}  {r['seconds']:.0f} s", flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = environment(model=args.model, windows=args.windows, seq_len=args.seq_len, loss="next-token cross-entropy",
                       date=time.strftime("%Y-%m-%d"))
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "recipes": rows}, indent=1))
    plot(rows, out.with_suffix(".png"))


if __name__ == "__main__":
    main()
