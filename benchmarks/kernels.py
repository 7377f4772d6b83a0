"""Quantized matmul speed: the Pallas kernels vs the XLA fallback (dequantize + dot) vs a bf16 `jnp.dot`, on
Llama projection shapes (K × N) and token counts M. Writes OUT/kernels.json and OUT/kernels.png.

    python benchmarks/kernels.py [--out out] [--shapes 4096x4096 ...] [--ms 1 16 256] [--schemes w4a16 w8a8_int8]
                                 [--no-tune] [--quick]

Per case: median time of one matmul, TFLOP/s (2·M·K·N / t), GB/s (bytes of weight + scales + x + output / t),
speedup over the bf16 dot, and % of roofline: the time the device's peak bandwidth / peak matmul throughput (from
a small table by device kind; bf16 peak for weight-only kernels, int8 / fp8 peak for W8A8) allow, over the
measured time. Each timed executable runs the matmul once on each of several weight copies (together larger than
the L2 cache) so weights come from HBM, and one launch's host overhead is spread over them. The kernel output is
checked against the fallback's (`max_rel_err`).

On CPU the kernels would only run interpreted, which says nothing about their speed: there the script runs a
reduced set (`--quick` is implied) and times only the XLA fallback and the bf16 dot. The first run of a shape on a
GPU/TPU also autotunes block sizes (cached on disk); `--no-tune` uses the defaults.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import jq
from timing import environment  # benchmarks/ is on sys.path when a script here runs

SCHEMES = {  # name: (scheme, which peak bounds its maths)
    "w4a16": (jq.Scheme("int4", symmetric=False, group_size=128), "bf16"),
    "w8a16": (jq.Scheme("int8"), "bf16"),
    "w8a8_int8": (jq.Scheme("int8", act="int8", scale_dtype="float32"), "int8"),
    "w8a8_fp8": (jq.Scheme("fp8_e4m3", act="fp8_e4m3", scale_dtype="float32"), "fp8"),
}
SHAPES = ["4096x4096", "4096x11008", "11008x4096", "4096x14336", "14336x4096"]
MS = [1, 4, 16, 64, 256, 2048]
QUICK_SHAPES = ["512x512", "512x1408", "1408x512"]
QUICK_MS = [1, 16, 64]

# (substring of device_kind, peak bytes/s, peak bf16 FLOP/s, peak int8 OP/s, peak fp8 FLOP/s), dense, first match.
PEAKS = [
    ("H200", 4.8e12, 989e12, 1979e12, 1979e12),
    ("H100 PCIe", 2.0e12, 756e12, 1513e12, 1513e12),
    ("H100 NVL", 3.9e12, 835e12, 1671e12, 1671e12),
    ("H100", 3.35e12, 989e12, 1979e12, 1979e12),  # SXM ("NVIDIA H100 80GB HBM3")
    ("A100", 2.0e12, 312e12, 624e12, None),
    ("L4", 0.3e12, 121e12, 242e12, 242e12),
    ("TPU v6", 1.64e12, 918e12, 1836e12, None),
    ("TPU v5p", 2.76e12, 459e12, 918e12, None),
    ("TPU v5", 0.82e12, 197e12, 394e12, None),  # v5e ("TPU v5 lite")
    ("TPU v4", 1.2e12, 275e12, 275e12, None),
]
L2_FLUSH_BYTES = 128 << 20  # weight copies per executable add up to at least this


def peaks(kind: str) -> dict | None:
    for sub, bw, bf16, i8, f8 in PEAKS:
        if sub.lower() in kind.lower():
            return {"match": sub, "bytes_per_s": bw, "bf16": bf16, "int8": i8, "fp8": f8}
    return None


def time_call(fn, repeats: int) -> float:
    jax.block_until_ready(fn())
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts))


def copies(tree, nbytes: int):
    """Distinct device copies of a weight (pytree) whose total size flushes the L2 cache."""
    n = int(min(16, max(2, math.ceil(L2_FLUSH_BYTES / max(nbytes, 1)))))
    return [jax.tree.map(lambda a: jnp.array(a, copy=True), tree) for _ in range(n)]


def timed(matmul, x, weights, repeats: int) -> tuple[float, jax.Array]:
    """Seconds per matmul, running it once per weight copy inside one executable; and the first output."""
    run = jax.jit(lambda x, ws: [matmul(x, w) for w in ws])  # a fresh function: traced in the current mode
    t = time_call(lambda: run(x, weights), repeats) / len(weights)
    return t, run(x, weights)[0]


def with_kernels(enabled: bool):
    """Set JQ_KERNELS for the next trace ("off" forces the XLA fallback; unset restores the default)."""
    if enabled:
        os.environ.pop("JQ_KERNELS", None)
    else:
        os.environ["JQ_KERNELS"] = "off"


def kernel_reason(x, q) -> str | None:
    """None if a registered kernel takes this call, else every kernel's reason (what jq.ops would log)."""
    import jq.pallas_kernels  # noqa: F401  registers the kernels

    dn = (((x.ndim - 1,), (0,)), ((), ()))
    reasons = []
    for k in jq.ops.KERNELS:
        why = k.supports(x, q, dn)
        if why is None:
            return None
        reasons.append(f"{k.name}: {why}")
    return "; ".join(reasons) or "no kernel registered"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="out")
    ap.add_argument("--shapes", nargs="*", default=None, help="KxN weight shapes")
    ap.add_argument("--ms", nargs="*", type=int, default=None, help="token counts M")
    ap.add_argument("--schemes", nargs="*", default=list(SCHEMES), choices=list(SCHEMES))
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="small shapes and few M (implied on CPU)")
    ap.add_argument("--no-tune", action="store_true", help="JQ_AUTOTUNE=0: default block sizes")
    args = ap.parse_args()
    on_cpu = jax.default_backend() == "cpu"
    quick = args.quick or on_cpu
    shapes = args.shapes or (QUICK_SHAPES if quick else SHAPES)
    ms = args.ms or (QUICK_MS if quick else MS)
    if args.no_tune:
        os.environ["JQ_AUTOTUNE"] = "0"
    dev = jax.devices()[0]
    pk = peaks(dev.device_kind)
    if on_cpu:
        print("CPU: the Pallas kernels would run in interpret mode, which is not a speed; timing only the XLA "
              "fallback (dequantize + dot) and the bf16 dot, on reduced shapes.")
    if pk is None:
        print(f"no peak table entry for {dev.device_kind!r}: % of roofline omitted")

    results = []
    for s in shapes:
        K, N = map(int, s.split("x"))
        w = jnp.asarray(np.random.default_rng(0).standard_normal((K, N), np.float32) * 0.02)
        dense = copies(w.astype(jnp.bfloat16), K * N * 2)
        for name in args.schemes:
            scheme, peak_kind = SCHEMES[name]
            cfg = jq.QuantConfig.simple(scheme)
            q = jax.jit(lambda w: jq.quantize_params({"l": {"kernel": w}}, cfg)["l"]["kernel"])(w)
            qs = copies(q, q.nbytes)
            for M in ms:
                x = jnp.asarray(np.random.default_rng(1).standard_normal((M, K), np.float32), jnp.bfloat16)
                flops, io = 2.0 * M * K * N, (M * K + M * N) * 2
                t_bf16, _ = timed(jnp.dot, x, dense, args.repeats)
                paths = {}
                with_kernels(False)
                paths["xla"] = timed(jq.ops.qdot, x, qs, args.repeats)
                with_kernels(True)
                reason = kernel_reason(x, q) if not on_cpu else "not timed: interpret mode on CPU"
                if reason is None:
                    paths["kernel"] = timed(jq.ops.qdot, x, qs, args.repeats)
                base = {"shape": [K, N], "M": M, "scheme": name, "bf16_dot_s": t_bf16}
                for path, (t, y) in paths.items():
                    r = {**base, "path": path, "time_s": t, "tflops": flops / t / 1e12,
                         "gbps": (q.nbytes + io) / t / 1e9, "speedup_vs_bf16": t_bf16 / t}
                    if pk is not None and pk[peak_kind]:
                        ideal = max((q.nbytes + io) / pk["bytes_per_s"], flops / pk[peak_kind])
                        r["roofline_pct"] = 100.0 * ideal / t
                    if path == "kernel":
                        ref = np.asarray(paths["xla"][1], np.float32)
                        r["max_rel_err"] = float(np.abs(np.asarray(y, np.float32) - ref).max() / np.abs(ref).max())
                    results.append(r)
                    roof = f"{r['roofline_pct']:5.1f}% roof" if "roofline_pct" in r else ""
                    print(f"{s:>11} M={M:<5} {name:<10} {path:<6} {t * 1e6:9.1f} us {r['tflops']:7.2f} TFLOP/s "
                          f"{r['gbps']:8.1f} GB/s  x{r['speedup_vs_bf16']:5.2f} vs bf16 {roof}"
                          + (f"  err {r['max_rel_err']:.1e}" if "max_rel_err" in r else ""), flush=True)
                if reason is not None:
                    results.append({**base, "path": "kernel", "skipped": reason})
                    if not on_cpu:
                        print(f"{s:>11} M={M:<5} {name:<10} kernel not taken: {reason}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = environment(quick=quick, peaks=pk, autotune=not args.no_tune,
                       note="kernels not timed in interpret mode (CPU)" if on_cpu else "")
    (out / "kernels.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    plot(results, args.schemes, shapes, meta, out / "kernels.png")
    print(f"wrote {out / 'kernels.json'}, {out / 'kernels.png'}")


def plot(results, schemes, shapes, meta, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(2, len(schemes))
    rows = -(-len(schemes) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6 * cols, 3.6 * rows), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, name in zip(axes.flat, schemes):
        for i, s in enumerate(shapes):
            for kind, style in (("kernel", "-"), ("xla", "--")):
                pts = sorted((r["M"], r["speedup_vs_bf16"]) for r in results if r["scheme"] == name
                             and "x".join(map(str, r["shape"])) == s and r.get("path") == kind and "time_s" in r)
                if pts:
                    ax.plot(*zip(*pts), style, marker="o", ms=3, color=colors[i % len(colors)],
                            label=f"{s} {'Pallas' if kind == 'kernel' else 'XLA dequant+dot'}")
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("M (tokens)")
        ax.set_ylabel("speedup over bf16 dot")
        ax.set_title(name, fontsize=10)
        ax.legend(fontsize=6)
    for ax in list(axes.flat)[len(schemes):]:
        ax.axis("off")
    fig.suptitle(f"jq quantized matmul on {meta['device_kind']} (jax {meta['jax']})"
                 + (" — CPU: kernels not timed (interpret mode)" if meta["backend"] == "cpu" else ""), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
