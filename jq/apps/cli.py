"""The `jq` command line: eval, quantize, inspect, generate. Nothing imports this module."""

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
    from jq.tree.recipe import load_recipe

    return load_recipe(path) if path else None


def _calib_files(args, recipe, eval_text=None) -> list[Path] | None:
    """The calibration files when the recipe needs data (--calib, or the Austen books but the evaluation text),
    each checked to exist and to be UTF-8 text — before the model loads, so a bad file fails in a second, not
    after minutes. None when the recipe needs no data."""
    if recipe is None or not recipe.needs_calibration:
        return None
    from jq.apps import data

    files = [Path(f) for f in args.calib] if args.calib else data.default_calib_files(eval_text)
    if not files:
        raise ValueError(f"recipe {recipe.name!r} needs calibration text: pass --calib FILE [FILE ...]")
    for f in files:
        data.read_text(f, "--calib")
    return files


def _calibration(args, m, recipe, files):
    """(calibration tokens, what was drawn: files / samples / length / seed / sampling) from `files`
    (`_calib_files`), or (None, None) when there are none. The record goes into the result so that a figure names
    its calibration draw."""
    if files is None:
        return None, None
    from jq.apps import data

    return data.calibration_draw(m.tokenizer, files, args.calib_samples, args.calib_len, args.calib_seed,
                                     args.calib_sampling)


def _add_calib_args(p) -> None:
    from jq.apps.data import add_calib_args

    p.add_argument("--calib", nargs="+", help="calibration text files (default: the Austen books but the eval text)")
    add_calib_args(p)


def _add_weight_args(p, recipe_help: str) -> None:
    """--model and the weights it runs with (`_weights`): --recipe, --quantized DIR or --native."""
    p.add_argument("--model", required=True, help=_MODEL_HELP)
    p.add_argument("--recipe", help=recipe_help)
    p.add_argument("--quantized", help="a directory written by `jq quantize --out` (instead of --recipe)")
    p.add_argument("--native", action="store_true", help="the GGUF model as shipped (legacy blocks as QTensors)")


def cmd_eval(args: argparse.Namespace) -> int:
    """`jq eval`: perplexity of the float or recipe-quantized model on a text, as a table or JSON."""
    from jq.apps import data, pipeline

    t0 = time.perf_counter()
    text_path = Path(args.text) if args.text else data.default_eval_text()
    text = data.read_text(text_path, "--text")  # every input is checked before the model loads
    also = {str(f): data.read_text(f, "--also-text") for f in args.also_text or []}
    _one_weight_source(args)
    recipe = _recipe(args.recipe)
    files = _calib_files(args, recipe, text_path)
    m = pipeline.load(args.model, native=args.native)
    data.check_window(m.cfg, args.window, "--window")
    calib, calib_info = _calibration(args, m, recipe, files)
    load_s = time.perf_counter() - t0
    r = pipeline.evaluate(m, text, recipe, window=args.window, windows=args.windows, batch_size=args.batch_size,
                          calib=calib, progress=True, also=also, quantized=args.quantized)
    r.update(text=str(text_path), window=args.window, calibration=calib_info, load_seconds=load_s,
             seconds=time.perf_counter() - t0)
    if args.json:
        print(json.dumps(r))
        return 0
    from rich.table import Table

    t = Table(title=f"jq eval — {Path(r['model']).name} on {text_path.name}")
    for c in ("recipe", "perplexity", "bits/weight (linear)", "bits/weight (all)", "size MB", "windows", "seconds"):
        t.add_column(c, justify="right")
    t.add_row(r["recipe"], f"{r['perplexity']:.3f}", f"{r['linear_bits_per_weight']:.3f}", f"{r['bits_per_weight']:.3f}",
              f"{r['model_bytes'] / 1e6:.1f}", f"{r['windows']}×{args.window}", f"{r['seconds']:.1f}")
    for name, o in r.get("also", {}).items():
        t.add_row(f"  on {Path(name).name}", f"{o['perplexity']:.3f}", "", "", "", f"{o['windows']}×{args.window}", "")
    _console().print(t)
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    """`jq quantize`: quantize a model by a recipe, write the checkpoint and print the per-leaf report."""
    import jq
    from jq import checkpoint
    from jq.apps import pipeline

    recipe = _recipe(args.recipe)
    checkpoint.check_destination(args.out, args.overwrite)  # before minutes of work, not after
    files = _calib_files(args, recipe)
    m = pipeline.load(args.model)
    calib, calib_info = _calibration(args, m, recipe, files)
    t0 = time.perf_counter()
    q, qlog = pipeline.quantize(m, recipe, calib)
    secs = time.perf_counter() - t0
    from jq.models.family import config_dict

    cfg = qlog.get("model_config", m.cfg)  # a rotating recipe may change the config (Llama: an untied LM head)
    meta = {"model": m.source, "model_family": m.family.name, "model_config": config_dict(cfg),
            "recipe_file": str(args.recipe), "calibration": calib_info, "quantize_seconds": secs}
    out = checkpoint.save(args.out, q, recipe=recipe, meta=meta, overwrite=args.overwrite)
    rows = jq.report(pipeline.rotated(m, recipe).params, q)  # errors against the float weights q was made from
    _console().print(jq.format_report(rows, only_quantized=not args.all, title=f"{recipe.name} → {out}"))
    print(f"wrote {out} in {secs:.1f} s (quantize)")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    """Per-leaf table from the checkpoint's metadata, then the integrity check (exit 2 naming the problem)."""
    import jq
    from jq import checkpoint

    meta = checkpoint.read_meta(args.dir)
    tree = checkpoint.abstract_tree(args.dir)
    recipe = (meta.get("recipe") or {}).get("name", "none")
    title = f"{args.dir} — format {meta['format_version']}, jq {meta['jq_version']}, recipe {recipe}"
    _console().print(jq.format_report(jq.report(tree, tree), title=title))
    s = checkpoint.verify(args.dir, read_data=not args.quick)
    what = "shapes, dtypes and layouts" if args.quick else "shapes, dtypes, layouts and CRC-32 of every array"
    print(f"integrity OK: {s['leaves']} leaves ({s['quantized']} quantized), {s['bytes'] / 2**20:.2f} MiB; {what} checked")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    """Stream a float checkpoint / GGUF / HF model through a recipe into a checkpoint (docs/FORMAT.md)."""
    from jq import checkpoint
    from jq.apps.convert import convert

    if args.calib:
        from jq.apps import data

        for f in args.calib:
            data.read_text(f, "--calib")
    t0 = time.perf_counter()
    out = convert(args.input, args.recipe, args.out, dequantize=args.dequantize, progress=True,
                             calib=args.calib, calib_samples=args.calib_samples, calib_len=args.calib_len,
                             calib_seed=args.calib_seed, calib_sampling=args.calib_sampling,
                             overwrite=args.overwrite, native=args.native)
    s = checkpoint.verify(out, read_data=False)
    print(f"wrote {out}: {s['leaves']} leaves ({s['quantized']} quantized), {s['bytes'] / 2**20:.2f} MiB in "
          f"{time.perf_counter() - t0:.1f} s")
    return 0


