"""`jq autoquant`: load the model and the calibration draw, score the candidates (through the cache when one is
given), choose — refined by measurement with `--refine`, checked whole against its alternatives on held-out windows
with `--validate` —, write the recipe and say what it chose. The heavy imports wait for the command to run."""

from __future__ import annotations

import argparse
import functools
import json
import time
from collections.abc import Callable
from pathlib import Path

__all__ = ["add_arguments", "command"]


def add_arguments(a: argparse.ArgumentParser, model_help: str) -> None:
    """`jq autoquant`'s options but the calibration draw's (`jq.apps.cli` adds those)."""
    a.add_argument("--model", required=True, help=model_help)
    a.add_argument("--budget", required=True, help="bits per linear weight (3.5bpw), the model's size (150MB), or "
                   "the summed matmul time of the quantized layers measured on this device (2.5ms, 800us)")
    a.add_argument("--latency-tokens", type=int, help="tokens per matmul when latencies are measured (default 1, "
                   "decode, for a time budget; give it with a size budget to report the time too)")
    a.add_argument("--candidates", nargs="+", help="single-rule recipes to choose from per layer (RTN / HQQ, or "
                   "calibrated ones such as gptq_w4_g64; default: rtn_w2_g128 rtn_w3_g128 hqq_w3_g64 rtn_w4_g128 "
                   "rtn_w4_g64 hqq_w4_g64 rtn_w5_g128 rtn_w6_g128 rtn_w8_g128)")
    a.add_argument("--base", help="a recipe whose rotation (QuaRot) is applied first and whose online rotations "
                   "(rotate: hadamard, e.g. before down_proj) every candidate takes; the chosen recipe carries both")
    a.add_argument("--metric", choices=["kfac", "fisher", "hessian", "kl"], default="kfac",
                   help="layer cost: loss increase under the Kronecker Fisher (kfac, default: input correlations kept, "
                   "so GPTQ candidates are judged fairly), under the diagonal Fisher, the layer's own output error "
                   "(hessian), or measured: the logits' KL when the layer alone is quantized (kl: one forward per "
                   "layer and candidate)")
    a.add_argument("--out", required=True, help="the recipe YAML to write")
    a.add_argument("--cache", help="a JSON file of measured costs per candidate, layer and metric, per model, "
                   "calibration draw and base: what it holds is reused, only what is missing is measured and added "
                   "(another budget takes seconds, another candidate only its own scoring, a stopped --refine "
                   "resumes); a file that is not such a cache is refused, never overwritten")
    a.add_argument("--refine", type=int, default=0, metavar="ROUNDS",
                   help="re-score by their measured KL (that layer alone quantized) the layers given fewer bits than "
                   "the budget's average (+ --refine-margin), solve again; up to ROUNDS rounds (default 0: none)")
    a.add_argument("--refine-margin", type=float, default=0.0, metavar="BITS",
                   help="also re-score layers chosen up to BITS above the average (which variant at about it wins)")
    a.add_argument("--kl-samples", type=int, default=4, metavar="N",
                   help="calibration windows each measured KL (--metric kl, --refine) runs on (default 4)")
    a.add_argument("--kl-stride", type=int, default=1, metavar="S",
                   help="score the KL at every S-th position only, the LM head run on those alone (default 1; "
                   "4 cuts most of the time of a large-vocabulary model such as Gemma 3)")
    a.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    a.add_argument("--json", action="store_true", help="print one JSON object")
    a.add_argument("--validate", type=int, default=0, metavar="N",
                   help="before writing, quantize the whole model by the allocation, by the estimates' allocation "
                   "(with --refine), by the largest candidate that fits on every layer and by the smallest that "
                   "does not, lowered on its cheapest layers until it fits; write the one whose next-token KL from "
                   "the float model is least on N calibration windows outside the draw (default 0: no check)")


