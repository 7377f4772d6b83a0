"""Allocated against uniform: SmolLM2 quantized by `jq autoquant` recipes at several budgets (bits per linear weight)
beside each candidate recipe applied uniformly — perplexity on persuasion.txt against bits per linear weight — and
which candidate each layer got at one budget. Writes OUT/autoquant.json, OUT/autoquant.png (the frontier) and
OUT/autoquant_layers.png (the sensitivity map: bits chosen per layer).

    python benchmarks/autoquant.py [--out out] [--budgets 2.5 3 3.5 4 4.5] [--map-budget 3.5] [--windows 16]
                                   [--metric fisher|hessian]
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
from jq.apps.autoquant import DEFAULT_CANDIDATES, choose, sensitivities  # noqa: E402
from jq.tree.recipe import load_recipe, recipe_from_dict  # noqa: E402
from timing import environment  # noqa: E402  (benchmarks/ is on sys.path when a script here runs)

KEYS = ("perplexity", "linear_bits_per_weight", "bits_per_weight", "model_bytes")


def _row(m, text, cfg, windows) -> dict:
    r = pipeline.evaluate(m, text, cfg, windows=windows)
    return {"recipe": cfg.name, **{k: r[k] for k in KEYS}}


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
    ax.set_title("jq autoquant: bits per layer")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="out")
    p.add_argument("--budgets", nargs="+", type=float, default=[2.5, 3.0, 3.5, 4.0, 4.5])
    p.add_argument("--map-budget", type=float, default=3.5)
    p.add_argument("--windows", type=int, default=16)
    p.add_argument("--metric", choices=["fisher", "hessian"], default="fisher")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    m = pipeline.load("smollm2-135m")
    text_path = data.default_eval_text()
    text = text_path.read_text(encoding="utf-8")
    tokens, draw = data.calibration_draw(m.tokenizer, data.default_calib_files(text_path), 128, 512, 0, "windows")
    candidates = [load_recipe(c) for c in DEFAULT_CANDIDATES]
    sens = sensitivities(m, candidates, tokens, metric=args.metric)
    res = {"meta": environment(windows=args.windows, calibration={k: v for k, v in draw.items() if k != "files"},
                               date=time.strftime("%Y-%m-%d"), sensitivity_seconds=sens["seconds"],
                               metric=args.metric),
           "uniform": [], "allocated": []}
    for cfg in candidates:
        res["uniform"].append(_row(m, text, cfg, args.windows))
        print(res["uniform"][-1], flush=True)
    for b in args.budgets:
        t0 = time.perf_counter()
        chosen = choose(sens, f"{b}bpw")
        solve_s = time.perf_counter() - t0
        row = _row(m, text, recipe_from_dict(chosen["recipe"]), args.windows)
        res["allocated"].append({**row, "budget_bpw": b, "solve_seconds": solve_s,
                                 "layers_per_candidate": chosen["layers_per_candidate"]})
        print(res["allocated"][-1], flush=True)
        if b == args.map_budget:
            sensitivity_map(sens, chosen["choice"], out / "autoquant_layers.png")
            res["map"] = {p: sens["candidates"][c] for p, c in chosen["choice"].items()}
    (out / "autoquant.json").write_text(json.dumps(res, indent=1) + "\n")
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for key, style in (("uniform", "o--"), ("allocated", "s-")):
        rows = sorted(res[key], key=lambda r: r["linear_bits_per_weight"])
        ax.plot([r["linear_bits_per_weight"] for r in rows], [r["perplexity"] for r in rows], style, label=key)
    ax.set_yscale("log")
    ax.set_xlabel("bits per linear weight")
    ax.set_ylabel("perplexity (persuasion, 16 × 512)")
    ax.set_title("SmolLM2-135M: jq autoquant against uniform recipes")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "autoquant.png", dpi=110)


if __name__ == "__main__":
    main()