def _one_weight_source(args: argparse.Namespace) -> None:
    """At most one of --recipe, --quantized DIR and --native, or a ValueError naming the ones given."""
    given = [f for f, v in (("--recipe", args.recipe), ("--quantized", args.quantized), ("--native", args.native)) if v]
    if len(given) > 1:
        raise ValueError(f"{' and '.join(given)} cannot be combined: --recipe quantizes the float model, --quantized "
                         "DIR brings weights a recipe quantized, --native the model as shipped; pass one of them")


def _weights(args: argparse.Namespace):
    """The model and the weights a command runs (`--recipe`, `--quantized DIR`, `--native`, or float): (model, params,
    config, KV-cache config, recipe), every argument checked before the model loads."""
    from jq.apps import pipeline

    _one_weight_source(args)
    recipe = _recipe(args.recipe)
    files = _calib_files(args, recipe)
    m = pipeline.load(args.model, native=args.native)
    params, kv, cfg = m.params, None, m.cfg
    if recipe is not None:
        params, qlog = pipeline.quantize(m, recipe, _calibration(args, m, recipe, files)[0], progress=False)
        cfg, kv = qlog.get("model_config", cfg), recipe.kv_cache  # a rotating recipe unties the LM head
    elif args.quantized:
        params, cfg, kv = pipeline.quantized_weights(m, args.quantized)  # the KV cache of the checkpoint's recipe
    return m, params, cfg, kv, recipe


