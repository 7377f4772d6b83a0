"""How much the resumed KL run (`jq.apps.logit_kl`: the calls before the first block that reads the changed layer
replayed from the float run) saves against a whole forward, per layer depth, on a real model: one layer per sampled
block quantized with one candidate, its KL measured both ways (equal to 1e-4 relative, checked), the median run time
of each and the first run's (which compiles the resumed forward for that block). `--stride S`: also the resumed run
scoring every S-th position (the LM head on those alone) and how far its KL is from the all-positions one.
Writes OUT/NAME.json.

    python benchmarks/logit_kl.py [--model smollm2-135m|gemma3-270m] [--rows 4] [--length 512] [--blocks 6]
        [--candidate rtn_w4_g128] [--repeats 2] [--stride 4] [--out out] [--name logit_kl_smollm2]
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jq.apps import data, pipeline
from jq.apps.logit_kl import logit_kl
from jq.tree.paths import get_path, leaf_paths, replaced
from jq.tree.quantize import quantize_leaf
from jq.tree.recipe import load_recipe
from timing import environment, timed  # noqa: E402  (benchmarks/ is on sys.path when a script here runs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--rows", type=int, default=4, help="calibration windows (autoquant's kl_samples)")
    ap.add_argument("--length", type=int, default=512)
    ap.add_argument("--blocks", type=int, default=6, help="blocks sampled evenly from first to last")
    ap.add_argument("--candidate", default="rtn_w4_g128")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--stride", type=int, default=1, help="also time the resumed run at this position stride")
    ap.add_argument("--out", default="out")
    ap.add_argument("--name", default=None)
    args = ap.parse_args()
    m = pipeline.load(args.model)
    files = data.default_calib_files()
    ids = data.calibration_tokens(m.tokenizer, files, args.rows, args.length)
    recipe = load_recipe(args.candidate)
    kl = logit_kl(m, ids)
    kl_strided = logit_kl(m, ids, args.stride) if args.stride > 1 else None
    blocks = sorted({int(re.match(r"layers_(\d+)/", p)[1]) for p, _ in leaf_paths(m.params) if p.startswith("layers_")})
    picked = [blocks[round(i)] for i in np.linspace(0, len(blocks) - 1, args.blocks)]
    rows = []
    for b in picked:
        path = f"layers_{b}/mlp/down_proj/kernel"
        w = jnp.asarray(get_path(m.params, path))
        q = quantize_leaf(path, w, recipe.rule_for(path, w.ndim), None)
        params = replaced(m.params, path, q.dequantize(jnp.float32).astype(w.dtype))
        whole, whole_first, whole_s = timed(lambda p: kl(p), params, repeats=args.repeats)
        resumed, resumed_first, resumed_s = timed(lambda p: kl(p, changed=path), params, repeats=args.repeats)
        if not np.isclose(whole, resumed, rtol=1e-4):
            raise SystemExit(f"{path}: resumed KL {resumed} differs from the whole run's {whole}")
        rows.append({"layer": path, "block": b, "kl": whole, "whole_s": whole_s, "resumed_s": resumed_s,
                     "speedup": whole_s / resumed_s, "whole_first_s": whole_first, "resumed_first_s": resumed_first})
        print(f"{path}: KL {whole:.5f}; whole {whole_s:.2f} s, resumed {resumed_s:.2f} s ({whole_s / resumed_s:.2f}x); "
              f"first runs {whole_first:.1f} / {resumed_first:.1f} s", flush=True)
        if kl_strided is not None:
            value, _, strided_s = timed(lambda p: kl_strided(p, changed=path), params, repeats=args.repeats)
            rows[-1].update(strided_kl=value, strided_s=strided_s, strided_speedup=whole_s / strided_s)
            print(f"  stride {args.stride}: KL {value:.5f} ({value / whole - 1:+.1%}), {strided_s:.2f} s "
                  f"({whole_s / strided_s:.2f}x)", flush=True)
    mean = float(np.mean([r["whole_s"] for r in rows]) / np.mean([r["resumed_s"] for r in rows]))
    print(f"mean over the sampled blocks: {mean:.2f}x")
    name = args.name or f"logit_kl_{args.model.split('-')[0]}"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = environment(model=args.model, rows=args.rows, length=args.length, candidate=args.candidate,
                       stride=args.stride, devices=len(jax.devices()))
    (out / f"{name}.json").write_text(json.dumps({"meta": meta, "rows": rows, "mean_speedup": mean}, indent=1))


if __name__ == "__main__":
    main()
