"""The Pallas kernels compiled on a GPU against the XLA dequantize reference, at the shapes users have (#19, point 1):
group sizes 32 / 64 / 128 and per channel, symmetric and asymmetric, M from 1 to 4096, K and N that are not
multiples of a block. Writes OUT/gpu_check.json; exits 1 when a case fails or falls back where a kernel should run.

    python benchmarks/gpu_check.py [--out out] [--quick]

Per case, fresh random inputs (seeded by the case): x [M, K] bf16, W [K, N] quantized by RTN. The reference is the
same QTensor through `jq.ops` with the kernels off (dequantize + XLA dot; for W8A8 the same quantized activations),
in float32 at HIGHEST precision; the check is ‖out − ref‖ / ‖ref‖ ≤ 1e-2 (bf16 operands) and no NaN. Whether a
kernel took the call is recorded (`kernel_reason`): every case here is one the dispatch table gives a kernel, so a
fallback is a failure. On CPU the kernels run interpreted (`--quick` shapes): that checks the script, not the
hardware.
"""

from __future__ import annotations

import argparse
import json
import os
import time
import zlib
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import jq
from kernels import kernel_reason, with_kernels  # benchmarks/ is on sys.path when a script here runs
from timing import environment

SCHEMES = {
    "w4a16_sym_g32": jq.Scheme("int4", group_size=32, pad=True),
    "w4a16_asym_g64": jq.Scheme("int4", symmetric=False, group_size=64, pad=True),
    "w4a16_asym_g128": jq.Scheme("int4", symmetric=False, group_size=128, pad=True),
    "w4a16_sym_channel": jq.Scheme("int4"),
    "w8a16_sym_g128": jq.Scheme("int8", group_size=128, pad=True),
    "w8a16_asym_channel": jq.Scheme("int8", symmetric=False),
    "w8a8_int8": jq.Scheme("int8", act="int8", scale_dtype="float32"),
    "w8a8_fp8": jq.Scheme("fp8_e4m3", act="fp8_e4m3", scale_dtype="float32"),
}
SHAPES = [(4096, 4096), (4096, 11008), (11008, 4096), (1000, 1500), (4104, 1000)]  # the last two: odd K and N
MS = [1, 3, 16, 127, 1024, 4096]
QUICK_SHAPES, QUICK_MS = [(256, 384), (200, 136)], [1, 3, 33]
TOL = 1e-2


def _kernels_on() -> None:
    with_kernels(True)
    if jax.default_backend() == "cpu":
        os.environ["JQ_KERNELS"] = "interpret"  # the only way kernels run here


def check(scheme_name: str, k: int, n: int, m: int) -> dict:
    """One case: the kernel path's relative error against the fallback, and whether a kernel took it."""
    seed = zlib.crc32(f"{scheme_name} {k} {n} {m}".encode())
    rng = np.random.default_rng(seed)
    w = jnp.asarray(rng.standard_normal((k, n), np.float32) * 0.02)
    x = jnp.asarray(rng.standard_normal((m, k), np.float32), jnp.bfloat16)
    cfg = jq.QuantConfig.simple(SCHEMES[scheme_name])
    q = jq.quantize_params({"l": {"kernel": w}}, cfg)["l"]["kernel"]
    with_kernels(False)
    ref = jax.jit(lambda x, q: jq.ops.qdot(x, q, precision=jax.lax.Precision.HIGHEST).astype(jnp.float32))(x, q)
    _kernels_on()
    reason = kernel_reason(x, q)
    out = jax.jit(lambda x, q: jq.ops.qdot(x, q).astype(jnp.float32))(x, q)
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    err = float(np.linalg.norm(out - ref) / max(np.linalg.norm(ref), 1e-30))
    ok = bool(np.isfinite(out).all() and err <= TOL and reason is None)
    return {"scheme": scheme_name, "K": k, "N": n, "M": m, "rel_err": err, "kernel": reason is None,
            "fallback_reason": reason, "ok": ok}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="out")
    ap.add_argument("--quick", action="store_true", help="small shapes and few M (implied on CPU)")
    ap.add_argument("--schemes", nargs="*", default=list(SCHEMES), choices=list(SCHEMES))
    args = ap.parse_args()
    quick = args.quick or jax.default_backend() == "cpu"
    shapes, ms = (QUICK_SHAPES, QUICK_MS) if quick else (SHAPES, MS)
    rows, t0 = [], time.perf_counter()
    for name in args.schemes:
        for k, n in shapes:
            for m in ms:
                try:
                    r = check(name, k, n, m)
                except Exception as e:  # a kernel that fails to build is a finding, not the end of the run
                    r = {"scheme": name, "K": k, "N": n, "M": m, "ok": False, "error": f"{type(e).__name__}: {e}"[:500]}
                rows.append(r)
                state = "ok" if r["ok"] else "FAIL"
                detail = r.get("error") or f"rel_err {r['rel_err']:.2e}" + ("" if r["kernel"] else
                                                                           f" fallback: {r['fallback_reason']}")
                print(f"{state:4} {name:<19} K={k:<5} N={n:<5} M={m:<5} {detail[:160]}", flush=True)
    failed = [r for r in rows if not r["ok"]]
    res = {"environment": environment(), "tolerance": TOL, "seconds": time.perf_counter() - t0,
           "cases": len(rows), "failed": len(failed), "rows": rows}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "gpu_check.json").write_text(json.dumps(res, indent=1) + "\n")
    print(f"{len(rows) - len(failed)} of {len(rows)} cases pass ({res['seconds']:.0f} s)")
    raise SystemExit(1 if failed else 0)


if __name__ == "__main__":
    main()
