"""Cost against model size: wall time and peak host memory (RSS) of streaming RTN conversion and of streaming
sequential GPTQ (`jq.apps.convert_sequential`) on synthetic Llama-shaped models of growing size.

    OPENBLAS_NUM_THREADS=1 python benchmarks/scale.py [--sizes 0.1b 0.3b 0.5b] [--big 7b] [--dir /tmp]

Each size is a Hugging Face directory (config.json + one bf16 model.safetensors written tensor by tensor, random
weights, so this process never holds the model) with the shapes of a real model (SIZES). Each conversion runs in
a fresh subprocess (one XLA thread) that reports its own peak RSS (VmHWM) and is killed if its RSS passes
--rss-limit. GPTQ calibrates on 8 × 128 random token ids (cost does not depend on the values). A tiny model
through the same code gives the fixed overhead (imports, XLA, compilation); the slope is the least-squares fit of
peak RSS against parameter count, and peak RSS per parameter is reported per size.

"7b" is Llama-2-7B's block (dim 4096, MLP 11008, 32 heads, vocab 32000) with --big-layers blocks instead of 32.
`--gptq-layer 11008 4096` measures GPTQ alone on a 7B down_proj (the rise of the peak over its inputs, against
its Hessian's size); `--merge FILE` adds another run's rows. Writes benchmarks/results/scale.json and scale.png.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]

# name: (dim, mlp, layers, heads, kv_heads, vocab, tied) — the shapes of SmolLM2-135M / 360M, Qwen2.5-0.5B,
# Llama-3.2-1B and Llama-2-7B (layers set by --big-layers)
SIZES = {"tiny": (64, 128, 1, 4, 2, 512, True), "0.1b": (576, 1536, 30, 9, 3, 49152, True),
         "0.3b": (960, 2560, 32, 15, 5, 49152, True), "0.5b": (896, 4864, 24, 14, 2, 151936, True),
         "1b": (2048, 8192, 16, 32, 8, 128256, True), "7b": (4096, 11008, 32, 32, 32, 32000, False)}
RECIPES = {"rtn": "configs/rtn_w4_g128_pad.yaml", "gptq": "configs/gptq_w4_g128.yaml"}


def hf_shapes(dim, mlp, layers, heads, kv, vocab, tied) -> dict[str, tuple[int, int] | tuple[int]]:
    """HF tensor name -> shape (linear weights (out, in))."""
    hd = dim // heads
    out = {"model.embed_tokens.weight": (vocab, dim)}
    for i in range(layers):
        p = f"model.layers.{i}."
        out |= {p + "input_layernorm.weight": (dim,), p + "post_attention_layernorm.weight": (dim,),
                p + "self_attn.q_proj.weight": (heads * hd, dim), p + "self_attn.k_proj.weight": (kv * hd, dim),
                p + "self_attn.v_proj.weight": (kv * hd, dim), p + "self_attn.o_proj.weight": (dim, heads * hd),
                p + "mlp.gate_proj.weight": (mlp, dim), p + "mlp.up_proj.weight": (mlp, dim),
                p + "mlp.down_proj.weight": (dim, mlp)}
    out["model.norm.weight"] = (dim,)
    if not tied:
        out["lm_head.weight"] = (vocab, dim)
    return out


def write_hf(d: Path, dims: tuple) -> int:
    """A bf16 safetensors Llama directory with random weights, written one tensor at a time; returns #params."""
    import ml_dtypes

    dim, mlp, layers, heads, kv, vocab, tied = dims
    d.mkdir(parents=True)
    (d / "config.json").write_text(json.dumps({
        "model_type": "llama", "vocab_size": vocab, "hidden_size": dim, "num_hidden_layers": layers,
        "num_attention_heads": heads, "num_key_value_heads": kv, "intermediate_size": mlp, "rope_theta": 10000.0,
        "rms_norm_eps": 1e-5, "tie_word_embeddings": tied, "max_position_embeddings": 4096, "hidden_act": "silu"}))
    shapes = hf_shapes(*dims)
    offsets, pos = {}, 0
    for n, s in shapes.items():
        nbytes = int(np.prod(s)) * 2
        offsets[n] = {"dtype": "BF16", "shape": list(s), "data_offsets": [pos, pos + nbytes]}
        pos += nbytes
    head = json.dumps(offsets).encode()
    head += b" " * (-len(head) % 8)
    rng = np.random.default_rng(0)
    with open(d / "model.safetensors", "wb") as f:
        f.write(len(head).to_bytes(8, "little") + head)
        for n, s in shapes.items():
            w = np.ones(s, np.float32) if len(s) == 1 else rng.standard_normal(s, np.float32) * 0.02
            f.write(w.astype(ml_dtypes.bfloat16).tobytes())
    return sum(int(np.prod(s)) for s in shapes.values())


