"""PyTorch's built-in quantized matmuls on the shapes `benchmarks/kernels.py` times, for the side-by-side the GPU issue
(#19) asks for: the bf16 `torch.matmul`, `torch.ops.aten._weight_int4pack_mm` (int4 weight-only, groups of 128: the
kernel torchao's int4 path uses), `torch._int_mm` (int8 × int8 → int32) and `torch._scaled_mm` (fp8 e4m3, bf16
out). Writes OUT/torch_peers.json; every op that refuses a shape or is missing in this torch is recorded with its
error instead of stopping the run. GPU only (these ops are CUDA kernels).

    python benchmarks/torch_peers.py [--out out] [--shapes 4096x4096 ...] [--ms 1 16 2048]

Times: `triton.testing.do_bench` medians (CUDA events, warm-up and repetitions in ms), on random data (never zeros),
one weight per shape. The values are random codes: speed does not depend on them, and the int4 layout is made by
torch's own `_convert_weight_to_int4pack`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

SHAPES = ["4096x4096", "4096x11008", "11008x4096", "4096x14336", "14336x4096"]
MS = [1, 4, 16, 64, 256, 2048, 4096]
GROUP = 128


def _bench(fn) -> float:
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=25, rep=100, return_mode="median")) * 1e-3  # seconds


def peers(torch, k: int, n: int, m: int) -> dict[str, dict]:
    """{op: {"time_s": …} or {"error": …}} for one shape and token count."""
    dev, out = "cuda", {}
    g = torch.Generator(device=dev).manual_seed(k * 7 + n * 3 + m)
    x = torch.randn(m, k, device=dev, dtype=torch.bfloat16, generator=g)
    w = torch.randn(k, n, device=dev, dtype=torch.bfloat16, generator=g) * 0.02

    def run(name, make):
        try:
            fn = make()
            fn()
            torch.cuda.synchronize()
            out[name] = {"time_s": _bench(fn)}
        except Exception as e:  # an op this torch lacks or a shape it refuses: a finding, recorded
            out[name] = {"error": f"{type(e).__name__}: {e}"[:300]}

    run("bf16_matmul", lambda: (lambda: torch.matmul(x, w)))

    def int4():
        codes = torch.randint(0, 16, (n, k), device=dev, dtype=torch.int32, generator=g)
        packed_bytes = (codes[:, ::2] << 4 | codes[:, 1::2]).to(torch.uint8)           # [N, K/2]
        packed = torch.ops.aten._convert_weight_to_int4pack(packed_bytes, 8)
        sz = torch.randn(k // GROUP, n, 2, device=dev, dtype=torch.bfloat16, generator=g) * 0.01
        return lambda: torch.ops.aten._weight_int4pack_mm(x, packed, GROUP, sz)

    run("int4_weight_only_g128", int4)

    def int8():
        a = torch.randint(-127, 128, (max(m, 17), k), device=dev, dtype=torch.int8, generator=g)  # _int_mm: M > 16
        b = torch.randint(-127, 128, (k, n), device=dev, dtype=torch.int8, generator=g)
        return lambda: torch._int_mm(a, b)

    run("int8_int_mm", int8)

    def fp8():
        rows = max(16, -(-m // 16) * 16)  # _scaled_mm wants multiples of 16
        a = torch.randn(rows, k, device=dev, generator=g).to(torch.float8_e4m3fn)
        b = torch.randn(n, k, device=dev, generator=g).to(torch.float8_e4m3fn).t()  # column-major [K, N]
        one = torch.ones((), device=dev, dtype=torch.float32)
        return lambda: torch._scaled_mm(a, b, scale_a=one, scale_b=one, out_dtype=torch.bfloat16)

    run("fp8_scaled_mm", fp8)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="out")
    ap.add_argument("--shapes", nargs="*", default=SHAPES, help="KxN weight shapes")
    ap.add_argument("--ms", nargs="*", type=int, default=MS, help="token counts M")
    args = ap.parse_args()
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("torch_peers: no CUDA device; these peers are GPU kernels")
    rows = []
    for s in args.shapes:
        k, n = map(int, s.split("x"))
        for m in args.ms:
            res = peers(torch, k, n, m)
            base = res["bf16_matmul"].get("time_s")
            for op, r in res.items():
                row = {"shape": [k, n], "M": m, "op": op, **r}
                if base and "time_s" in r:
                    row["speedup_vs_bf16"] = base / r["time_s"]
                rows.append(row)
                what = f"{r['time_s'] * 1e6:9.1f} us" if "time_s" in r else r["error"][:90]
                print(f"{s:>11} M={m:<5} {op:<22} {what}", flush=True)
    meta = {"torch": torch.__version__, "device": torch.cuda.get_device_name(), "cuda": torch.version.cuda}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "torch_peers.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
