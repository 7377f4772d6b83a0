"""Hadamard rotation speed: the fast transform (`jq.numbers.hadamard.hadamard_transform`) against a dense matmul
by the same orthogonal matrix, on Llama-style hidden sizes (4096 = 2^12, 11008 = 64·172, 14336 = 512·28), f32,
on the present backend. Compile time is excluded (reported separately); run times are medians. Writes
OUT/hadamard.json and OUT/hadamard.png.

    python benchmarks/hadamard.py [--out out] [--sizes 4096 11008 14336] [--rows 64 2048] [--blocks 2 128]
                                  [--repeats 5] [--dense-repeats 3]

`--blocks`: power-of-two factor sizes of the fast transform to time (2 = pure butterflies, the classic FWHT;
128 = the default, power-of-two factors ≤ 128 as small dense matmuls).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jq.numbers import hadamard as had
from timing import environment, timed  # benchmarks/ is on sys.path when a script here runs


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="out")
    ap.add_argument("--sizes", nargs="*", type=int, default=[4096, 11008, 14336])
    ap.add_argument("--rows", nargs="*", type=int, default=[64, 2048])
    ap.add_argument("--blocks", nargs="*", type=int, default=[2, 128])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--dense-repeats", type=int, default=3)
    args = ap.parse_args()
    dense_fn = jax.jit(lambda x, q: jnp.matmul(x, q, precision=jax.lax.Precision.HIGHEST))
    results = []
    print(f"{'n':>6} {'= 2^k·b':>10} {'rows':>5} {'method':<14} {'first s':>8} {'run ms':>10} {'GB/s':>7} "
          f"{'vs dense':>9} {'max err':>9}")
    for n in args.sizes:
        d = had.decompose(n)
        q = jax.device_put(had.rotation_matrix(n))
        for rows in args.rows:
            x = jax.random.normal(jax.random.key(rows), (rows, n), jnp.float32)
            ref, dfirst, drun = timed(dense_fn, x, q, repeats=args.dense_repeats)
            entry = {"n": n, "pow2": d.pow2, "base": d.base, "construction": d.construction, "rows": rows,
                     "dense": {"compile_plus_first_s": dfirst, "run_s": drun, "gflops": 2 * rows * n * n / drun / 1e9}}
            print(f"{n:>6} {f'{d.pow2}·{d.base}':>10} {rows:>5} {'dense matmul':<14} {dfirst:8.2f} {drun * 1e3:10.2f} "
                  f"{'':>7} {'1.0x':>9} {'':>9}")
            for block in args.blocks:
                fast = jax.jit(lambda x, block=block: had.hadamard_transform(x, block=block))
                y, first, run = timed(fast, x, repeats=args.repeats)
                err = float(jnp.max(jnp.abs(y - ref)))
                gbs = 2 * x.size * 4 / run / 1e9  # one read + one write of x: the memory floor
                entry[f"fast_block{block}"] = {
                    "factors": had._factors(d, block), "compile_plus_first_s": first, "run_s": run,
                    "speedup_vs_dense": drun / run, "effective_GB_per_s": gbs, "max_abs_err_vs_dense": err}
                print(f"{n:>6} {f'{d.pow2}·{d.base}':>10} {rows:>5} {f'fast b={block}':<14} {first:8.2f} "
                      f"{run * 1e3:10.2f} {gbs:7.2f} {f'{drun / run:.1f}x':>9} {err:9.1e}")
            results.append(entry)
            del x, ref
        del q
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = environment(dtype="float32", repeats=args.repeats, dense_repeats=args.dense_repeats,
                       default_block=had._DEFAULT_BLOCK)
    (out / "hadamard.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(args.rows), figsize=(4.5 * len(args.rows), 4), squeeze=False)
    methods = ["dense"] + [f"fast_block{b}" for b in args.blocks]
    labels = ["dense matmul"] + [f"fast (block {b})" for b in args.blocks]
    width = 0.8 / len(methods)
    for ax, rows in zip(axes[0], args.rows):
        rs = [r for r in results if r["rows"] == rows]
        for i, (m, lab) in enumerate(zip(methods, labels)):
            vals = [r[m]["run_s"] * 1e3 for r in rs]
            bars = ax.bar(np.arange(len(rs)) + i * width, vals, width, label=lab)
            if m != "dense":
                for b, r in zip(bars, rs):
                    ax.annotate(f"{r[m]['speedup_vs_dense']:.0f}x", (b.get_x() + b.get_width() / 2, b.get_height()),
                                ha="center", va="bottom", fontsize=7)
        ax.set_xticks(np.arange(len(rs)) + width * (len(methods) - 1) / 2,
                      [f"{r['n']}\n({r['pow2']}·{r['base']})" for r in rs], fontsize=8)
        ax.set_yscale("log")
        ax.set_ylabel("time per call (ms, log)")
        ax.set_title(f"{rows} rows, f32", fontsize=9)
        ax.legend(fontsize=7)
    fig.suptitle(f"jq Hadamard rotation x @ Q on {meta['device']} (jax {meta['jax']})", fontsize=10)
    fig.tight_layout()
    fig.savefig(out / "hadamard.png", dpi=120)
    print(f"wrote {out / 'hadamard.json'}, {out / 'hadamard.png'}")


if __name__ == "__main__":
    main()
