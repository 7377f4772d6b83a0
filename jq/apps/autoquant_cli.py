"""`jq autoquant`: load the model and the calibration draw, score the candidates (through the cache when one is
given), choose — refined by measurement with `--refine` —, write the recipe and say what it chose."""

from __future__ import annotations

import argparse
import functools
import json
import time
from collections.abc import Callable
from pathlib import Path

import jax

from jq.apps.autoquant import DEFAULT_CANDIDATES, choose, parse_budget
from jq.apps.autoquant_cache import cache_key, cached_tables
from jq.apps.autoquant_refine import refine
from jq.tree.recipe import load_recipe

__all__ = ["command"]


def _progress(n_candidates: int, enabled: bool) -> Callable[[str], None] | None:
    """A progress line per layer on stderr ('layer (i/n)', seconds so far), or None."""
    if not enabled:
        return None
    from rich.console import Console

    console, t0 = Console(stderr=True), time.perf_counter()
    return lambda what: console.print(f"  scoring {what} under {n_candidates} candidates; "
                                      f"{time.perf_counter() - t0:.0f} s", highlight=False)


def command(args: argparse.Namespace) -> int:
    """`jq autoquant` (arguments as `jq.apps.cli` parses them): autoquant the model, write the recipe, print what it
    chose."""
    import yaml

    from jq.apps import data, pipeline

    kind, _ = parse_budget(args.budget)  # checked before the model loads
    rounds = getattr(args, "refine", 0)
    if rounds and kind == "seconds":
        raise ValueError(f"--refine {rounds}: refinement re-scores the layers given fewer bits than a size "
                         f"budget's average; {args.budget} is a time: use a size budget (3.5bpw or 150MB)")
    margin = getattr(args, "refine_margin", 0.0)
    if (margin and not rounds) or not margin >= 0:
        raise ValueError(f"--refine-margin {margin}: bits above the budget's average (0 or more) within which "
                         "--refine also measures layers; it needs --refine ROUNDS")
    kl = {"kl_samples": args.kl_samples, "kl_stride": args.kl_stride}
    for option, v in kl.items():
        if v < 1:
            raise ValueError(f"--{option.replace('_', '-')} {v}: must be at least 1")
    lat = args.latency_tokens or (1 if kind == "seconds" else None)  # a time budget: decode (1 token) by default
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise FileExistsError(f"{out} exists; choose another --out or pass --overwrite")
    candidates = [load_recipe(c) for c in args.candidates or DEFAULT_CANDIDATES]
    base = load_recipe(args.base) if args.base else None
    files = [Path(f) for f in args.calib] if args.calib else data.default_calib_files()
    for f in files:
        data.read_text(f, "--calib")
    m = pipeline.load(args.model)
    tokens, draw = data.calibration_draw(m.tokenizer, files, args.calib_samples, args.calib_len, args.calib_seed,
                                         args.calib_sampling)
    key = cache_key(m, draw, base, (lat, jax.devices()[0].device_kind) if lat else None)
    progress = _progress(len(candidates), not args.json)

    # sensitivity_tables through the cache: the refinement's measurements are kept there too
    tables = functools.partial(cached_tables, cache=args.cache, key=key)

    sens = tables(m, candidates, tokens, (args.metric,), progress, latency_tokens=lat, base=base,
                  **(kl if args.metric == "kl" else {}))[args.metric]
    if rounds:
        chosen, refined = refine(m, candidates, tokens, sens, args.budget, rounds=rounds, base=base,
                                 margin=margin, progress=progress, tables=tables, **kl)
    else:
        chosen, refined = choose(sens, args.budget), {}
    out.write_text(yaml.safe_dump(chosen["recipe"], sort_keys=False, width=120))
    info = {k: chosen[k] for k in ("linear_bits_per_weight", "bytes", "estimated_error", "layers_per_candidate",
                                   "latency_seconds") if k in chosen}
    cached = args.cache is not None and sens["measured"] == 0
    info.update(out=str(out), budget=args.budget, sensitivity_seconds=sens["seconds"], sensitivities_cached=cached,
                candidates_measured=sens["measured"],
                **({"measured_layers": len(refined["measured"]), "kl_ratio": refined["kl_ratio"]} if refined else {}))
    if args.json:
        print(json.dumps(info))
        return 0
    mix = ", ".join(f"{n}: {k}" for n, k in info["layers_per_candidate"].items())
    t = f", {info['latency_seconds'] * 1e3:.3f} ms of matmuls at {lat} token(s)" if "latency_seconds" in info else ""
    where = (f"from {args.cache}" if cached else f"{sens['measured']} of {len(candidates)} candidates measured, "
             f"{sens['seconds']:.0f} s of measurement in all")
    print(f"wrote {out}: {info['linear_bits_per_weight']:.3f} bits per linear weight, {info['bytes'] / 1e6:.1f} MB{t} "
          f"({mix}); sensitivities: {where}")
    return 0
