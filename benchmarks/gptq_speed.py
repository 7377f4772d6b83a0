"""GPTQ speed: compile and run time of jq's jitted GPTQ on one K×N layer (w4 g128 asym, act-order), next to a
straightforward NumPy implementation of the same algorithm (the paper's form: Cholesky of the inverse Hessian,
lazy batches vectorised per block, float32) on the same inputs. Writes OUT/gptq_speed.json and OUT/gptq_speed.png.

    python benchmarks/gptq_speed.py [--out out] [--sizes 1024 4096 11008] [--n 4096] [--numpy-max-k 4096]

The Hessian comes from synthetic correlated inputs X [tokens, K] (a low-rank mix plus noise and a few
high-variance channels), H = XᵀX / tokens.

`--blas-threads` (default 1): jaxlib runs its CPU LAPACK calls (GPTQ's Cholesky) in SciPy's bundled OpenBLAS, and
NumPy uses its own OpenBLAS. On a small, busy machine OpenBLAS's spinning worker threads fight XLA's thread pool and
other processes: on 2 shared cores a K=1024 Cholesky took 0.66 s with OpenBLAS's default threads and 0.02 s with
one. The option sets both libraries (0 leaves their defaults); XLA's own matmuls keep its thread pool.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jq.algorithms.gptq import _upper_cholesky, gptq_with_info
from jq.algorithms.rtn import rtn
from jq.numbers.scheme import Scheme
from timing import environment  # benchmarks/ is on sys.path when a script here runs

SCHEME = Scheme("int4", symmetric=False, group_size=128)  # scales rounded to float16, integer zero points
BLOCK = 128
DAMP = 0.01


def synthetic(k: int, n: int, tokens: int, seed: int = 0):
    """Kernel W [K, N] and H = XᵀX / tokens for correlated inputs X."""
    kz, km, ke, ko, kw = jax.random.split(jax.random.key(seed), 5)

    @jax.jit
    def make():
        r = max(k // 8, 1)
        mix = jax.random.normal(km, (r, k)) * (jax.random.uniform(km, (r, k)) < 0.1)
        x = jax.random.normal(kz, (tokens, r)) @ mix + 0.5 * jax.random.normal(ke, (tokens, k))
        x = x.at[:, jax.random.choice(ko, k, (max(k // 256, 1),), replace=False)].multiply(10.0)
        h = jnp.dot(x.T, x, precision=jax.lax.Precision.HIGHEST) / tokens
        return jax.random.normal(kw, (k, n)) * 0.02, h

    return jax.block_until_ready(make())


def set_blas_threads(n: int) -> list[str]:
    """Set the thread count of the OpenBLAS libraries loaded in this process: SciPy's bundled one (behind jaxlib's
    CPU LAPACK calls) and NumPy's. Returns the paths of the libraries set."""
    import ctypes

    jnp.linalg.cholesky(jnp.eye(2)).block_until_ready()  # loads jaxlib's LAPACK (and SciPy's OpenBLAS)
    np.linalg.cholesky(np.eye(2))
    with open("/proc/self/maps") as f:
        paths = sorted({line.split()[-1] for line in f if "libscipy_openblas" in line})
    done = []
    for path in paths:
        lib = ctypes.CDLL(path)
        for name in ("scipy_openblas_set_num_threads", "scipy_openblas_set_num_threads64_", "openblas_set_num_threads"):
            if hasattr(lib, name):
                getattr(lib, name)(ctypes.c_int(n))
                done.append(path)
                break
    return done


# -- the NumPy reference -------------------------------------------------------------------------------------


def np_grid(x: np.ndarray):
    """int4 asymmetric min-max grid of the rows of x [rows, N], jq's conventions (float16 scales, int zero)."""
    lo, hi = np.minimum(x.min(0), 0), np.maximum(x.max(0), 0)
    s = ((hi - lo) / 15).astype(np.float16).astype(np.float32)
    s[s == 0] = 1
    return s, np.clip(np.round(-lo / s), 0, 15)


