"""The `jq` command line: eval, quantize, inspect. Nothing imports this module."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def _console():
    from rich.console import Console

    return Console(width=None if sys.stdout.isatty() else 120)


def _recipe(path):
    from jq.config import load_recipe

    return load_recipe(path) if path else None


def _calibration(args, m, recipe, eval_text=None):
    """Calibration tokens when the recipe needs data (None otherwise)."""
    if recipe is None or not recipe.needs_calibration:
        return None
    from jq.models import pipeline

    files = [Path(f) for f in args.calib] if args.calib else pipeline.default_calib_files(eval_text)
    if not files:
        raise ValueError(f"recipe {recipe.name!r} needs calibration text: pass --calib FILE [FILE ...]")
    for f in files:
        if not f.exists():
            raise FileNotFoundError(f"--calib {f}: no such file")
    return pipeline.calibration_tokens(m.tokenizer, files, args.calib_samples, args.calib_len, args.calib_seed)


def _add_calib_args(p) -> None:
    p.add_argument("--calib", nargs="+", help="calibration text files (default: the Austen books but the eval text)")
    p.add_argument("--calib-samples", type=int, default=128, help="calibration windows (default 128)")
    p.add_argument("--calib-len", type=int, default=512, help="tokens per calibration window (default 512)")
    p.add_argument("--calib-seed", type=int, default=0, help="seed for drawing the windows")


def cmd_eval(args) -> int:
    from jq.models import pipeline

    t0 = time.perf_counter()
    text_path = Path(args.text) if args.text else pipeline.default_eval_text()
    if not text_path.exists():
        raise FileNotFoundError(f"--text {text_path}: no such file")
    recipe = _recipe(args.recipe)
    m = pipeline.load(args.model)
    calib = _calibration(args, m, recipe, text_path)
    load_s = time.perf_counter() - t0
    r = pipeline.evaluate(m, text_path.read_text(encoding="utf-8"), recipe, window=args.window, windows=args.windows,
                          batch_size=args.batch_size, calib=calib, progress=True)
    r.update(text=str(text_path), window=args.window, load_seconds=load_s, seconds=time.perf_counter() - t0)
    if args.json:
        print(json.dumps(r))
        return 0
    from rich.table import Table

    t = Table(title=f"jq eval — {Path(r['model']).name} on {text_path.name}")
    for c in ("recipe", "perplexity", "bits/weight (linear)", "bits/weight (all)", "size MB", "windows", "seconds"):
        t.add_column(c, justify="right")
    t.add_row(r["recipe"], f"{r['perplexity']:.3f}", f"{r['linear_bits_per_weight']:.3f}", f"{r['bits_per_weight']:.3f}",
              f"{r['model_bytes'] / 1e6:.1f}", f"{r['windows']}×{args.window}", f"{r['seconds']:.1f}")
    _console().print(t)
    return 0


def cmd_quantize(args) -> int:
    import jq
    from jq import serialize
    from jq.models import pipeline

    recipe = _recipe(args.recipe)
    m = pipeline.load(args.model)
    calib = _calibration(args, m, recipe)
    t0 = time.perf_counter()
    q, _ = pipeline.quantize(m, recipe, calib)
    secs = time.perf_counter() - t0
    import dataclasses

    meta = {"model": m.source, "model_config": dataclasses.asdict(m.cfg), "recipe": recipe.name,
            "recipe_file": str(args.recipe), "quantize_seconds": secs}
    out = serialize.save(args.out, q, meta, overwrite=args.overwrite)
    rows = jq.report(m.params, q)
    _console().print(jq.format_report(rows, only_quantized=not args.all, title=f"{recipe.name} → {out}"))
    print(f"wrote {out} in {secs:.1f} s (quantize)")
    return 0


def cmd_inspect(args) -> int:
    import jq
    from jq import serialize

    tree, manifest = serialize.load(args.dir)
    rows = jq.report(tree, tree)
    meta = manifest.get("meta", {})
    title = f"{args.dir} — format v{manifest['format_version']}, jq {manifest['jq_version']}, recipe {meta.get('recipe', '?')}"
    _console().print(jq.format_report(rows, title=title))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="jq", description="Quantize and evaluate JAX/Flax models.")
    sub = p.add_subparsers(dest="command", required=True)

    e = sub.add_parser("eval", help="perplexity of a model, float or quantized by a recipe")
    e.add_argument("--model", required=True, help="a .gguf file, a Hugging Face directory, or smollm2-135m")
    e.add_argument("--recipe", help="a YAML recipe (configs/…); omit for the float model")
    e.add_argument("--text", help="evaluation text file (default: persuasion.txt)")
    e.add_argument("--window", type=int, default=512, help="tokens per window (default 512)")
    e.add_argument("--windows", type=int, default=16, help="number of leading windows (default 16)")
    e.add_argument("--batch-size", type=int, default=4, help="windows per forward pass (default 4)")
    e.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    _add_calib_args(e)
    e.set_defaults(fn=cmd_eval)

    q = sub.add_parser("quantize", help="quantize a model by a recipe and write the quantized tree")
    q.add_argument("--model", required=True)
    q.add_argument("--recipe", required=True)
    q.add_argument("--out", required=True, help="output directory (manifest.json + tensors.safetensors)")
    q.add_argument("--overwrite", action="store_true", help="replace an existing --out directory")
    q.add_argument("--all", action="store_true", help="list float leaves in the report too")
    _add_calib_args(q)
    q.set_defaults(fn=cmd_quantize)

    i = sub.add_parser("inspect", help="per-leaf table of a directory written by `jq quantize`")
    i.add_argument("dir")
    i.set_defaults(fn=cmd_inspect)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except (ValueError, FileNotFoundError, FileExistsError, RuntimeError) as e:
        print(f"jq {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
