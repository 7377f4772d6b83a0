"""QuEST against plain straight-through QAT where the paper makes its claim: training a model from scratch (random
initialisation, next-token loss, no teacher), not fine-tuning a pretrained one. A small Llama on UTF-8 bytes, trained
on the Austen books but persuasion.txt with each recipe's fake-quantized forward from the same initial weights and the
same batches, then converted (`jq.qat.convert`) and evaluated on persuasion.txt; the float run is the reference.

    python benchmarks/quest_from_scratch.py [--dim 256] [--layers 3] [--steps 250] [--batch-size 8] [--seq-len 256]
        [--lr 3e-3] [--seed 0] [--recipes float quest_w4a4 qat_ste_w4a4 ...]
        [--out benchmarks/results/quest_from_scratch]

(the defaults are the README's measured configuration).

Recipes as in qat_alignment.py (`NAME:key=value,...` sets QAT options). Writes OUT.json (per recipe: the converted
model's bits-per-byte on persuasion.txt at every --eval-every steps, the training loss curve, seconds) and OUT.png.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import optax

from jq import qat
from jq.apps import data, pipeline
from jq.apps.finetune_setup import ByteTokenizer, corpus_windows, default_corpus, make_loss
from jq.apps.perplexity import perplexity
from jq.models.llama.config import LlamaConfig
from jq.models.llama.model import Llama, init_params
from qat_alignment import variant  # noqa: E402  (benchmarks/ is on sys.path when a script here runs)
from timing import environment  # noqa: E402


def train_one(recipe, params0, mcfg, windows, eval_ids, args) -> dict:
    """Train `recipe` (None: float) from `params0` for args.steps; evaluate the converted model along the way."""
    params0 = jax.tree_util.tree_map(jnp.copy, params0)  # the step donates its state: keep the caller's weights
    model = Llama(mcfg)
    loss_fn = make_loss(model, recipe)
    schedule = optax.warmup_cosine_decay_schedule(0.0, args.lr, max(1, args.steps // 10), args.steps, args.lr / 10)
    opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=0.0))
    state = qat.init_train_state(qat.init(params0, recipe) if recipe else {"params": params0, "quant": {}}, opt)
    step = qat.make_train_step(loss_fn, opt, recipe)
    batches = qat.WindowBatches(windows, args.batch_size, seed=args.seed)
    forward = pipeline.quantized_forward(mcfg)

    def bits_per_byte(st):
        p = qat.convert(jax.device_get(st["params"]), recipe) if recipe else st["params"]["params"]
        return perplexity(forward, p, eval_ids, window=args.seq_len, windows=args.eval_windows)["nll"] / math.log(2)

    losses, curve, t0 = [], {}, time.perf_counter()
    for i in range(1, args.steps + 1):
        state, m = step(state, next(batches))
        losses.append(float(m["loss"]))
        if not math.isfinite(losses[-1]):
            curve[i] = float("nan")
            break
        if i % args.eval_every == 0 or i == args.steps:
            curve[i] = bits_per_byte(state)
            print(f"  step {i}: loss {losses[-1]:.4f}, persuasion {curve[i]:.4f} bits/byte", flush=True)
    return {"bits_per_byte": curve, "final": curve[max(curve)], "loss": losses[::max(1, args.steps // 100)],
            "seconds": time.perf_counter() - t0}


def plot(rows: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, r in rows.items():
        steps = sorted(int(s) for s in r["bits_per_byte"])
        ax.plot(steps, [r["bits_per_byte"][s] for s in steps], marker="o", ms=3, label=f"{name} ({r['final']:.3f})")
    ax.set_xlabel("training step")
    ax.set_ylabel("persuasion.txt bits / byte (converted model)")
    ax.set_title("From scratch: QuEST vs plain STE")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--steps", type=int, default=250)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0, help="initial weights and data order")
    ap.add_argument("--eval-windows", type=int, default=32)
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--recipes", nargs="+", default=["float", "quest_w4a4", "qat_ste_w4a4"])
    ap.add_argument("--out", default="benchmarks/results/quest_from_scratch")
    args = ap.parse_args()

    heads = max(1, args.dim // 64)
    mcfg = LlamaConfig(vocab_size=ByteTokenizer.vocab_size, dim=args.dim, n_layers=args.layers, n_heads=heads,
                       n_kv_heads=heads, hidden_dim=3 * args.dim, head_dim=args.dim // heads, rope_theta=10000.0,
                       norm_eps=1e-5, tie_embeddings=True, max_seq_len=args.seq_len)
    params0 = jax.jit(init_params, static_argnums=0)(mcfg, jax.random.PRNGKey(args.seed))
    windows = corpus_windows(ByteTokenizer(), default_corpus(), args.seq_len)
    eval_ids, _ = data.text_ids(ByteTokenizer(), data.default_eval_text().read_text(encoding="utf-8"))
    rows = {}
    for name in args.recipes:
        print(name, flush=True)
        rows[name] = train_one(None if name == "float" else variant(name), params0, mcfg, windows, eval_ids, args)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    flags = " ".join(f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
                     for k, v in vars(args).items())
    result = {"command": f"python benchmarks/quest_from_scratch.py {flags}",
        "model": {"dim": mcfg.dim, "layers": mcfg.n_layers, "hidden": mcfg.hidden_dim, "vocab": mcfg.vocab_size,
                  "params": int(sum(x.size for x in jax.tree_util.tree_leaves(params0)))},
        "tokens_per_run": args.steps * args.batch_size * args.seq_len, "environment": environment(), "runs": rows}
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    plot(rows, out.with_suffix(".png"))
    for name, r in rows.items():
        print(f"{name:<28} {r['final']:.4f} bits/byte   {r['seconds']:.0f} s")


if __name__ == "__main__":
    main()
