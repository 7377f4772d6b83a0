"""Formats users hold and serve, measured on the real models: each GGUF read natively (its blocks as QTensors) against
the same file dequantized to float — perplexity, bits per linear weight, size — the native SmolLM2 through the
W4A16 / W8A16 kernels in interpret mode on the first window, the GGUF export's byte-for-byte round trip, and a
recipe exported to each Hugging Face format and read back. Writes OUT/native_formats.json.

    python benchmarks/native_formats.py [--out out] [--windows 16] [--skip-gemma]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path

import numpy as np
from gguf import GGUFReader

from jq.apps import pipeline
from jq.apps.data import default_eval_text
from jq.apps.export import export_hf
from jq.models import load_model
from jq.models.io.gguf_write import export_gguf
from jq.models.io.hub import resolve_model
from jq.pallas_kernels import force_interpret
from jq.tree.recipe import load_recipe
from timing import environment  # benchmarks/ is on sys.path when a script here runs

KEYS = ("perplexity", "linear_bits_per_weight", "bits_per_weight", "model_bytes", "eval_seconds")


def _eval(m, text: str, windows: int, recipe=None, **kw) -> dict:
    r = pipeline.evaluate(m, text, recipe, windows=windows, **kw)
    return {k: r[k] for k in KEYS} | ({"native": r["native"]} if "native" in r else {})


def gguf_rows(name: str, text: str, windows: int, kernels: bool) -> dict:
    """Float (dequantized) against native for one GGUF model, and optionally the native model's first window through
    the interpreted kernels against the XLA fallback."""
    out = {"float": _eval(pipeline.load(name), text, windows)}
    native = pipeline.load(name, native=True)
    out["native"] = _eval(native, text, windows)
    if kernels:
        out["native_xla_1_window"] = _eval(native, text, 1, batch_size=1)
        with force_interpret():
            out["native_interpret_kernels_1_window"] = _eval(native, text, 1, batch_size=1)
    return out


def gguf_round_trip(name: str) -> dict:
    """Export the natively read model and compare every tensor's type and bytes with the source file."""
    m = pipeline.load(name, native=True)
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        report = export_gguf(m.params, m.cfg, m.family, m.source, Path(d) / "out.gguf")
        seconds = time.perf_counter() - t0
        a, b = GGUFReader(m.source), GGUFReader(str(Path(d) / "out.gguf"))
        same = sum(ta.name == tb.name and ta.tensor_type == tb.tensor_type and
                   np.array_equal(np.asarray(ta.data), np.asarray(tb.data)) for ta, tb in zip(a.tensors, b.tensors))
    return {"tensors": len(a.tensors), "identical_tensors": int(same), "exact_rows": sum(r["exact"] for r in report),
            "export_seconds": seconds}


def hf_round_trips(name: str, recipe: str, text: str, windows: int) -> dict:
    """Quantize by `recipe`, export to each Hugging Face format (float leaves float32), load the directory back and
    evaluate it beside the recipe's own params."""
    m = pipeline.load(name)
    cfg = load_recipe(recipe)
    params, _ = pipeline.quantize(m, cfg, progress=False)
    out = {"recipe": cfg.name, "jq": _eval(m, text, windows, cfg)}
    for to in ("gptq", "awq", "compressed-tensors"):
        with tempfile.TemporaryDirectory() as d:
            path = export_hf(params, m.cfg, m.family, Path(d) / to, to=to, float_dtype="float32")
            back = dataclasses.replace(load_model(path), tokenizer=m.tokenizer)
            out[to] = _eval(back, text, windows)
    return out


def gguf_grid_recipes(name: str, text: str, windows: int) -> dict:
    """The float model quantized by the llama.cpp-grid recipes (gguf_q4_0 / q4_1 / q8_0): perplexity, and how many
    tensors the GGUF export writes exactly."""
    m = pipeline.load(name)
    out = {}
    for r in ("gguf_q4_0", "gguf_q4_1", "gguf_q8_0"):
        cfg = load_recipe(r)
        params, _ = pipeline.quantize(m, cfg, progress=False)
        with tempfile.TemporaryDirectory() as d:
            rows = export_gguf(params, m.cfg, m.family, m.source, Path(d) / "o.gguf")
        out[r] = _eval(m, text, windows, cfg) | {"exported_exactly": sum(x["exact"] for x in rows),
                                                  "tensors": len(rows)}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="out")
    p.add_argument("--windows", type=int, default=16)
    p.add_argument("--skip-gemma", action="store_true", help="SmolLM2 only (Gemma 3 270M takes a few minutes)")
    args = p.parse_args()
    text = default_eval_text().read_text(encoding="utf-8")
    t0 = time.perf_counter()
    res = {"meta": environment(windows=args.windows, window=512, text=default_eval_text().name,
                               date=time.strftime("%Y-%m-%d"))}
    res["smollm2-135m"] = gguf_rows("smollm2-135m", text, args.windows, kernels=True)
    res["smollm2-135m"]["gguf_round_trip"] = gguf_round_trip("smollm2-135m")
    res["smollm2-135m"]["hf_round_trips"] = hf_round_trips("smollm2-135m", "rtn_w4_g64", text, args.windows)
    res["smollm2-135m"]["gguf_grid_recipes"] = gguf_grid_recipes("smollm2-135m", text, args.windows)
    if not args.skip_gemma:
        res["gemma3-270m"] = gguf_rows("gemma3-270m", text, args.windows, kernels=False)
        res["gemma3-270m"]["source_bytes"] = resolve_model("gemma3-270m").stat().st_size
    res["meta"]["seconds"] = time.perf_counter() - t0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "native_formats.json").write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