def numpy_gptq(w: np.ndarray, h: np.ndarray, g: int = 128, block: int = BLOCK, damp: float = DAMP):
    """GPTQ, act-order, groups in processing order, float32 arrays. Returns codes in processing order [K, N], the
    permutation, the dequantized weight in the original order, and the factorisation and total times.

    Note: numpy.linalg computes float32 inputs in float64 internally (then rounds), so its inverse and Cholesky
    are both slower and more accurate than float32 LAPACK (what jq and the PyTorch reference use)."""
    t0 = time.perf_counter()
    w, h = w.astype(np.float32).copy(), h.astype(np.float32).copy()
    k = w.shape[0]
    dead = np.diag(h) == 0
    h[dead, dead] = 1
    w[dead] = 0
    perm = np.argsort(-np.diag(h), kind="stable")
    w, h = w[perm], h[np.ix_(perm, perm)]
    h[np.diag_indices(k)] += damp * np.mean(np.diag(h))
    u = np.linalg.cholesky(np.linalg.inv(h)).T  # upper, uᵀu = H⁻¹
    t_factor = time.perf_counter() - t0
    codes = np.zeros(w.shape, np.uint8)
    deq = np.zeros_like(w)
    s = z = None
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        w1, u1 = w[i1:i2].copy(), u[i1:i2, i1:i2]
        err = np.zeros_like(w1)
        for i in range(i2 - i1):
            if (i1 + i) % g == 0:  # a new group: its current weights (the block's rows, then the rest)
                rows = np.concatenate([w1[i : i + g], w[i2 : i1 + i + g]])
                s, z = np_grid(rows)
            c = np.clip(np.round(w1[i] / s + z), 0, 15)
            q = (c - z) * s
            e = (w1[i] - q) / u1[i, i]
            w1[i:] -= np.outer(u1[i, i:], e)
            err[i] = e
            codes[i1 + i], deq[i1 + i] = c, q
        w[i2:] -= u[i1:i2, i2:].T @ err
    total = time.perf_counter() - t0
    out = np.empty_like(deq)
    out[perm] = deq
    return codes, perm, out, t_factor, total


@jax.jit
def objective(dq, w, h):
    """tr((Q − W)ᵀ (H + λI) (Q − W)), the quantity GPTQ minimises (float32, full-precision matmul)."""
    d = dq - w
    hd = jnp.dot(h, d, precision=jax.lax.Precision.HIGHEST) + DAMP * jnp.mean(jnp.diag(h)) * d
    return jnp.sum(d * hd)