def _progress(line: str, enabled: bool) -> Callable[[str], None] | None:
    """A progress line per step on stderr (`line` with {what} filled in, e.g. 'layer (i/n)', and the seconds so
    far), or None."""
    if not enabled:
        return None
    from rich.console import Console

    console, t0 = Console(stderr=True), time.perf_counter()
    return lambda what: console.print(f"  {line.format(what=what)}; {time.perf_counter() - t0:.0f} s",
                                      highlight=False)


def command(args: argparse.Namespace) -> int:
    """`jq autoquant` (arguments as `jq.apps.cli` parses them): autoquant the model, write the recipe, print what it
    chose."""
    import jax
    import yaml

    from jq.apps import data, pipeline
    from jq.apps.autoquant import DEFAULT_CANDIDATES, choose, parse_budget
    from jq.apps.autoquant_cache import cache_key, cached_tables
    from jq.apps.autoquant_refine import refine
    from jq.apps.autoquant_validate import contenders, held_out_windows, validate
    from jq.tree.recipe import load_recipe

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
    if args.validate < 0:
        raise ValueError(f"--validate {args.validate}: the number of held-out windows, 0 (no check) or more")
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
    held = held_out_windows(m.tokenizer, files, tokens, args.validate, args.calib_seed, args.calib_sampling) \
        if args.validate else None  # checked before anything is measured
    progress = _progress(f"scoring {{what}} under {len(candidates)} candidates", not args.json)

    # sensitivity_tables through the cache: the refinement's measurements are kept there too
    tables = functools.partial(cached_tables, cache=args.cache, key=key)

    sens = tables(m, candidates, tokens, (args.metric,), progress, latency_tokens=lat, base=base,
                  **(kl if args.metric == "kl" else {}))[args.metric]
    if rounds:
        chosen, refined = refine(m, candidates, tokens, sens, args.budget, rounds=rounds, base=base,
                                 margin=margin, progress=progress, tables=tables, **kl)
    else:
        chosen, refined = choose(sens, args.budget), {}
    checked = {}
    if held is not None:
        options = contenders(sens, args.budget, chosen, choose(sens, args.budget) if rounds else None,
                             refined or None)
        joint = validate(m, {k: v["recipe"] for k, v in options.items()}, tokens, held,
                         _progress("validating {what}", not args.json))
        written = min(joint, key=joint.get)
        chosen, checked = options[written], {"windows": args.validate, "kl": joint, "written": written}
    out.write_text(yaml.safe_dump(chosen["recipe"], sort_keys=False, width=120))
    info = {k: chosen[k] for k in ("linear_bits_per_weight", "bytes", "estimated_error", "layers_per_candidate",
                                   "latency_seconds") if k in chosen}
    cached = args.cache is not None and sens["measured"] == 0
    info.update(out=str(out), budget=args.budget, sensitivity_seconds=sens["seconds"], sensitivities_cached=cached,
                candidates_measured=sens["measured"],
                **({"measured_layers": len(refined["measured"]), "kl_ratio": refined["kl_ratio"]} if refined else {}),
                **({"validation": checked} if checked else {}))
    if args.json:
        print(json.dumps(info))
        return 0
    mix = ", ".join(f"{n}: {k}" for n, k in info["layers_per_candidate"].items())
    t = f", {info['latency_seconds'] * 1e3:.3f} ms of matmuls at {lat} token(s)" if "latency_seconds" in info else ""
    where = (f"from {args.cache}" if cached else f"{sens['measured']} of {len(candidates)} candidates measured, "
             f"{sens['seconds']:.0f} s of measurement in all")
    print(f"wrote {out}: {info['linear_bits_per_weight']:.3f} bits per linear weight, {info['bytes'] / 1e6:.1f} MB{t} "
          f"({mix}); sensitivities: {where}")
    if checked:
        kls = ", ".join(f"{n} {v:.4f}" for n, v in checked["kl"].items())
        print(f"validated on {checked['windows']} held-out windows, next-token KL from the float model: {kls}; "
              f"wrote the {checked['written']}")
    return 0