def cmd_generate(args: argparse.Namespace) -> int:
    """`jq generate`: generate text with the (quantized) model and KV cache; prints the text and tokens/s."""
    from jq.numbers.kvcache import KVCacheConfig
    from jq.apps import generate

    if args.max_new < 1:
        raise ValueError(f"--max-new must be >= 1, got {args.max_new}")
    if (args.kv_group_size or args.kv_rotate or args.kv_keys) and not args.kv:
        raise ValueError("--kv-group-size / --kv-rotate / --kv-keys set the KV cache given by --kv: add --kv "
                         "int8|int4")
    m, params, cfg, kv, recipe = _weights(args)
    if args.kv:
        keys = (args.kv_keys or "token:").partition(":")
        kv = KVCacheConfig(None if args.kv == "float" else args.kv, group_size=args.kv_group_size,
                           rotate=args.kv_rotate, keys=keys[0], key_group=int(keys[2] or 64))
    text, r = generate.generate_text(cfg, params, m.tokenizer, args.prompt, args.max_new, kv, args.temperature,
                                     args.seed, args.max_len, dtype=args.dtype)
    info = {"text": text, "recipe": recipe.name if recipe else args.quantized or ("native" if args.native else "float"),
            "kv_cache": kv.describe() if kv else "float", **r.summary()}
    if args.json:
        print(json.dumps(info))
        return 0
    print(text)
    dec = f"{info['decode_tokens_per_s']:.1f} tok/s" if info["decode_tokens_per_s"] is not None else "no step"
    print(f"prefill: {r.prompt_len} tokens in {r.prefill_seconds:.3f} s ({info['prefill_tokens_per_s']:.1f} tok/s) | "
          f"decode: {r.n_new - 1} tokens in {r.decode_seconds:.3f} s ({dec}) | compile: {r.compile_seconds:.2f} s "
          f"(excluded) | weights: {info['recipe']} | KV cache: {info['kv_cache']}, "
          f"{r.cache_bytes_per_token} B/token, {r.cache_bytes / 1e6:.2f} MB allocated")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """`jq export`: the model (float, --recipe, --quantized or --native) written for a serving engine
    (`jq.apps.export.command`)."""
    from jq.apps.export import command

    if Path(args.out).exists() and not args.overwrite:  # before the model loads
        raise FileExistsError(f"{args.out} exists; choose another --out or pass --overwrite")
    return command(args, _weights(args))


def cmd_autoquant(args: argparse.Namespace) -> int:
    """`jq autoquant`: the per-layer mix of candidate recipes with the least estimated error within a budget, as a
    recipe (`jq.apps.autoquant_cli.command`)."""
    from jq.apps.autoquant_cli import command

    return command(args)


def _known_names() -> str:
    from jq.models.io.hub import KNOWN_MODELS

    return ", ".join(KNOWN_MODELS)


_MODEL_HELP = f"a .gguf file, a Hugging Face directory, or a known model name ({_known_names()})"


