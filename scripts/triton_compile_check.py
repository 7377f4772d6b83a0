"""Compile the Pallas GPU kernels down to sm_90 cubins without a GPU: a check of Triton lowering + compilation.

Two steps, two Pythons (jaxlib carries Pallas's Triton *lowering*; the `triton` package the *compiler* and ptxas):

    .venv/bin/python scripts/triton_compile_check.py dump /tmp/ttir            # Triton IR of every candidate
    python -m venv /tmp/tvenv && /tmp/tvenv/bin/pip install triton
    /tmp/tvenv/bin/python scripts/triton_compile_check.py compile /tmp/ttir    # ttir -> ttgir -> ptx -> cubin

`dump` lowers each kernel for every autotuner candidate (after fitting) on a Llama shape for the CUDA platform and
writes the Triton IR as text; `compile` compiles each file for compute capability 9.0 and prints its shared
memory, or the error. What it cannot tell: run-time correctness and speed, and differences between the `triton`
release used here and the one inside the jaxlib that runs on the GPU.
"""

from __future__ import annotations

import glob
import os
import re
import sys


def dump(out: str, K: int = 11008, N: int = 4096) -> None:
    os.environ.setdefault("JQ_AUTOTUNE", "0")
    import jax
    import jax.numpy as jnp
    from jax._src.pallas.triton import pallas_call_registration as reg

    import jq.pallas_kernels as pk
    from jq.pallas_kernels import autotune, w4a16, w8a16
    from jq.pallas_kernels.common import Mode, fit_blocks

    captured: list[str] = []
    lower = reg.lowering.lower_jaxpr_to_triton_module

    def capture(*a, **kw):
        r = lower(*a, **kw)
        captured.append(r.module.operation.get_asm(enable_debug_info=False))
        return r

    reg.lowering.lower_jaxpr_to_triton_module = capture
    S, mode = jax.ShapeDtypeStruct, Mode("gpu")
    os.makedirs(out, exist_ok=True)
    seen = set()
    for M in (1, 64, 2048):
        for c in autotune.candidate_blocks("gpu", M):
            cases = []
            for dt in (jnp.bfloat16, jnp.float32):
                for g, sym in ((128, False), (32, True)):
                    b = w4a16.fit(c, "gpu", M, K, N, g, dt).blocks
                    f = (lambda x, w, s, z, g=g, sym=sym, b=b: pk.w4a16_matmul(
                        x, w, s, None if sym else z, group_size=g, symmetric=sym, blocks=b, mode=mode))
                    args = (S((M, K), dt), S((K // 2, N), jnp.uint8), S((K // g, N), jnp.float16),
                            S((K // g, N), jnp.uint8))
                    cases.append((f"w4a16_{jnp.dtype(dt).name}_g{g}", b, f, args))
            b = w8a16.fit(c, "gpu", M, K, N, None, jnp.bfloat16).blocks
            cases.append(("w8a16_i8_ch", b, lambda x, w, s, b=b: pk.w8a16_matmul(x, w, s, blocks=b, mode=mode),
                          (S((M, K), jnp.bfloat16), S((K, N), jnp.int8), S((1, N), jnp.float16))))
            b = fit_blocks(c, "gpu", M, K, N, 32, 1, 1).blocks
            for name, fn, cd in (("w8a8_int8", pk.w8a8_int8_matmul, jnp.int8),
                                 ("w8a8_fp8", pk.fp8_matmul, jnp.float8_e4m3fn)):
                cases.append((name, b, lambda *a, fn=fn, b=b: fn(*a, out_dtype=jnp.bfloat16, blocks=b, mode=mode),
                              (S((M, K), cd), S((M, 1), jnp.float32), S((K, N), cd), S((1, N), jnp.float32))))
            for name, b, f, args in cases:
                tag = f"{name}__{b.bm}x{b.bn}x{b.bk}_w{b.num_warps}_s{b.num_stages}"
                if tag in seen:
                    continue
                seen.add(tag)
                captured.clear()
                jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",))
                with open(os.path.join(out, tag + ".ttir"), "w") as fh:
                    fh.write(captured[0])
    print(f"{len(seen)} kernels written to {out}")


def compile_all(src: str, arch: int = 90) -> int:
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    import triton
    from triton.backends.compiler import GPUTarget

    failed = 0
    for path in sorted(glob.glob(os.path.join(src, "*.ttir"))):
        m = re.search(r"_w(\d+)_s(\d+)\.ttir$", path)
        opts = {"num_warps": int(m.group(1)), "num_stages": int(m.group(2))} if m else {}
        name = os.path.basename(path)
        try:
            k = triton.compile(path, target=GPUTarget("cuda", arch, 32), options=opts)
            print(f"{name} OK shared={k.metadata.shared}")
        except Exception as e:
            failed += 1
            print(f"{name} FAIL {type(e).__name__}: {str(e)[:300]}")
    print(f"{failed} failed")
    return failed


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in ("dump", "compile"):
        sys.exit(__doc__)
    if sys.argv[1] == "dump":
        dump(sys.argv[2])
    else:
        sys.exit(1 if compile_all(sys.argv[2]) else 0)
