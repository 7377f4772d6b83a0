"""AQLM against QuIP# at 2 bits on single SmolLM2-135M layers: relative layer error and quantization seconds.

    python benchmarks/aqlm_layers.py [--layers 0 14 29] [--kinds q_proj o_proj down_proj] [--samples 32]

Calibration: `--samples` windows of 512 tokens of the four Austen calibration books (seed 0), run through the FLOAT
model (not sequential: every layer sees the float model's inputs), one `LayerStats` per chosen kernel. Each kernel
is quantized by every method row (`quantize_leaf`, so the online Hadamard rotation is applied as in the recipes)
and scored by the relative layer error tr((W − Ŵ)ᵀ H (W − Ŵ)) / tr(Wᵀ H W) = ‖X(W − Ŵ)‖² / ‖XW‖² (H the
unrotated input Hessian, Ŵ dequantized back to the unrotated basis), with its all-in bits per weight and the
seconds of the second call (the first compiles; both are recorded). Writes benchmarks/results/aqlm_layers.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

REPO = Path(__file__).resolve().parents[1]
AUSTEN = REPO.parent / "shared" / "data" / "austen"
CALIB = ["emma.txt", "mansfieldpark.txt", "prideprejudice.txt", "sensesensibility.txt"]
OUT = REPO / "benchmarks" / "results" / "aqlm_layers.json"

ROWS = {  # name: recipe rule (pattern / rotate filled in)
    "quip_e8p": {"method": "quip", "format": "e8p", "granularity": "channel", "options": {"damp": 0.01}},
    "aqlm_aq8x2": {"method": "aqlm", "format": "aq8x2", "granularity": "channel",
                   "options": {"beam": 8, "iters": 3}},
    "aqlm_aq8x2_init": {"method": "aqlm", "format": "aq8x2", "granularity": "channel", "options": {"iters": 0}},
    "rtn_int2_g64": {"method": "rtn", "format": "int2", "group_size": 64, "symmetric": False},
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, nargs="+", default=[0, 14, 29])
    ap.add_argument("--kinds", nargs="+", default=["q_proj", "o_proj", "down_proj"])
    ap.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)

    from jq.algorithms.gptvq import layer_objective
    from jq.apps import data, pipeline
    from jq.calibration.capture import capture
    from jq.tree.paths import leaf_paths
    from jq.tree.quantize import quantize_leaf
    from jq.tree.recipe import recipe_from_dict

    m = pipeline.load("smollm2-135m")
    leaves = dict(leaf_paths(m.params))
    paths = [p for p in leaves if p.endswith("kernel") and any(p.startswith(f"layers_{i}/") for i in args.layers)
             and any(f"/{k}/" in p for k in args.kinds)]
    if not paths:
        raise SystemExit(f"no kernel matches layers {args.layers} kinds {args.kinds}; some paths: {list(leaves)[:8]}")
    toks = data.calibration_tokens(m.tokenizer, [AUSTEN / c for c in CALIB], args.samples, 512, 0)
    t0 = time.time()
    stats = capture(m.family.module(m.cfg), {"params": m.params}, [jnp.asarray(toks[i:i + 8])
                                                                    for i in range(0, len(toks), 8)], paths=paths)
    calib_s = time.time() - t0
    results = []
    for path in paths:
        w, st = jnp.asarray(leaves[path], jnp.float32), stats[path]
        h = jnp.asarray(st.hessian, jnp.float32)
        base = float(layer_objective(w, jnp.zeros_like(w), h))
        for name in args.rows:
            rule = recipe_from_dict({"name": name, "rules": [{"pattern": ".*kernel", "rotate": "hadamard",
                                                              **ROWS[name]}]}).rules[0]
            times = []
            for _ in range(2):
                t = time.time()
                q = jax.block_until_ready(quantize_leaf(path, w, rule, st))
                times.append(time.time() - t)
            err = float(layer_objective(w, q.dequantize(jnp.float32), h)) / base
            row = {"path": path, "shape": list(w.shape), "row": name, "format": q.fmt, "rel_error": err,
                   "bits_per_weight": q.bits_per_weight, "seconds": times[1], "first_call_seconds": times[0]}
            print(json.dumps(row), flush=True)
            results.append(row)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "model": "smollm2-135m", "calibration": f"{args.samples} x 512 tokens of {', '.join(CALIB)} (seed 0), "
        "float-model inputs", "calibration_seconds": calib_s, "machine": platform.processor() or platform.machine(),
        "xla_threads": "OPENBLAS_NUM_THREADS=1", "rows": results}, indent=1) + "\n")
    summary = {}
    for r in results:
        summary.setdefault(r["row"], []).append((r["rel_error"], r["seconds"], r["bits_per_weight"]))
    for name, v in summary.items():
        a = np.asarray(v)
        print(f"{name:18s} mean rel error {a[:, 0].mean():.4f}  mean seconds {a[:, 1].mean():.2f}  "
              f"mean bits {a[:, 2].mean():.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
