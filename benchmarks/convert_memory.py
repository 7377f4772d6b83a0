"""Peak host memory of streaming conversion (`jq.apps.convert`) on a synthetic ~1.5 B-parameter checkpoint.

    python benchmarks/convert_memory.py [--params 1.5e9] [--dir /tmp] [--recipe configs/rtn_w4_g128_pad.yaml]

1. Writes a float32 Orbax checkpoint with Llama-3.2-1B shapes (dim 2048, MLP 8192, GQA 32/8 heads, vocab 128256,
   untied head; the layer count is set to reach --params; smaller --params also shrink the widths) leaf by leaf
   with Orbax partial saves, so this process never holds the model either (fine for ~150 leaves; Orbax's partial
   saves slow down with the cube of the leaf count). Free disk space is checked first (input + output + 10 %).
2. Converts a tiny checkpoint (width 256, one layer, 8 MiB largest tensor) the same way in a subprocess: its peak
   RSS is the *fixed overhead* (Python, jax, Orbax and jq imports, XLA's CPU client and compilation, Orbax's
   thread pools) that does not depend on the model. The bare import cost is reported too.
3. Converts the full checkpoint by the recipe in a subprocess, which reports its own peak RSS (VmHWM).

Requirement checked: peak RSS < 2 x the largest tensor + the fixed overhead. Writes out/convert_memory.json.
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

# (dim, mlp, vocab, heads, kv_heads): Llama-3.2-1B first, narrower ones for small --params
WIDTHS = [(2048, 8192, 128256, 32, 8), (1024, 4096, 32000, 16, 4), (512, 2048, 32000, 8, 2), (256, 1024, 8192, 4, 1)]


def shapes_for(n_params: float) -> dict[str, tuple[int, ...]]:
    """Parameter path -> shape of a Llama-style tree with about `n_params` parameters."""
    for dim, mlp, vocab, heads, kv in WIDTHS:
        hd = dim // heads
        layer = {"attn/q_proj/kernel": (dim, heads * hd), "attn/k_proj/kernel": (dim, kv * hd),
                 "attn/v_proj/kernel": (dim, kv * hd), "attn/o_proj/kernel": (heads * hd, dim),
                 "mlp/gate_proj/kernel": (dim, mlp), "mlp/up_proj/kernel": (dim, mlp), "mlp/down_proj/kernel": (mlp, dim),
                 "input_norm/scale": (dim,), "post_attn_norm/scale": (dim,)}
        per_layer = sum(int(np.prod(s)) for s in layer.values())
        fixed = 2 * vocab * dim + dim
        if fixed + 2 * per_layer <= n_params or dim == WIDTHS[-1][0]:
            n_layers = max(1, round((n_params - fixed) / per_layer))
            out = {"embed/embedding": (vocab, dim)}
            for i in range(n_layers):
                out |= {f"layers_{i}/{k}": v for k, v in layer.items()}
            return out | {"final_norm/scale": (dim,), "lm_head/kernel": (dim, vocab)}
    raise AssertionError("unreachable")


def write_source(path: Path, shapes: dict[str, tuple[int, ...]]) -> float:
    """A plain float32 Orbax checkpoint {"params": tree}, written one leaf per Orbax partial save."""
    import orbax.checkpoint.experimental.v1 as ocp

    t0 = time.perf_counter()
    rng = np.random.default_rng(0)
    for i, (p, shape) in enumerate(shapes.items()):
        w = np.ones(shape, np.float32) if p.endswith("scale") else rng.standard_normal(shape, np.float32) * 0.02
        node: dict = {}
        tree = {"params": node}
        *heads, last = p.split("/")
        for h in heads:
            node = node.setdefault(h, {})
        node[last] = w
        ocp.partial.save(path, tree)
        del w, tree, node
        if i % 20 == 0:
            print(f"  source: {i + 1}/{len(shapes)} leaves", file=sys.stderr, flush=True)
    ocp.partial.finalize(path)
    return time.perf_counter() - t0


def du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


# The child reports its own VmHWM (peak RSS of its address space, which starts fresh at exec) and, after every leaf
# (hooked on convert's per-leaf heap trim), its RSS; ru_maxrss from wait4 is not used: after fork it starts from
# the parent's RSS, which would count this process.
_CHILD = """
import json, sys
from jq.apps import convert as conv

def status():
    return {l.split(':')[0]: int(l.split()[1]) * 1024 for l in open('/proc/self/status')
            if l.startswith(('VmRSS', 'VmHWM'))}

trace, trim = [], conv._trim_heap

def traced_trim():
    trim()
    s = status()
    trace.append((s['VmRSS'], s['VmHWM']))

conv._trim_heap = traced_trim
if len(sys.argv) > 1:
    conv.convert(sys.argv[1], sys.argv[2], sys.argv[3], progress=False)
else:
    import jax, orbax.checkpoint
