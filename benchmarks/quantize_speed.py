"""RTN quantization speed: compile and run time of `quantize_params` per scheme on Llama-7B projection shapes,
plus dequantize time. Writes OUT/quantize_speed.json and OUT/quantize_speed.png.

    python benchmarks/quantize_speed.py [--out out] [--shapes 4096x4096 4096x11008] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import jq
from timing import environment, timed  # benchmarks/ is on sys.path when a script here runs

SCHEMES = {
    "int8 channel": jq.Scheme("int8"),
    "int4 asym g128": jq.Scheme("int4", symmetric=False, group_size=128),
    "int4 sym g128": jq.Scheme("int4", group_size=128),
    "int3 asym g128": jq.Scheme("int3", symmetric=False, group_size=128),
    "int4 asym g128 mse": jq.Scheme("int4", symmetric=False, group_size=128, range="mse"),
    "nf4 g64": jq.Scheme("nf4", group_size=64),
    "fp8 e4m3 channel": jq.Scheme("fp8_e4m3", scale_dtype="float32"),
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="out")
    ap.add_argument("--shapes", nargs="*", default=["4096x4096", "4096x11008"])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    results = []
    for s in args.shapes:
        k, n = map(int, s.split("x"))
        w = jax.random.normal(jax.random.key(0), (k, n), jnp.float32) * 0.02
        params = {"layer": {"kernel": w}}
        for name, scheme in SCHEMES.items():
            cfg = jq.QuantConfig.simple(scheme)
            quant = jax.jit(lambda p, cfg=cfg: jq.quantize_params(p, cfg))
            q, first, run = timed(quant, params, repeats=args.repeats)
            deq = jax.jit(jq.dequantize_params)
            _, dfirst, drun = timed(deq, q, repeats=args.repeats)
            qt = q["layer"]["kernel"]
            err = float(jnp.linalg.norm(qt.dequantize() - w) / jnp.linalg.norm(w))
            r = {"shape": [k, n], "scheme": name, "compile_plus_first_s": first, "quantize_s": run,
                 "dequantize_s": drun, "weights_per_s": k * n / run, "bits_per_weight": qt.bits_per_weight,
                 "rel_error": err}
            results.append(r)
            print(f"{s:>11} {name:<20} first {first:6.2f} s  run {run * 1e3:8.1f} ms  dequant {drun * 1e3:7.1f} ms  "
                  f"{qt.bits_per_weight:5.2f} b/w  err {err:.4f}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = environment()
    (out / "quantize_speed.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    names = list(SCHEMES)
    width = 0.8 / len(args.shapes)
    for i, s in enumerate(args.shapes):
        vals = [r["quantize_s"] * 1e3 for r in results if "x".join(map(str, r["shape"])) == s]
        ax.bar(np.arange(len(names)) + i * width, vals, width, label=s)
    ax.set_xticks(np.arange(len(names)) + width * (len(args.shapes) - 1) / 2, names, rotation=25, ha="right", fontsize=8)
    ax.set_ylabel("quantize time per weight matrix (ms)")
    ax.set_title(f"jq RTN on {meta['device']} (jax {meta['jax']})", fontsize=10)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "quantize_speed.png", dpi=120)
    print(f"wrote {out / 'quantize_speed.json'}, {out / 'quantize_speed.png'}")


if __name__ == "__main__":
    main()
