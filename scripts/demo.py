"""The demo: SmolLM2-135M float vs RTN recipes — perplexity, size and time, as a table, JSON and a PNG.

    python scripts/demo.py [--model smollm2-135m] [--text persuasion.txt] [--windows 16] [--out out]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RECIPES = ["rtn_w8.yaml", "rtn_w8_g128.yaml", "rtn_w4_g128.yaml", "rtn_w4_g128_sym.yaml", "rtn_w4_g128_pad.yaml",
           "rtn_w4_g128_mse.yaml", "rtn_w3_g128_pad.yaml",
           "nf4_g64.yaml", "rtn_w3_g128.yaml"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--text", default=None)
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--recipes", nargs="*", default=RECIPES)
    ap.add_argument("--out", default="out")
    args = ap.parse_args()

    from rich.console import Console
    from rich.table import Table

    import jq
    from jq.apps import data, pipeline

    console = Console(width=120)
    t_start = time.perf_counter()
    text_path = Path(args.text) if args.text else data.default_eval_text()
    console.print(f"loading {args.model}; evaluating on {text_path} ({args.windows} × {args.window} tokens)")
    m = pipeline.load(args.model)
    text = text_path.read_text(encoding="utf-8")
    rows = []
    for name in [None, *args.recipes]:
        recipe = jq.load_recipe(REPO / "configs" / name) if name else None
        r = pipeline.evaluate(m, text, recipe, window=args.window, windows=args.windows)
        rows.append(r)
        console.print(f"  {r['recipe']:<22} ppl {r['perplexity']:8.3f}   {r['linear_bits_per_weight']:6.3f} bits/w   "
                      f"{r['model_bytes'] / 1e6:7.1f} MB   {r['seconds']:5.1f} s")

    t = Table(title=f"jq demo — {Path(m.source).name}, {text_path.name}, {args.windows}×{args.window} tokens")
    for c in ("recipe", "bits/weight (linear)", "bits/weight (all)", "size MB", "perplexity", "Δ vs float", "seconds"):
        t.add_column(c, justify="right")
    base = rows[0]["perplexity"]
    for r in rows:
        t.add_row(r["recipe"], f"{r['linear_bits_per_weight']:.3f}", f"{r['bits_per_weight']:.3f}",
                  f"{r['model_bytes'] / 1e6:.1f}", f"{r['perplexity']:.3f}", f"{100 * (r['perplexity'] / base - 1):+.1f}%",
                  f"{r['seconds']:.1f}")
    console.print(t)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    total = time.perf_counter() - t_start
    (out / "demo.json").write_text(json.dumps({"model": m.source, "text": str(text_path), "window": args.window,
                                               "windows": args.windows, "total_seconds": total, "results": rows}, indent=1))
    _plot(rows, out / "demo.png", f"{Path(m.source).name} — {text_path.name}")
    console.print(f"wrote {out / 'demo.json'} and {out / 'demo.png'}; total {total:.0f} s")


def _plot(rows, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.8))
    markers = "osD^v<>pPX*h"
    for i, r in enumerate(rows):
        ax.scatter(r["linear_bits_per_weight"], r["perplexity"], s=40, marker=markers[i % len(markers)],
                   label=f"{r['recipe']}: {r['perplexity']:.2f}")
    ax.axhline(rows[0]["perplexity"], color="grey", lw=0.8, ls="--")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("bits per weight of the linear layers (scales and zero points included)")
    ax.set_ylabel("perplexity (lower is better)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, loc="upper right", title="recipe: perplexity", title_fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