def build_parser() -> argparse.ArgumentParser:
    """The parser of the `jq` subcommands (eval, quantize, inspect, convert, generate; `qat` has its own)."""
    p = argparse.ArgumentParser(prog="jq", description="Quantize and evaluate JAX/Flax models.")
    sub = p.add_subparsers(dest="command", required=True)

    e = sub.add_parser("eval", help="perplexity of a model, float or quantized by a recipe")
    _add_weight_args(e, "a YAML recipe (configs/…); omit for the float model")
    e.add_argument("--text", help="evaluation text file (default: persuasion.txt)")
    e.add_argument("--also-text", nargs="+", metavar="FILE",
                   help="more texts scored by the same quantized model (e.g. a text of another kind)")
    e.add_argument("--window", type=int, default=512, help="tokens per window (default 512)")
    e.add_argument("--windows", type=int, default=16, help="number of leading windows (default 16)")
    e.add_argument("--batch-size", type=int, default=4, help="windows per forward pass (default 4)")
    e.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    _add_calib_args(e)
    e.set_defaults(fn=cmd_eval)

    q = sub.add_parser("quantize", help="quantize a model by a recipe and write the quantized tree")
    q.add_argument("--model", required=True, help=_MODEL_HELP)
    q.add_argument("--recipe", required=True)
    q.add_argument("--out", required=True, help="output checkpoint directory (Orbax; see docs/FORMAT.md)")
    q.add_argument("--overwrite", action="store_true", help="replace an existing --out directory")
    q.add_argument("--all", action="store_true", help="list float leaves in the report too")
    _add_calib_args(q)
    q.set_defaults(fn=cmd_quantize)

    i = sub.add_parser("inspect", help="per-leaf table of a checkpoint (jq quantize / convert) and its integrity check")
    i.add_argument("dir")
    i.add_argument("--quick", action="store_true", help="check metadata, shapes and layouts only; skip reading data")
    i.set_defaults(fn=cmd_inspect)

    c = sub.add_parser("convert", help="stream a checkpoint / GGUF / HF model through a recipe into a checkpoint")
    c.add_argument("--in", dest="input", required=True,
                   help="a float Orbax checkpoint, a jq checkpoint, a Hugging Face directory, a .gguf file or a "
                        f"known model name ({_known_names()})")
    c.add_argument("--recipe", help="a YAML recipe (configs/…); optional for a source holding QTensors already (a jq "
                   "checkpoint, a GPTQ / AWQ / compressed-tensors directory, a GGUF with --native)")
    c.add_argument("--native", action="store_true",
                   help="read a GGUF source's legacy blocks and K-quants as the QTensors they are (not dequantized)")
    c.add_argument("--out", required=True, help="output checkpoint directory (Orbax; see docs/FORMAT.md)")
    c.add_argument("--dequantize", action="store_true",
                   help="write float weights: dequantize a jq checkpoint, or quantize-dequantize by the recipe")
    c.add_argument("--overwrite", action="store_true", help="replace an existing --out directory")
    _add_calib_args(c)
    c.set_defaults(fn=cmd_convert)

    g = sub.add_parser("generate", help="generate text with a (quantized) model and KV cache; prints tokens/s")
    _add_weight_args(g, "a YAML recipe quantizing the weights and/or the KV cache (kv_cache:)")
    g.add_argument("--prompt", required=True, help="the prompt text")
    g.add_argument("--max-new", type=int, default=32, help="new tokens to generate (default 32)")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default), else sampling")
    g.add_argument("--seed", type=int, default=0, help="sampling seed")
    g.add_argument("--max-len", type=int, help="KV-cache rows (default: prompt tokens + max-new - 1)")
    g.add_argument("--kv", choices=["float", "int8", "int4"], help="KV-cache format (overrides the recipe's)")
    g.add_argument("--kv-group-size", type=int, help="with --kv: group size along head_dim (default head_dim)")
    g.add_argument("--kv-rotate", action="store_true", help="with --kv: Hadamard-rotate q and k after RoPE")
    g.add_argument("--kv-keys", choices=["token", "channel", "channel:32", "channel:64", "channel:128"],
                   help="with --kv: keys per token (default) or per channel over blocks of N positions (KIVI; N=64)")
    g.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="compute dtype")
    g.add_argument("--json", action="store_true", help="print one JSON object instead of text + figures")
    _add_calib_args(g)
    g.set_defaults(fn=cmd_generate)

    x = sub.add_parser("export", help="write the model for a serving engine: GGUF (llama.cpp) or a Hugging Face "
                                      "directory in GPTQ / AWQ / compressed-tensors format")
    _add_weight_args(x, "quantize the float model by this recipe first")
    x.add_argument("--to", required=True, choices=["gguf", "gptq", "gptq_v2", "awq", "compressed-tensors"])
    x.add_argument("--out", required=True, help="the GGUF file, or the Hugging Face directory, to write")
    x.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    x.add_argument("--float-dtype", choices=["float16", "bfloat16", "float32"], default="float16",
                   help="Hugging Face targets: dtype of the float tensors and torch_dtype (default float16)")
    x.add_argument("--json", action="store_true", help="print one JSON object (with a row per tensor)")
    _add_calib_args(x)
    x.set_defaults(fn=cmd_export)

    a = sub.add_parser("autoquant", help="the best per-layer mix of candidate recipes within a size or time budget, as a recipe")
    from jq.apps.autoquant_cli import add_arguments

    add_arguments(a, _MODEL_HELP)
    _add_calib_args(a)
    a.set_defaults(fn=cmd_autoquant)

    sub.add_parser("qat", add_help=False,
                       help="quantization-aware fine-tuning, then conversion (jq qat --help for its options)")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run one `jq` command on `argv` (default `sys.argv[1:]`); 0 on success, 2 on a user-facing error."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["qat"]:  # its own parser (jq.apps.finetune), so `jq qat --help` shows its options
        from jq.apps.finetune import main as finetune_main

        command, run = "qat", lambda: finetune_main(argv[1:])
    else:
        args = build_parser().parse_args(argv)
        command, run = args.command, lambda: args.fn(args)
    try:
        return run()
    except (ValueError, OSError, RuntimeError) as e:  # OSError: missing / existing paths, a full disk
        print(f"jq {command}: error: {e}", file=sys.stderr)
        return 2


def _drop_closed_loop_noise(hook):
    """An unraisable-exception hook that drops the "Event loop is closed" RuntimeErrors Orbax's storage callbacks
    raise after a failed write or read (a full disk, a damaged file) — after jq has already said what failed."""

    def filtered(u):
        if not (isinstance(u.exc_value, RuntimeError) and "Event loop is closed" in str(u.exc_value)):
            hook(u)

    return filtered


def entry() -> None:
    """The `jq` console script (and `python -m jq.apps.cli`): `main` in a process of its own."""
    sys.unraisablehook = _drop_closed_loop_noise(sys.unraisablehook)
    sys.exit(main())


if __name__ == "__main__":
    entry()
