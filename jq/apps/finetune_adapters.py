"""`jq qat --lora RANK` / `--peqa`: fine-tuning that trains small trees beside a frozen quantized base.

- QLoRA (`--lora R`): the base is the recipe's PTQ result (RTN, or `--init-recipe`'s calibrated one), packed and
  frozen; rank-R adapters (zero-initialised) are trained. `--lora-init loftq` starts base and adapters with LoftQ;
  `--qalora` pools the adapters over the base's groups and writes the *merged integer* model.
- PEQA (`--peqa`): only the base's scales are trained.

The trained tree is the train state's `params` (so `jq.qat.make_train_step`, its mesh, gradient accumulation and
Orbax resume apply unchanged); the base and the distillation teacher are frozen arguments of the step.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["AdapterRun", "add_adapter_args", "adapter_run"]


def add_adapter_args(p: argparse.ArgumentParser) -> None:
    """The flags of adapter fine-tuning on `jq qat`."""
    g = p.add_argument_group("adapters on a frozen quantized base (QLoRA, LoftQ, QA-LoRA, PEQA)")
    g.add_argument("--lora", type=int, default=0, metavar="RANK",
                   help="train rank-RANK LoRA adapters on the recipe's frozen PTQ base instead of QAT (QLoRA)")
    g.add_argument("--lora-alpha", type=float, default=16.0, help="LoRA alpha: the product is scaled by alpha / rank")
    g.add_argument("--lora-dropout", type=float, default=0.0, help="dropout on each adapter's input (default 0)")
    g.add_argument("--lora-pattern", default=r".*kernel", help="regex of the leaf paths that get adapters")
    g.add_argument("--lora-init", choices=("zero", "loftq"), default="zero",
                   help="zero: QLoRA's b = 0 start; loftq: base and adapters from LoftQ's alternating SVD")
    g.add_argument("--loftq-steps", type=int, default=5, help="LoftQ alternations (default 5)")
    g.add_argument("--loftq-weighted", action="store_true",
                   help="LoftQ's SVD in the metric of each layer's inputs (Hessians from --calib-samples windows of "
                        "the training corpus), as LoRC fits")
    g.add_argument("--qalora", action="store_true",
                   help="QA-LoRA: adapters pooled over the base's quantization groups; --out writes the merged "
                        "integer model (needs an asymmetric grouped int recipe)")
    g.add_argument("--peqa", action="store_true", help="PEQA: train only the quantization scales of the PTQ base")
    g.add_argument("--adapters-out", help="write the trained adapters here (jq.adapters.io; --out holds the base)")


@dataclasses.dataclass
class AdapterRun:
    """What the training loop needs for an adapter or PEQA run.

    trainable: the tree trained (adapters {path: {"a", "b"}}, or PEQA's scales); base: the frozen quantized tree;
    params_of(trainable, base, key=None): the tree the model runs on; export(trainable, base): (the quantized tree
    `--out` writes, the adapters `--adapters-out` writes or None); info: what the result JSON reports.
    """

    trainable: Any
    base: Any
    params_of: Callable[..., Any]
    export: Callable[[Any, Any], tuple[Any, Any]]
    info: dict[str, Any]
    lora: Any = None


def adapter_run(args: argparse.Namespace, params: Any, recipe: Any, ptq: Callable[[], tuple[Any, dict]],
                hessians: Callable[[], Any] | None = None) -> AdapterRun:
    """Build the run `args` asks for from the float `params`, the recipe, `ptq()` → (PTQ base, its log) and
    `hessians()` → input statistics by path (for `--loftq-weighted`)."""
    import jax

    from jq import adapters as A
    from jq.tree.report import size_summary

    if args.peqa and args.lora:
        raise ValueError("--peqa trains the base's scales, --lora trains adapters beside it: pick one")
    if args.qalora and args.lora_init == "loftq":
        raise ValueError("--qalora adapters merge into zero points and start at zero; drop --lora-init loftq")
    if args.peqa:
        base, log = ptq()
        scales = A.peqa.init(base)
        info = {"mode": "peqa", "trainable_params": A.count(scales), "base": log,
                "base_bits_per_weight": size_summary(base)["linear_bits_per_weight"]}
        return AdapterRun(scales, base, lambda t, b, key=None: A.peqa.combine(b, t),
                          lambda t, b: (A.peqa.apply_scales(b, t), None), info)
    cfg = A.LoraConfig(rank=args.lora, alpha=args.lora_alpha, dropout=args.lora_dropout, pattern=args.lora_pattern,
                       pooled=args.qalora)
    info: dict[str, Any] = {"mode": "qalora" if args.qalora else "lora", "rank": cfg.rank, "alpha": cfg.alpha,
                            "init": args.lora_init}
    if args.loftq_weighted and args.lora_init != "loftq":
        raise ValueError("--loftq-weighted weights LoftQ's SVD; it needs --lora-init loftq")
    if args.lora_init == "loftq":
        stats = hessians() if args.loftq_weighted else None
        base, adapters, residuals = A.loftq.init(params, recipe, cfg, steps=args.loftq_steps, stats=stats)
        info["loftq_weighted"] = bool(args.loftq_weighted)
        per_step = [sum(r[t] for r in residuals.values()) / len(residuals) for t in range(args.loftq_steps + 1)]
        info["loftq_mean_relative_residual"] = per_step
    else:
        base, info["base"] = ptq()
        adapters = A.init(base, cfg, jax.random.PRNGKey(args.seed))
    info["trainable_params"] = A.count(adapters)
    info["base_bits_per_weight"] = size_summary(base)["linear_bits_per_weight"]

    def export(t, b):
        if cfg.pooled:
            return A.qalora.merge(b, t, cfg), None
        return b, t

    return AdapterRun(adapters, base, lambda t, b, key=None: A.combine(b, t, cfg, key), export, info, cfg)


def save_adapters(run: AdapterRun, adapters: Any, directory: str | Path, overwrite: bool, meta: dict) -> str:
    """Write trained adapters with their config (`jq.adapters.io.save`)."""
    from jq.adapters import io

    return str(io.save(directory, adapters, run.lora, meta=meta, overwrite=overwrite))
