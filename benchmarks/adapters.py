"""Adapters on quantized SmolLM2-135M: post-training rows (LoftQ's start vs QLoRA's, LoRC) and fine-tuning rows
(`jq qat --lora / --qalora / --peqa` results), in one table.

    python benchmarks/adapters.py ptq --bits 3 2 --rank 16          # LoftQ starts and LoRC, measured here
    python benchmarks/adapters.py add ROW qat_result.json           # a `jq qat` JSON result (start → end)
    python benchmarks/adapters.py table                             # Markdown table of every row

Protocol as the README's: perplexity on the first 16 windows of 512 tokens of persuasion.txt; LoRC's input
Hessians from 64 windows of 512 tokens of the four other Austen books (seed 0), captured on the float model.
QLoRA's zero-initialised adapters start at the plain PTQ model, so its start is the RTN row. Bits per weight
are the linear layers' stored bits: LoRC's float16 factors are counted, LoftQ's adapters (trained, float32) are
reported as a parameter count beside the base's bits. Results: benchmarks/results/adapters.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "adapters.json"


def _rows() -> list[dict]:
    return json.loads(RESULTS.read_text())["rows"] if RESULTS.exists() else []


def _save(rows: list[dict]) -> None:
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"model": "smollm2-135m", "rows": rows}, indent=1) + "\n")


def _put(row: dict) -> None:
    rows = [r for r in _rows() if r["row"] != row["row"]]
    _save(rows + [row])
    print(json.dumps(row), flush=True)


def _commit() -> str:
    out = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return out.stdout.strip()


def ptq(bits: list[int], rank: int, loftq_steps: int) -> None:
    """Measure plain RTN, LoftQ's start and LoRC (weighted and plain SVD) at each bit width."""
    import jq
    from jq import adapters as A
    from jq.apps import data, pipeline
    from jq.apps.perplexity import perplexity
    from jq.calibration.capture import batched, capture
    from jq.tree.report import size_summary

    m = pipeline.load("smollm2-135m")
    ids, bos = data.text_ids(m.tokenizer, data.default_eval_text().read_text(encoding="utf-8"))
    fwd = pipeline.quantized_forward(m.cfg)

    def ppl(params):
        return perplexity(fwd, params, ids, window=512, windows=16, bos=bos)["perplexity"]

    calib, _ = data.calibration_draw(m.tokenizer, data.default_calib_files(), 64, 512, 0)
    t0 = time.perf_counter()
    stats = capture(m.family.module(m.cfg), {"params": m.params}, batched(calib, 8))
    capture_s = time.perf_counter() - t0
    cfg = A.LoraConfig(rank=rank, alpha=rank)  # scale 1: the factors are the SVD's
    done = {r["row"] for r in _rows()}  # rows already measured are kept (delete them from the JSON to re-measure)
    for b in bits:
        recipe = jq.load_recipe(REPO / "configs" / f"qat_w{b}_g128.yaml")
        base = jq.quantize_params(m.params, recipe)
        bpw = size_summary(base)["linear_bits_per_weight"]
        if f"rtn_w{b}_g128 (QLoRA's start)" not in done:
            _put({"row": f"rtn_w{b}_g128 (QLoRA's start)", "bits": bpw, "start": ppl(base), "commit": _commit()})
        for weighted in (False, True):
            name = f"LoftQ int{b} g128 r{rank} start ({loftq_steps} steps{', weighted' if weighted else ''})"
            if name in done:
                continue
            t0 = time.perf_counter()
            qp, ad, res = A.loftq.init(m.params, recipe, cfg, steps=loftq_steps, stats=stats if weighted else None)
            loftq_s = time.perf_counter() - t0
            mean = [sum(r[t] for r in res.values()) / len(res) for t in range(loftq_steps + 1)]
            _put({"row": name, "bits": bpw, "adapter_params": A.count(ad), "start": ppl(A.combine(qp, ad, cfg)),
                  "seconds": loftq_s, "mean_relative_residual": mean, "commit": _commit()})
        for weighted in (True, False):
            name = f"LoRC int{b} g128 r{rank} ({'activation-weighted' if weighted else 'plain'} SVD, PTQ)"
            if name in done:
                continue
            t0 = time.perf_counter()
            lq = A.lorc.compensate(m.params, base, rank, stats if weighted else None)
            _put({"row": name, "bits": size_summary(lq)["linear_bits_per_weight"], "start": ppl(lq),
                  "seconds": time.perf_counter() - t0 + (capture_s if weighted else 0.0), "commit": _commit()})


def add(row: str, path: Path, start: float | None = None, bits: float | None = None,
        commit: str | None = None) -> None:
    """A `jq qat` result (its JSON line) as a row: start → end perplexity, trainable params, memory, tokens/s. A QAT
    run from RTN records no start: give it (`--start`, the RTN row's perplexity) and its `--bits`."""
    res = json.loads(path.read_text().strip().splitlines()[-1])
    ad = res.get("adapters", {})
    start = start or (ad.get("start_eval") or {}).get("perplexity") or (res.get("init_recipe") or {}).get(
        "eval", {}).get("perplexity")
    _put({"row": row, "bits": bits or ad.get("base_bits_per_weight"), "trainable_params": ad.get("trainable_params"),
          "steps": res["steps"], "start": start, "end": res["eval"]["perplexity"],
          "tokens_per_second": res.get("tokens_per_second"), "train_seconds": res.get("train_seconds"),
          "memory": res.get("memory"), "commit": commit or _commit()})


def table() -> None:
    """Print every row as Markdown: bits, trainable parameters, steps, start → end perplexity, memory, tokens/s."""
    print("| row | linear bits/weight | trainable params | steps | start → end perplexity | train state MB (10⁶ B) | "
          "peak RSS GiB | tokens/s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in _rows():
        mem = r.get("memory") or {}
        end = f" → **{r['end']:.2f}**" if r.get("end") is not None else ""
        params = r.get("trainable_params") or r.get("adapter_params")
        cells = [r["row"], f"{r['bits']:.2f}" if r.get("bits") else "—", f"{params:,}" if params else "—",
                 str(r.get("steps", 0)), f"{r['start']:,.2f}{end}",
                 f"{mem['train_state_bytes'] / 1e6:,.1f}" if mem else "—",
                 f"{mem['peak_rss_mb'] / 1024:.1f}" if mem else "—",
                 f"{r['tokens_per_second']:.0f}" if r.get("tokens_per_second") else "—"]
        print("| " + " | ".join(cells) + " |")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("ptq")
    a.add_argument("--bits", type=int, nargs="+", default=[3, 2])
    a.add_argument("--rank", type=int, default=16)
    a.add_argument("--loftq-steps", type=int, default=3)
    b = sub.add_parser("add")
    b.add_argument("row")
    b.add_argument("result", type=Path)
    b.add_argument("--start", type=float, help="start perplexity when the result has none (QAT from RTN)")
    b.add_argument("--bits", type=float, help="linear bits/weight when the result has none")
    b.add_argument("--commit", help="the commit the run used (default: HEAD)")
    sub.add_parser("table")
    args = p.parse_args(argv)
    if args.cmd == "ptq":
        ptq(args.bits, args.rank, args.loftq_steps)
    elif args.cmd == "add":
        add(args.row, args.result, args.start, args.bits, args.commit)
    else:
        table()
    return 0


if __name__ == "__main__":
    sys.exit(main())