print(json.dumps({'trace': trace, 'hwm': status()['VmHWM']}))
"""


def run_child(*argv: str) -> dict:
    """`python -c _CHILD ARGV` (a conversion, or only the imports): wall / CPU time, peak RSS and RSS trace."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", _CHILD, *argv], env=env, cwd=REPO, stdout=subprocess.PIPE, text=True)
    stdout = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise RuntimeError(f"python -c _CHILD {' '.join(argv)} exited with {code}")
    rep = json.loads(stdout.strip().splitlines()[-1])
    return {"wall_seconds": wall, "cpu_seconds": usage.ru_utime + usage.ru_stime, "peak_rss_bytes": rep["hwm"],
            "rss_after_leaf": [r for r, _ in rep["trace"]], "hwm_after_leaf": [h for _, h in rep["trace"]]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", type=float, default=1.5e9, help="parameters of the synthetic model (default 1.5e9)")
    ap.add_argument("--dir", default=tempfile.gettempdir(), help="where the temporary checkpoints go (default /tmp)")
    ap.add_argument("--recipe", default=str(REPO / "configs" / "rtn_w4_g128_pad.yaml"))
    ap.add_argument("--out", default=str(REPO / "out" / "convert_memory.json"))
    ap.add_argument("--keep", action="store_true", help="keep the checkpoints")
    args = ap.parse_args(argv)

    shapes = shapes_for(args.params)
    n = sum(int(np.prod(s)) for s in shapes.values())
    largest_path = max(shapes, key=lambda p: int(np.prod(shapes[p])))
    largest = int(np.prod(shapes[largest_path])) * 4
    need = int(4 * n * 1.6)  # fp32 input + output (<= 0.5 of the input here) + 10 %
    free = shutil.disk_usage(args.dir).free
    if free < need:
        raise SystemExit(f"{args.dir} has {free / 1e9:.1f} GB free, {need / 1e9:.1f} GB are needed for {n / 1e9:.2f} B "
                         f"parameters; pass a smaller --params or another --dir")
    work = Path(tempfile.mkdtemp(prefix="jq-convert-memory-", dir=args.dir))
    try:
        print(f"{n / 1e9:.3f} B params, largest tensor {largest_path} {shapes[largest_path]} = {largest / 2**20:.0f} MiB; "
              f"writing the source in {work}", file=sys.stderr)
        src_seconds = write_source(work / "src", shapes)
        # the fixed overhead: a tiny model through the same code path
        write_source(work / "tiny", shapes_for(1e6))
        base = run_child(str(work / "tiny"), args.recipe, str(work / "qtiny"))
        imports = run_child()["peak_rss_bytes"]
        print(f"fixed overhead (tiny model): peak RSS {base['peak_rss_bytes'] / 2**20:.0f} MiB; imports alone "
              f"{imports / 2**20:.0f} MiB", file=sys.stderr)
        run = run_child(str(work / "src"), args.recipe, str(work / "q"))
        in_bytes, out_bytes = du(work / "src"), du(work / "q")
        rss = run["rss_after_leaf"]
        k = max(1, len(rss) // 10)
        steady = {"first_10pct_median": int(np.median(rss[:k])), "last_10pct_median": int(np.median(rss[-k:])),
                  "max": int(max(rss))}
        # the largest jump of the high-water mark within one leaf, over the RSS before that leaf
        jumps = [run["hwm_after_leaf"][i] - (rss[i - 1] if i else base["peak_rss_bytes"]) for i in range(len(rss))]
        bound = 2 * largest + base["peak_rss_bytes"]
        result = {
            "params": n, "layers": sum(p.endswith("q_proj/kernel") for p in shapes), "recipe": Path(args.recipe).name,
            "largest_tensor": {"path": largest_path, "shape": list(shapes[largest_path]), "bytes": largest},
            "input_bytes": in_bytes, "output_bytes": out_bytes, "output_over_input": out_bytes / in_bytes,
            "source_write_seconds": src_seconds,
            "convert_wall_seconds": run["wall_seconds"], "convert_cpu_seconds": run["cpu_seconds"],
            "peak_rss_bytes": run["peak_rss_bytes"],
            "fixed_overhead_bytes": base["peak_rss_bytes"], "import_rss_bytes": imports,
            "fixed_overhead_note": "peak RSS of the same convert on a tiny model (width 256, 1 layer): imports, XLA "
                                   "client and compilation, Orbax thread pools",
            "bound_bytes": bound, "within_bound": run["peak_rss_bytes"] < bound,
            "peak_rss_over_largest_tensor": run["peak_rss_bytes"] / largest,
            "rss_between_leaves": steady,
            "largest_in_leaf_rise_bytes": int(max(jumps)),
            "largest_in_leaf_rise_over_largest_tensor": max(jumps) / largest,
            "rss_after_leaf_mib": [round(r / 2**20) for r in rss],
            "cpus": os.cpu_count(),
        }
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1))
        print(json.dumps(result, indent=1))
        return 0 if result["within_bound"] else 1
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
