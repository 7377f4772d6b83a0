"""Allocated against uniform: a model (SmolLM2 by default) quantized by `jq autoquant` recipes at several budgets
(bits per linear weight) beside each candidate recipe applied uniformly — perplexity on persuasion.txt (and on a text
not in the repo, the GPL-3 licence) against bits per linear weight —, which candidate each layer got at one budget,
and how well each estimated cost ranks the measured one (the logits' KL when one layer alone is quantized, on a
sample of layers).
Writes OUT/NAME.json, OUT/NAME.png (the frontiers) and OUT/NAME_layers.png (the sensitivity map: bits per layer).

    python benchmarks/autoquant.py [--out out] [--name autoquant] [--candidates rtn_w3_g128 ...]
        [--metrics kfac fisher hessian] [--compare-at 4.0] [--budgets 2.5 3 3.5 4 4.5] [--map-budget 3.5]
        [--windows 16] [--validate 12]
        [--uniform rtn_w4_g128 ...] [--also /usr/share/common-licenses/GPL-3] [--base quarot_gptq_refit_w4_g128]
        [--model gemma3-270m] [--cache sens.json]

`--base`: every candidate runs on that recipe's rotation (QuaRot) and online rotations, the uniform rows too.
`--cache FILE`: costs are read from FILE (`jq.apps.autoquant_cache`, the file `jq autoquant --cache` keeps) when
it holds them for the same model, base and calibration draw; only the missing candidates, metrics and validation
layers are measured and added (another set of budgets or one more candidate then takes minutes).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from jq.apps import data, pipeline  # noqa: E402
from jq.apps.autoquant import DEFAULT_CANDIDATES, choose, uniform  # noqa: E402
from jq.apps.autoquant_cache import cache_key, cached_tables  # noqa: E402
from jq.tree.recipe import load_recipe, recipe_from_dict  # noqa: E402
from timing import environment  # noqa: E402  (benchmarks/ is on sys.path when a script here runs)

KEYS = ("perplexity", "linear_bits_per_weight", "bits_per_weight", "model_bytes", "quantize_seconds")


def _row(m, text, cfg, windows, calib, also) -> dict:
    r = pipeline.evaluate(m, text, cfg, windows=windows, calib=calib if cfg.needs_calibration else None, also=also)
    return {"recipe": cfg.name, **{k: r[k] for k in KEYS},
            **{name: v["perplexity"] for name, v in r.get("also", {}).items()}}


def spearman(a, b) -> float:
    """Rank correlation of two equal-length sequences (ties broken by order: costs are continuous)."""
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def validation(tables: dict, measured: dict) -> dict:
    """Per metric: Spearman's ρ of estimated against measured cost over the sampled (layer, candidate) pairs, and
    over the marginal costs that drive the allocation (a layer's cost change per bit between consecutive sizes)."""
    out = {}
    for metric, sens in tables.items():
        est, true, est_d, true_d = [], [], [], []
        for p, row in measured["layers"].items():
            e, t, bits = sens["layers"][p]["cost"], row["cost"], row["bits"]
            ok = [c for c in range(len(t)) if np.isfinite(t[c]) and np.isfinite(e[c])]
            est += [e[c] for c in ok]
            true += [t[c] for c in ok]
            by_size = sorted(ok, key=lambda c: bits[c])
            for lo, hi in zip(by_size, by_size[1:]):
                if bits[hi] > bits[lo]:
                    est_d.append((e[lo] - e[hi]) / (bits[hi] - bits[lo]))
                    true_d.append((t[lo] - t[hi]) / (bits[hi] - bits[lo]))
        out[metric] = {"pairs": len(est), "spearman_cost": spearman(est, true),
                       "spearman_marginal": spearman(est_d, true_d) if len(est_d) > 2 else None}
    return out


def sensitivity_map(sens: dict, choice: dict, path: Path) -> None:
    """Bits per weight chosen for each layer (rows: blocks, columns: the block's linear layers)."""
    kinds = sorted({p.split("/", 1)[1] for p in choice})
    blocks = sorted({int(p.split("/")[0].split("_")[1]) for p in choice})
    grid = np.full((len(blocks), len(kinds)), np.nan)
    for p, c in choice.items():
        row = sens["layers"][p]
        grid[blocks.index(int(p.split("/")[0].split("_")[1])), kinds.index(p.split("/", 1)[1])] = \
            row["bits"][c] / row["weights"]
    fig, ax = plt.subplots(figsize=(7, 9))
    im = ax.imshow(grid, aspect="auto", cmap="viridis")
    ax.set_xticks(range(len(kinds)), [k.replace("/kernel", "") for k in kinds], rotation=45, ha="right")
    ax.set_ylabel("block")
    fig.colorbar(im, label="bits per weight chosen")
    ax.set_title(f"jq autoquant ({sens['metric']}): bits per layer")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def frontier_plot(res: dict, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    rows = sorted(res["uniform"], key=lambda r: r["linear_bits_per_weight"])
    ax.plot([r["linear_bits_per_weight"] for r in rows], [r["perplexity"] for r in rows], "o--", label="uniform")
    for metric in sorted({r["metric"] for r in res["allocated"]}):
        rows = sorted((r for r in res["allocated"] if r["metric"] == metric), key=lambda r: r["budget_bpw"])
        ax.plot([r["linear_bits_per_weight"] for r in rows], [r["perplexity"] for r in rows], "s-",
                label=f"allocated ({metric})")
    ax.set_yscale("log")
    ax.set_xlabel("bits per linear weight (scales and zeros included)")
    ax.set_ylabel("perplexity (persuasion, 16 × 512)")
    ax.set_title(f"{res['meta']['model']}: jq autoquant against uniform recipes ({res['meta']['name']})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="out")
    p.add_argument("--name", default="autoquant")
    p.add_argument("--candidates", nargs="+", default=DEFAULT_CANDIDATES)
    p.add_argument("--uniform", nargs="*", help="recipes to run uniformly (default: the candidates)")
    p.add_argument("--metrics", nargs="+", default=["kfac", "fisher", "hessian"],
                   help="estimates computed (and validated); every budget is run for the first, --compare-at for all")
    p.add_argument("--compare-at", nargs="*", type=float, default=[4.0])
    p.add_argument("--budgets", nargs="+", type=float, default=[2.5, 3.0, 3.5, 4.0, 4.5])
    p.add_argument("--map-budget", type=float, default=3.5)
    p.add_argument("--windows", type=int, default=16)
    p.add_argument("--validate", type=int, default=0, help="layers sampled to check the estimates against KL")
    p.add_argument("--also", default="/usr/share/common-licenses/GPL-3", help="a text not in the repo ('' for none)")
    p.add_argument("--base", help="a recipe whose rotation every candidate (allocated and uniform) runs on")
    p.add_argument("--model", default="smollm2-135m", help="a known model name, .gguf file or Hugging Face directory")
    p.add_argument("--cache", help="a JSON file of sensitivity tables (jq autoquant --cache): what it holds for "
                   "this model, draw and base is reused, the rest measured and added")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    m = pipeline.load(args.model)
    text_path = data.default_eval_text()
    text = text_path.read_text(encoding="utf-8")
    also = {Path(args.also).name: Path(args.also).read_text(encoding="utf-8")} if args.also else None
    tokens, draw = data.calibration_draw(m.tokenizer, data.default_calib_files(text_path), 128, 512, 0, "windows")
    candidates = [load_recipe(c) for c in args.candidates]
    base = load_recipe(args.base) if args.base else None
    key = cache_key(m, draw, base)  # the same cache file as jq autoquant's
    tables = cached_tables(m, candidates, tokens, args.metrics, cache=args.cache, key=key, base=base)
    seconds = next(iter(tables.values()))["seconds"]
    res = {"meta": environment(windows=args.windows, calibration={k: v for k, v in draw.items() if k != "files"},
                               date=time.strftime("%Y-%m-%d"), sensitivity_seconds=seconds, metrics=args.metrics,
                               name=args.name, candidates=args.candidates, also=args.also or None,
                               base=args.base, model=args.model),
           "uniform": [], "allocated": []}
    if args.validate:
        layers = sorted(next(iter(tables.values()))["layers"])
        sample = sorted(np.random.default_rng(0).choice(layers, size=min(args.validate, len(layers)), replace=False))
        measured = cached_tables(m, candidates, tokens, ("kl",), cache=args.cache, key=key, only=list(sample),
                                 base=base)["kl"]
        res["validation"] = {"layers": list(sample), "measured_seconds": measured["seconds"],
                             **validation(tables, measured)}
        print(res["validation"], flush=True)
    first = next(iter(tables.values()))
    for name in args.candidates if args.uniform is None else args.uniform:
        cfg = recipe_from_dict(uniform(first, name)["recipe"]) if base is not None else load_recipe(name)
        res["uniform"].append(_row(m, text, cfg, args.windows, tokens, also))
        print(res["uniform"][-1], flush=True)
    for metric, sens in tables.items():
        for b in args.budgets if metric == args.metrics[0] else args.compare_at:
            t0 = time.perf_counter()
            chosen = choose(sens, f"{b}bpw")
            solve_s = time.perf_counter() - t0
            row = _row(m, text, recipe_from_dict(chosen["recipe"]), args.windows, tokens, also)
            res["allocated"].append({**row, "metric": metric, "budget_bpw": b, "solve_seconds": solve_s,
                                     "layers_per_candidate": chosen["layers_per_candidate"]})
            print(res["allocated"][-1], flush=True)
            if b == args.map_budget and metric == args.metrics[0]:
                sensitivity_map(sens, chosen["choice"], out / f"{args.name}_layers.png")
                res["map"] = {p: sens["candidates"][c] for p, c in chosen["choice"].items()}
            (out / f"{args.name}.json").write_text(json.dumps(res, indent=1) + "\n")
    (out / f"{args.name}.json").write_text(json.dumps(res, indent=1) + "\n")
    frontier_plot(res, out / f"{args.name}.png")


if __name__ == "__main__":
    main()