# -- main -----------------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="out")
    ap.add_argument("--sizes", nargs="*", type=int, default=[1024, 4096, 11008], help="K values (input channels)")
    ap.add_argument("--n", type=int, default=4096, help="N (output channels)")
    ap.add_argument("--tokens", type=int, default=2048, help="calibration tokens of the synthetic X")
    ap.add_argument("--repeats", type=int, default=1,
                    help="timed runs of the compiled function after the first one (median; 0: report the first)")
    ap.add_argument("--numpy-max-k", type=int, default=4096, help="run the NumPy reference only up to this K")
    ap.add_argument("--blas-threads", type=int, default=1,
                    help="threads of the OpenBLAS libraries (jax's CPU LAPACK, NumPy); 0 leaves their defaults")
    args = ap.parse_args()
    blas_libs = set_blas_threads(args.blas_threads) if args.blas_threads > 0 else []

    fn = jax.jit(functools.partial(gptq_with_info, block_size=BLOCK, damp=DAMP, act_order=True),
                 static_argnums=(1, 2))
    rtn_jit = jax.jit(rtn, static_argnums=(1, 2))
    factor = jax.jit(lambda h: _upper_cholesky(h + DAMP * jnp.mean(jnp.diag(h)) * jnp.eye(h.shape[0])))
    results = []
    for k in args.sizes:
        n = args.n
        w, h = synthetic(k, n, args.tokens)
        layout = SCHEME.layout((k, n), (0,))
        stats = {"hessian": h}
        t0 = time.perf_counter()
        compiled = fn.lower(w, SCHEME, layout, stats).compile()
        compile_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        q, info = jax.block_until_ready(compiled(w, stats))  # the first run also pays for fresh buffers
        first_s = time.perf_counter() - t0
        runs = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            q, info = jax.block_until_ready(compiled(w, stats))
            runs.append(time.perf_counter() - t0)
        run_s = float(np.median(runs)) if runs else first_s
        factor(h).block_until_ready()
        t0 = time.perf_counter()
        factor(h).block_until_ready()
        factor_s = time.perf_counter() - t0
        wn = np.asarray(w)
        obj_rtn = float(objective(rtn_jit(w, SCHEME, layout).dequantize(), w, h))
        r = {"K": k, "N": n, "scheme": SCHEME.describe() + " act_order", "block_size": BLOCK,
             "jq_compile_s": compile_s, "jq_first_run_s": first_s, "jq_run_s": run_s, "jq_runs_s": runs,
             "jq_factor_s": factor_s,
             "err": float(info["err"]), "rtn_objective": obj_rtn, "damp": float(info["damp"]),
             "fallback": bool(info["fallback"]), "load_avg": os.getloadavg()[0]}
        line = (f"K={k:>5} N={n}  jq compile {compile_s:5.2f} s  first run {first_s:6.2f} s  run {run_s:6.2f} s "
                f"(Cholesky {factor_s:5.2f} s)  objective {r['err']:.4g} (RTN {obj_rtn:.4g})")
        if k <= args.numpy_max_k:
            codes, perm, deq, t_factor, numpy_s = numpy_gptq(wn, np.asarray(h))
            jq_codes = np.asarray(q.unpacked_codes())
            same_perm = bool(np.array_equal(np.asarray(q.perm), perm))
            agree = float(np.mean(jq_codes == codes)) if same_perm else None
            obj_np = float(objective(jnp.asarray(deq), w, h))
            r.update(numpy_s=numpy_s, numpy_factor_s=t_factor, same_perm=same_perm, code_agreement=agree,
                     numpy_objective=obj_np)
            line += (f"  | NumPy {numpy_s:7.2f} s (inverse + Cholesky {t_factor:5.2f} s)  codes equal {agree:.2%}, "
                     f"objective jq/NumPy {r['err'] / obj_np:.5f}")
        else:
            r.update(numpy_s=None)
            line += "  | NumPy skipped (--numpy-max-k)"
        line += f"  [load {r['load_avg']:.1f}]"
        print(line, flush=True)
        results.append(r)
        del w, h, q, compiled

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = environment(processor=platform.processor(), tokens=args.tokens, blas_threads=args.blas_threads,
                       blas_libs=blas_libs)
    (out / "gptq_speed.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    x = np.arange(len(results))
    series = [("jq compile", "jq_compile_s"), ("jq run", "jq_run_s"), ("NumPy run", "numpy_s")]
    width = 0.26
    for i, (label, key) in enumerate(series):
        vals = [r[key] if r.get(key) is not None else np.nan for r in results]
        bars = ax.bar(x + (i - 1) * width, vals, width, label=label)
        for b, v in zip(bars, vals):
            if np.isfinite(v):
                ax.annotate(f"{v:.1f}", (b.get_x() + b.get_width() / 2, v), ha="center", va="bottom", fontsize=8)
    ax.set_xticks(x, [f"K={r['K']}\nN={r['N']}" for r in results])
    ax.set_ylabel("seconds")
    ax.set_title(f"GPTQ {SCHEME.describe()} act_order, block {BLOCK} — {os.cpu_count()} CPU cores ({meta['device']})")
    ax.legend()
    fig.text(0.01, 0.01, f"OpenBLAS threads: {args.blas_threads or 'default'}; NumPy's linalg runs float32 inputs in "
             "float64; run = a warm run after the first", fontsize=7, color="0.4")
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(out / "gptq_speed.png", dpi=120)
    print(f"wrote {out / 'gptq_speed.json'} and {out / 'gptq_speed.png'}")


if __name__ == "__main__":
    main()