_CHILD = """
import json, resource, sys, numpy as np
from jq.apps.convert import convert
calib = np.random.default_rng(0).integers(0, int(sys.argv[4]), (8, 128)).astype(np.int32)
convert(sys.argv[1], sys.argv[2], sys.argv[3], calib=calib, progress=False)
hwm = [int(l.split()[1]) * 1024 for l in open('/proc/self/status') if l.startswith('VmHWM')][0]
ru = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({'hwm': hwm, 'cpu': ru.ru_utime + ru.ru_stime}))
"""


# GPTQ alone on one [K, N] kernel (the widest layer of a block), for the attribution of a streamed peak
_LAYER = """
import json, sys, numpy as np, jax, jax.numpy as jnp
import jq
from jq.algorithms.stats import StatSums
from jq.tree.quantize import quantize_leaf
def status(key):
    return [int(l.split()[1]) * 1024 for l in open('/proc/self/status') if l.startswith(key)][0]
k, n = int(sys.argv[1]), int(sys.argv[2])
rule = jq.load_recipe(sys.argv[3]).rules[0]
x = jnp.asarray(np.random.default_rng(0).standard_normal((1024, k), np.float32))
st = jax.block_until_ready(StatSums.of(x).finalize())
del x
w = jnp.asarray(np.random.default_rng(1).standard_normal((k, n), np.float32) * 0.02)
before = status('VmRSS')
jax.block_until_ready(quantize_leaf('w', w, rule, st))
print(json.dumps({'K': k, 'N': n, 'rss_before': before, 'hwm_after': status('VmHWM'), 'hessian_bytes': k * k * 4,
                  'rise_over_hessian': (status('VmHWM') - before) / (k * k * 4)}))
"""


