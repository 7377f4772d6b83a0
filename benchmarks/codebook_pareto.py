"""Codebook vs scalar frontier on SmolLM2-135M: perplexity against all-in bits per weight of the linear layers.

    python benchmarks/codebook_pareto.py run gptvq_w3 quarot_gptvq_w3 rtn_w3_g128 ...   # measure missing rows
    python benchmarks/codebook_pareto.py add ROW result.json [--commit C]              # a `jq eval --json` result
    python benchmarks/codebook_pareto.py plot                                          # table + PNG

`run` evaluates each recipe of `configs/` the way the README's table does (persuasion.txt, window 512, first 16
windows; calibration on the four other Austen books, 128 windows of 512, seed 0) with `python -m jq eval --json`
in a subprocess, one row at a time, and appends the result with the commit it ran at; rows already in the file are
skipped (`--rerun` measures them again). `--text FILE` evaluates on another text (rows are keyed by recipe and text).
`plot` prints the Markdown table (recipe, kind, bits, perplexity, quantization seconds) and draws
benchmarks/results/codebook_pareto.png: one point per row, and each kind's frontier (the best perplexity at or
below each budget). A recipe is "codebook" when any rule uses a learned or lattice codebook format (cb…, e8p…),
else "scalar".
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "codebook_pareto.json"
AUSTEN = REPO.parent / "shared" / "data" / "austen"
CALIB = ["emma.txt", "mansfieldpark.txt", "prideprejudice.txt", "sensesensibility.txt"]


def kind_of(recipe: str) -> str:
    """'codebook' if a rule of configs/<recipe>.yaml uses a cb… format, else 'scalar' (float: 'float')."""
    if recipe == "float":
        return "float"
    rules = yaml.safe_load((REPO / "configs" / f"{recipe}.yaml").read_text()).get("rules", [])
    return "codebook" if any(str(r.get("format", "")).startswith(("cb", "e8p")) for r in rules) else "scalar"


def load() -> list[dict]:
    return json.loads(RESULTS.read_text())["rows"] if RESULTS.exists() else []


def save(rows: list[dict]) -> None:
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"model": "smollm2-135m", "rows": rows}, indent=1) + "\n")


def commit() -> str:
    out = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True).stdout.strip()
    return out.stdout.strip() + ("+changes" if dirty else "")


def row_of(recipe: str, result: dict, text: str, at: str | None = None) -> dict:
    return {"recipe": recipe, "kind": kind_of(recipe), "text": text, "bits": result["linear_bits_per_weight"],
            "perplexity": result["perplexity"], "quantize_seconds": result.get("quantize_seconds"),
            "commit": at or commit(), "date": time.strftime("%Y-%m-%d")}


def run(recipes: list[str], text: Path, rerun: bool) -> None:
    rows = load()
    for recipe in recipes:
        if not rerun and any(r["recipe"] == recipe and r["text"] == text.name for r in rows):
            continue
        cmd = [sys.executable, "-m", "jq", "eval", "--model", "smollm2-135m", "--text", str(text), "--json"]
        if recipe != "float":
            cmd += ["--recipe", str(REPO / "configs" / f"{recipe}.yaml"), "--calib", *(str(AUSTEN / c) for c in CALIB)]
        print("+", " ".join(cmd), flush=True)
        out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
        if out.returncode:
            sys.exit(f"{recipe}: jq eval failed:\n{out.stderr[-2000:]}")
        rows = [r for r in load() if not (r["recipe"] == recipe and r["text"] == text.name)]
        rows.append(row_of(recipe, json.loads(out.stdout.strip().splitlines()[-1]), text.name))
        save(rows)


def frontier(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The best perplexity at or below each budget: points (bits, ppl) sorted by bits, keeping each that improves."""
    out: list[tuple[float, float]] = []
    for b, p in sorted(points):
        if not out or p < out[-1][1]:
            out.append((b, p))
    return out


def plot(text: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sorted((r for r in load() if r["text"] == text), key=lambda r: (r["kind"], r["bits"]))
    print("| recipe | kind | bits / weight | perplexity | quantize s |\n|---|---|---|---|---|")
    for r in rows:
        qs = r["quantize_seconds"]
        print(f"| `{r['recipe']}` | {r['kind']} | {r['bits']:.2f} | {r['perplexity']:.2f} | "
              f"{'' if qs is None else f'{qs:.0f}'} |")
    fig, ax = plt.subplots(figsize=(8, 5))
    top = 400.0  # rows above it (int2, data-free 2-bit) are drawn on the top edge with their value
    for kind, color in (("scalar", "tab:blue"), ("codebook", "tab:red")):
        sel = [r for r in rows if r["kind"] == kind and r["bits"] <= 5]
        if not sel:
            continue
        pts = [(r["bits"], min(r["perplexity"], top)) for r in sel]
        ax.scatter(*zip(*pts), color=color, label=kind, zorder=3,
                   marker="o")
        ax.step(*zip(*frontier(pts)), where="post", color=color, alpha=0.6)
        for r, (b, p) in zip(sel, pts):
            label = r["recipe"] + (f" ({r['perplexity']:.3g})" if r["perplexity"] > top else "")
            ax.annotate(label, (b, p), fontsize=6, xytext=(3, 3), textcoords="offset points", rotation=20)
    for r in rows:
        if r["kind"] == "float":
            ax.axhline(r["perplexity"], color="gray", ls="--", lw=1, label=f"float {r['perplexity']:.1f}")
    ax.set(xlabel="all-in bits per weight (linear layers)", ylabel=f"perplexity ({text}, log; capped at {top:.0f})",
           yscale="log", ylim=(None, top * 1.4),
           title="SmolLM2-135M: codebooks (learned and E8P lattice) vs scalar grids")
    ax.legend()
    fig.tight_layout()
    out = RESULTS.with_suffix(".png") if text == "persuasion.txt" else RESULTS.with_name(f"codebook_pareto_{text}.png")
    fig.savefig(out, dpi=130)
    print(f"wrote {out}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("recipes", nargs="+")
    r.add_argument("--text", type=Path, default=AUSTEN / "persuasion.txt")
    r.add_argument("--rerun", action="store_true")
    a = sub.add_parser("add")
    a.add_argument("recipe")
    a.add_argument("result", type=Path)
    a.add_argument("--commit", help="where the result was measured, if not at this checkout")
    p = sub.add_parser("plot")
    p.add_argument("--text", default="persuasion.txt")
    args = ap.parse_args()
    if args.cmd == "run":
        run(args.recipes, args.text, args.rerun)
    elif args.cmd == "add":
        result = json.loads(args.result.read_text().strip().splitlines()[-1])
        text = Path(result["text"]).name
        text = "persuasion.txt" if text == "persuasion_excerpt.txt" else text  # its opening: the same 16 windows
        rows = [x for x in load() if not (x["recipe"] == args.recipe and x["text"] == text)]
        save(rows + [row_of(args.recipe, result, text, args.commit)])
    else:
        plot(args.text)


if __name__ == "__main__":
    main()
