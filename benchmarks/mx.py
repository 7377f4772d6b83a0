"""Microscaling (OCP MX v1.0, NVFP4) against per-group float-scale 4-bit grids on SmolLM2-135M.

    python benchmarks/mx.py run [RECIPE ...]     # measure the rows not yet in benchmarks/results/mx.json
    python benchmarks/mx.py table                # the Markdown table

`run` evaluates each recipe of `configs/` the way the README's tables do — persuasion.txt, window 512, the first 16
windows; calibrated methods (GPTQ) on the four other Austen books, 128 windows of 512, seed 0 — with
`python -m jq eval --model smollm2-135m --recipe configs/X.yaml --json` in a subprocess, one row at a time, and
records bits per weight (linear layers, scales included), perplexity and quantization seconds with the commit it
ran at. Rows already in the file are skipped (`--rerun` measures them again); a failing row is reported and skipped.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "mx.json"
AUSTEN = REPO.parent / "shared" / "data" / "austen"
CALIB = ["emma.txt", "mansfieldpark.txt", "prideprejudice.txt", "sensesensibility.txt"]
# RTN first (minutes each), then the calibrated rows (GPTQ: 10-15 minutes each on 2 cores)
DEFAULT = ["mxfp4", "nvfp4", "gptq_mxfp4", "gptq_nvfp4", "mxfp4_ceil", "fp4_g32", "nf4_g32", "rtn_w4_g32",
           "mxfp6_e2m3", "mxfp8_e4m3", "mxint8", "mxfp4_a_mxfp8", "nvfp4_a_nvfp4"]


def load() -> list[dict]:
    return json.loads(RESULTS.read_text())["rows"] if RESULTS.exists() else []


def save(rows: list[dict]) -> None:
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"model": "smollm2-135m", "text": "persuasion.txt", "window": 512, "windows": 16,
                                   "rows": rows}, indent=1) + "\n")


def commit() -> str:
    out = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True).stdout.strip()
    return out.stdout.strip() + ("+changes" if dirty else "")


def run(recipes: list[str], rerun: bool) -> None:
    for recipe in recipes:
        if not rerun and any(r["recipe"] == recipe for r in load()):
            continue
        cmd = [sys.executable, "-m", "jq", "eval", "--model", "smollm2-135m", "--text", str(AUSTEN / "persuasion.txt"),
               "--json", "--recipe", str(REPO / "configs" / f"{recipe}.yaml"),
               "--calib", *(str(AUSTEN / c) for c in CALIB)]
        print("+", " ".join(cmd), flush=True)
        t0 = time.time()
        out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
        if out.returncode:
            print(f"{recipe}: jq eval failed:\n{out.stderr[-2000:]}", flush=True)
            continue
        res = json.loads(out.stdout.strip().splitlines()[-1])
        rows = [r for r in load() if r["recipe"] != recipe]
        rows.append({"recipe": recipe, "bits": res["linear_bits_per_weight"], "perplexity": res["perplexity"],
                     "quantize_seconds": res.get("quantize_seconds"), "wall_seconds": round(time.time() - t0),
                     "commit": commit(), "date": time.strftime("%Y-%m-%d")})
        save(rows)
        print(f"{recipe}: bits {res['linear_bits_per_weight']:.3f} perplexity {res['perplexity']:.3f}", flush=True)


def table() -> None:
    print("| recipe | bits / weight | perplexity | quantize s |\n|---|---|---|---|")
    for r in sorted(load(), key=lambda r: (r["bits"], r["perplexity"])):
        qs = r["quantize_seconds"]
        print(f"| `{r['recipe']}` | {r['bits']:.2f} | {r['perplexity']:.3f} | {'' if qs is None else f'{qs:.0f}'} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("recipes", nargs="*", default=DEFAULT)
    r.add_argument("--rerun", action="store_true")
    sub.add_parser("table")
    args = ap.parse_args()
    if args.cmd == "run":
        run(args.recipes or DEFAULT, args.rerun)
    else:
        table()


if __name__ == "__main__":
    main()