def run_child(src: Path, recipe: str, out: Path, vocab: int, rss_limit: float) -> dict:
    """Convert in a fresh process: wall seconds and peak RSS (the child's own VmHWM: ru_maxrss of a forked child
    starts from the parent's RSS); killed (and reported) past rss_limit bytes."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu", "OPENBLAS_NUM_THREADS": "1",
           "XLA_FLAGS": "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"}
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", _CHILD, str(src), str(REPO / recipe), str(out), str(vocab)],
                            env=env, cwd=REPO, stdout=subprocess.PIPE, text=True)
    killed = False
    while proc.poll() is None:
        try:
            rss = [int(l.split()[1]) * 1024 for l in open(f"/proc/{proc.pid}/status") if l.startswith("VmRSS")]
        except OSError:
            rss = []
        if rss and rss[0] > rss_limit:
            proc.kill()
            killed = True
        time.sleep(0.2)
    wall = time.perf_counter() - t0
    if killed:
        raise RuntimeError(f"{recipe} on {src}: RSS passed {rss_limit / 2**30:.1f} GiB; killed")
    if proc.returncode != 0:
        raise RuntimeError(f"{recipe} on {src}: exit {proc.returncode}")
    rep = json.loads(proc.stdout.read().strip().splitlines()[-1])
    return {"wall_seconds": wall, "cpu_seconds": rep["cpu"], "peak_rss_bytes": rep["hwm"]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", nargs="*", default=["0.1b", "0.3b", "0.5b"], choices=[k for k in SIZES if k != "7b"])
    ap.add_argument("--big", nargs="*", default=["7b"], choices=["7b"], help="few-block 7B-shaped model(s)")
    ap.add_argument("--big-layers", type=int, default=2)
    ap.add_argument("--methods", nargs="+", default=["rtn", "gptq"], choices=list(RECIPES))
    ap.add_argument("--dir", default=tempfile.gettempdir())
    ap.add_argument("--rss-limit", type=float, default=3.8 * 2**30, help="kill a child past this RSS (bytes)")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "scale.json"))
    ap.add_argument("--merge", nargs="+", help="only merge the rows (but the tiny ones) of these result files into "
                                               "--out and redraw its plot; nothing is run")
    ap.add_argument("--gptq-layer", nargs=2, type=int, metavar=("K", "N"),
                    help="only measure GPTQ on one [K, N] kernel (e.g. 11008 4096: a 7B down_proj) and add it to --out")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(REPO / "benchmarks"))
    from timing import environment

    if args.gptq_layer:  # one layer through GPTQ in a fresh process: its rise of the peak over its inputs
        env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu", "OPENBLAS_NUM_THREADS": "1",
               "XLA_FLAGS": "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"}
        out = subprocess.run([sys.executable, "-c", _LAYER, *map(str, args.gptq_layer), str(REPO / RECIPES["gptq"])],
                             env=env, cwd=REPO, capture_output=True, text=True, check=True).stdout
        result = json.loads(Path(args.out).read_text())
        result["gptq_layer"] = json.loads(out.strip().splitlines()[-1])
        Path(args.out).write_text(json.dumps(result, indent=1))
        print(json.dumps(result["gptq_layer"]))
        return 0
    if args.merge:
        result = json.loads(Path(args.out).read_text())
        for f in args.merge:
            other = json.loads(Path(f).read_text())
            result["rows"] += [r for r in other["rows"] if r["model"] != "tiny"]
            result.setdefault("merged", []).append({"file": Path(f).name, "meta": other["meta"]})
        Path(args.out).write_text(json.dumps(result, indent=1))
        plot(result, Path(args.out).with_suffix(".png"))
        return 0

    work = Path(tempfile.mkdtemp(prefix="jq-scale-", dir=args.dir))
    rows = []
    try:
        sizes = [(s, SIZES[s]) for s in args.sizes]
        big = [(f"{b}-{args.big_layers}blocks", SIZES[b][:2] + (args.big_layers,) + SIZES[b][3:]) for b in args.big]
        todo = [("tiny", SIZES["tiny"])] + sizes[:1] + big + sizes[1:]  # the few-block 7B early: it is the point
        for name, dims in todo:
            src = work / name
            n = write_hf(src, dims)
            for method in args.methods:
                r = run_child(src, RECIPES[method], work / f"{name}-{method}", dims[5], args.rss_limit)
                shutil.rmtree(work / f"{name}-{method}", ignore_errors=True)
                hd = dims[0] // dims[3]
                block = dims[0] * hd * (2 * dims[3] + 2 * dims[4]) + 3 * dims[0] * dims[1] + 2 * dims[0]
                rows.append({"model": name, "method": method, "params": n, "dim": dims[0], "mlp": dims[1],
                             "layers": dims[2], "vocab": dims[5], "tied": dims[6], "block_params": block,
                             "source_bytes": (src / "model.safetensors").stat().st_size, **r})
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
                summarize(rows, args, environment)  # after every run: a partial result survives an interruption
            shutil.rmtree(src)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def summarize(rows: list[dict], args, environment) -> None:
    """Fixed overhead, per-row bytes per parameter, least-squares slopes; writes the JSON and the PNG."""
    base = {r["method"]: r["peak_rss_bytes"] for r in rows if r["model"] == "tiny"}
    fits = {}
    for m in args.methods:
        pts = [r for r in rows if r["method"] == m and r["model"] in args.sizes]
        for r in [r for r in rows if r["method"] == m and m in base]:
            r["rss_over_fixed_bytes"] = r["peak_rss_bytes"] - base[m]
            r["peak_rss_bytes_per_param"] = r["peak_rss_bytes"] / r["params"]
        if len(pts) >= 2:
            x, y, t, c = (np.array([r[k] for r in pts], float)
                          for k in ("params", "peak_rss_bytes", "wall_seconds", "cpu_seconds"))
            fits[m] = {"rss_bytes_per_param": float(np.polyfit(x, y, 1)[0]),
                       "wall_seconds_per_billion_params": float(np.polyfit(x, t, 1)[0] * 1e9),
                       "cpu_seconds_per_billion_params": float(np.polyfit(x, c, 1)[0] * 1e9)}
    result = {"rows": rows, "fixed_overhead_bytes": base, "fits": fits,
              "meta": environment(calibration="8 x 128 random token ids", xla_threads=1,
                                  recipes=RECIPES, rss_limit=args.rss_limit)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    plot(result, Path(args.out).with_suffix(".png"))


def plot(result: dict, path: Path) -> None:
    """Wall time and peak RSS against parameters, one line per method; the few-block 7B shape marked apart."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    every = [r["params"] / 1e9 for r in result["rows"] if r["model"] != "tiny"]
    if every:
        xs = np.linspace(0, max(every), 20)
        b.plot(xs, 4e9 * xs / 2**30, "--", color="gray", lw=1, label="float32 model (4 B / param)")
    for m, color in (("rtn", "tab:blue"), ("gptq", "tab:red")):
        rows = [r for r in result["rows"] if r["method"] == m and r["model"] != "tiny"]
        if not rows:
            continue
        full = sorted((r for r in rows if "blocks" not in r["model"]), key=lambda r: r["params"])
        big = [r for r in rows if "blocks" in r["model"]]
        for ax, key, scale in ((a, "cpu_seconds", 1), (b, "peak_rss_bytes", 2**-30)):
            ax.plot([r["params"] / 1e9 for r in full], [r[key] * scale for r in full], "o-", color=color, label=m)
            for r, marker in zip(big, "sD^v"):
                ax.plot(r["params"] / 1e9, r[key] * scale, marker, color=color, mfc="none", ms=9,
                        label=f"{m}, {r['model']}")
        if m in result["fixed_overhead_bytes"]:
            b.axhline(result["fixed_overhead_bytes"][m] * 2**-30, color=color, ls=":", lw=1)
    a.set(xlabel="parameters (billions)", ylabel="CPU seconds (1 XLA thread)", title="time")
    b.set(xlabel="parameters (billions)", ylabel="peak RSS (GiB)", title="peak host memory (dotted: tiny model)")
    for ax in (a, b):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.suptitle("streaming conversion of synthetic Llama-shaped models (bf16 safetensors source)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
