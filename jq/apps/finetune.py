"""Quantization-aware fine-tuning of a Llama-family model on text, sharded over every device, then conversion to the
quantized tree `jq quantize` writes.

    jq qat --model smollm2-135m --recipe configs/qat_w4_g128.yaml --steps 300 \\
        --batch-size 8 --seq-len 512 --grad-accum 4 --lr 2e-5 --ckpt-dir out/qat_ckpt --out out/qat_w4_g128
    jq qat --float ...              # control: the same fine-tune in float, then PTQ by the recipe
    jq qat --recipe configs/qat_w3_g128.yaml --init-recipe configs/awq_gptq_w3_g128_static.yaml
                                    # start from AWQ + GPTQ (on the same grid) instead of RTN
    jq qat --distill 1 ...          # loss = KD from the float model's logits instead of next-token CE
    jq qat --model tiny --steps 2 --seq-len 64 --batch-size 2    # smoke test, no download

The corpus defaults to the Austen books other than persuasion.txt (the evaluation text); `--eval-windows N` reports
the perplexity of the converted model on persuasion.txt. Multi-host: pass --coordinator HOST:PORT (or set
JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID); each host runs the same command.
`main(argv)` is the entry point (`jq qat` and `scripts/qat_finetune.py` call it).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[2]


class ByteTokenizer:
    """UTF-8 bytes as token ids (vocabulary 256): the tokenizer of the `--model tiny` smoke model."""

    vocab_size = 256
    bos_id = eos_id = None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(text.encode("utf-8"))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="jq qat", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m",
                   help="a .gguf file, a Hugging Face directory, smollm2-135m, or 'tiny' "
                        "(random one-block Llama, byte tokens)")
    p.add_argument("--recipe", default="qat_w4_g128", help="QAT / PTQ recipe: a YAML file or a shipped recipe's name "
                                                               "(default qat_w4_g128)")
    p.add_argument("--init-recipe",
                   help="start from this calibrated PTQ recipe's result (e.g. AWQ + GPTQ, same grid as --recipe, "
                        "act_order: false) instead of RTN: masters = its dequantized weights, learned step sizes = "
                        "its scales and zeros (jq.qat.init_from)")
    from jq.apps.pipeline import add_calib_args

    add_calib_args(p, "--init-recipe calibration")
    p.add_argument("--float", action="store_true",
                   help="fine-tune without fake quantization (the control); --out still applies the recipe (PTQ)")
    p.add_argument("--distill", type=float, default=0.0, metavar="ALPHA",
                   help="weight of knowledge distillation from the float model in the loss: 0 = next-token "
                        "cross-entropy only (default), 1 = pure KD (recovers the float model, no domain adaptation)")
    p.add_argument("--distill-temperature", type=float, default=1.0, help="softmax temperature of the KD term")
    p.add_argument("--corpus", nargs="+", help="training text files (default: the Austen books but persuasion.txt)")
    p.add_argument("--steps", type=int, default=100, help="optimizer steps (default 100)")
    p.add_argument("--batch-size", type=int, default=8, help="windows per micro-batch (default 8)")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per window (default 512)")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step (default 1)")
    p.add_argument("--lr", type=float, default=2e-5, help="peak learning rate of the weights (default 2e-5)")
    p.add_argument("--quant-lr", type=float, default=None, help="learning rate of learned step sizes (default --lr)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps (default 10%% of --steps)")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW decay of ≥2-D weights (default 0)")
    p.add_argument("--clip", type=float, default=1.0, help="gradient clip by global norm (default 1.0)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="activation compute dtype")
    p.add_argument("--seed", type=int, default=0, help="seed of the data order (and of the tiny model)")
    p.add_argument("--fsdp", type=int, default=None, help="devices per fsdp group (default: every device of a host)")
    p.add_argument("--ckpt-dir", help="Orbax checkpoint directory (train state + data position)")
    p.add_argument("--ckpt-every", type=int, default=100, help="checkpoint every N steps (default 100) and at the end")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --ckpt-dir")
    p.add_argument("--out", help="write the converted quantized params here (a jq checkpoint, docs/FORMAT.md)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out directory")
    p.add_argument("--eval-windows", type=int, default=0,
                   help="perplexity of the converted model on this many persuasion.txt windows (default 0: skip)")
    p.add_argument("--eval-every", type=int, default=0,
                   help="with --eval-windows: also evaluate every N steps (result 'curve': the converted model's "
                        "perplexity, the float model's with --float; points of this process only after --resume)")
    p.add_argument("--eval-window", type=int, default=512, help="tokens per evaluation window (default 512)")
    p.add_argument("--coordinator", help="multi-host: coordinator HOST:PORT (or JAX_COORDINATOR_ADDRESS)")
    p.add_argument("--num-processes", type=int, help="multi-host: number of processes")
    p.add_argument("--process-id", type=int, help="multi-host: this process's index")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (log lines instead)")
    return p


# -- model and data ---------------------------------------------------------------------------------------------


def load_model(name: str, seed: int):
    """(LlamaConfig, params, tokenizer, source) for a model name / path, or for 'tiny' a random one-block Llama
    (width 32) on byte tokens."""
    import jax

    if name == "tiny":
        from jq.models.llama.config import LlamaConfig
        from jq.models.llama.model import init_params

        cfg = dataclasses.replace(LlamaConfig.tiny(vocab_size=ByteTokenizer.vocab_size), n_layers=1)
        return cfg, jax.jit(init_params, static_argnums=0)(cfg, jax.random.PRNGKey(seed)), ByteTokenizer(), "tiny"
    from jq.apps import pipeline

    m = pipeline.load(name)
    return m.cfg, m.params, m.tokenizer, m.source


def corpus_windows(tokenizer, files: list[Path], seq_len: int) -> np.ndarray:
    """Non-overlapping windows of `seq_len` tokens from each file's token stream → int32 [N, seq_len]."""
    from jq.apps import pipeline

    out = []
    for f in files:
        ids = np.asarray(tokenizer.encode(pipeline.read_text(f, "--corpus")), np.int32)
        n = len(ids) // seq_len
        out.append(ids[: n * seq_len].reshape(n, seq_len))
    windows = np.concatenate(out) if out else np.zeros((0, seq_len), np.int32)
    if not len(windows):
        raise ValueError(f"the corpus {[str(f) for f in files]} holds no window of {seq_len} tokens")
    return windows


def default_corpus() -> list[Path]:
    from jq.apps import pipeline

    files = pipeline.default_calib_files()
    if files:
        return files
    excerpt = REPO / "data" / "persuasion_excerpt.txt"
    if excerpt.exists():
        return [excerpt]
    raise FileNotFoundError("no default corpus (shared Austen data absent): pass --corpus FILE [FILE ...]")


def evaluator(mcfg, tokenizer, args):
    """`evaluate(params) -> perplexity dict` of float or quantized params on the first `args.eval_windows` windows
    of persuasion.txt; the text is tokenized and the forward jitted once, so the PTQ start and the converted model
    (same tree structure) share one compilation."""
    import jax.numpy as jnp

    from jq.apps import pipeline
    from jq.apps.perplexity import perplexity

    ids = np.asarray(tokenizer.encode(pipeline.default_eval_text().read_text(encoding="utf-8")), np.int32)
    fwd = pipeline.quantized_forward(mcfg, jnp.dtype(args.dtype))
    return lambda params: perplexity(fwd, params, ids, window=args.eval_window, windows=args.eval_windows)


def ptq_start(mcfg, params, tokenizer, source: str, args, files: list[Path], rotation=None):
    """Quantize `params` by `args.init_recipe` (calibrated on the training corpus `files`) → (quantized params,
    {"name", "seconds", "calibration"}). `params` are already rotated by the QAT recipe's `rotation` section (or
    not, when it is None); the PTQ recipe must rotate the same way or not at all, as QAT trains one architecture."""
    import jq
    from jq.apps import pipeline

    ptq = jq.load_recipe(args.init_recipe)
    if ptq.rotation is not None and ptq.rotation != rotation:
        raise ValueError(f"--init-recipe {args.init_recipe}: its rotation section ({ptq.rotation}) differs from the "
                         f"QAT recipe's ({rotation}); QAT trains the model the QAT recipe describes. Give the QAT "
                         "recipe the same rotation section, or pick a PTQ recipe without one")
    ptq = dataclasses.replace(ptq, rotation=None)  # the model arrives rotated
    t0 = time.perf_counter()
    calib = calib_info = None
    if ptq.needs_calibration:
        calib, calib_info = pipeline.calibration_draw(tokenizer, files, args.calib_samples, args.calib_len,
                                                      args.calib_seed, args.calib_sampling)
    m = pipeline.LoadedModel(mcfg, params, tokenizer, source)
    qparams, _ = pipeline.quantize(m, ptq, calib, progress=not args.no_progress)
    return qparams, {"name": ptq.name, "seconds": time.perf_counter() - t0, "calibration": calib_info}


# -- training pieces --------------------------------------------------------------------------------------------


def make_optimizer(args, qat_params):
    """AdamW on the weights (decay on ≥2-D weights only), Adam on learned step sizes, warm-up + cosine, clipped."""
    import jax
    import optax

    warmup = args.warmup if args.warmup is not None else max(1, args.steps // 10)
    decay_steps = max(args.steps, warmup + 1)

    def schedule(peak):
        return optax.warmup_cosine_decay_schedule(0.0, peak, warmup, decay_steps, end_value=0.1 * peak)

    def decay(p):  # multi_transform hands adamw the whole tree, the learned step sizes masked out
        return jax.tree_util.tree_map(lambda x: getattr(x, "ndim", 0) >= 2, p)

    weights = optax.adamw(schedule(args.lr), weight_decay=args.weight_decay, mask=decay)
    steps = optax.adam(schedule(args.quant_lr if args.quant_lr is not None else args.lr))
    labels = {"params": _tree_const(qat_params["params"], "w"), "quant": _tree_const(qat_params["quant"], "q")}
    return optax.chain(optax.clip_by_global_norm(args.clip), optax.multi_transform({"w": weights, "q": steps}, labels))


def _tree_const(tree, value):
    import jax

    return jax.tree_util.tree_map(lambda _: value, tree)


def make_loss(model, act_cfg, alpha: float = 0.0, temperature: float = 1.0):
    """loss(params, ids[B, T], [teacher_params]) = mean next-token cross-entropy of the (fake-quantized) model, or
    with alpha > 0 the `jq.qat.distill_loss` mix with KD from the float teacher's logits on the same ids."""
    from jq import qat

    def loss_fn(params, ids, teacher=None):
        logits = qat.apply(model, {"params": params}, ids, cfg=act_cfg)[:, :-1]
        target = None if teacher is None else model.apply({"params": teacher}, ids)[:, :-1]
        return qat.distill_loss(logits, target, ids[:, 1:], alpha if teacher is not None else 0.0, temperature)

    return loss_fn


class _Progress:
    """A rich progress bar with loss and tokens/s on stderr (or plain log lines)."""

    def __init__(self, total: int, start: int, enabled: bool):
        from rich.console import Console

        self.console = Console(stderr=True)
        self.enabled = enabled
        self.bar = None
        if enabled:
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                       TimeRemainingColumn)

            self.bar = Progress(
                TextColumn("[bold]qat"), BarColumn(), MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]:.4f}"), TextColumn("{task.fields[tps]:,.0f} tok/s"),
                TimeElapsedColumn(), TimeRemainingColumn(), console=self.console, transient=False,
            )
            self.task = self.bar.add_task("qat", total=total, completed=start, loss=float("nan"), tps=0.0)
            self.bar.start()

    def update(self, step: int, loss: float, tps: float) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=step, loss=loss, tps=tps)
        else:
            self.console.print(f"step {step}: loss {loss:.4f}, {tps:,.0f} tok/s", highlight=False)

    def note(self, text: str) -> None:
        """A line above the bar (or in the log), e.g. a perplexity of the curve as soon as it is measured."""
        (self.bar.console if self.bar is not None else self.console).print(text, highlight=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


# -- main -------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from jq import qat

    qat.maybe_initialize_distributed(args.coordinator, args.num_processes, args.process_id)

    import jax
    import jax.numpy as jnp

    import jq
    from jq import checkpoint
    from jq.models.llama.model import Llama

    if args.steps < 0 or args.batch_size < 1 or args.grad_accum < 1 or args.seq_len < 2:
        raise ValueError("need --steps >= 0, --batch-size >= 1, --grad-accum >= 1, --seq-len >= 2")
    if args.resume and not args.ckpt_dir:
        raise ValueError("--resume needs --ckpt-dir")
    if args.eval_every < 0 or (args.eval_every and not args.eval_windows):
        raise ValueError(f"--eval-every {args.eval_every} needs --eval-windows N > 0 and must be >= 0")
    if not 0.0 <= args.distill <= 1.0 or args.distill_temperature <= 0:
        raise ValueError(f"--distill {args.distill} must lie in [0, 1] and --distill-temperature "
                         f"{args.distill_temperature} must be > 0")
    if args.distill and args.float:
        raise ValueError("--distill pulls the model towards the float model; with --float it would distill the "
                         "float model from itself (zero loss). Run the float control without --distill")
    t0 = time.perf_counter()
    recipe = jq.load_recipe(args.recipe)
    if args.out and jax.process_index() == 0:
        checkpoint.check_destination(args.out, args.overwrite)  # before the training run, not after it
    mcfg, params, tokenizer, source = load_model(args.model, args.seed)
    from jq.apps.pipeline import check_window

    check_window(mcfg, args.seq_len, "--seq-len")
    if args.eval_windows:
        check_window(mcfg, args.eval_window, "--eval-window")
    if recipe.rotation is not None:  # QAT trains (and the teacher is) the rotated model: the same function
        from jq.apps import pipeline

        rot = pipeline.rotated(pipeline.LoadedModel(mcfg, params, tokenizer, source), recipe)
        mcfg, params = rot.cfg, rot.params
    files = [Path(f) for f in args.corpus] if args.corpus else default_corpus()
    windows = corpus_windows(tokenizer, files, args.seq_len)
    batches = qat.WindowBatches(windows, args.batch_size, args.grad_accum, seed=args.seed)

    mesh = qat.make_mesh(fsdp=args.fsdp) if args.fsdp else qat.make_mesh()
    evaluate = evaluator(mcfg, tokenizer, args) if args.eval_windows else None
    ptq_log = None
    teacher = params if args.distill else None
    if args.init_recipe and args.float:
        raise ValueError("--init-recipe starts QAT from a PTQ result; it has no meaning with --float")
    ckpt = qat.Checkpointer(args.ckpt_dir) if args.ckpt_dir else None
    resume_step = ckpt.latest_step() if args.resume else None
    if args.init_recipe and resume_step is not None:  # the checkpoint holds the trained state: no PTQ
        ptq_log = {"name": jq.load_recipe(args.init_recipe).name, "resumed_at_step": resume_step}
        qp = qat.init(params, recipe)
    elif args.init_recipe:
        params, ptq_log = ptq_start(mcfg, params, tokenizer, source, args, files, recipe.rotation)
        if args.eval_windows:
            ptq_log["eval"] = evaluate(params)
        qp = qat.init_from(params, recipe)
    else:
        qp = {"params": params, "quant": {}} if args.float else qat.init(params, recipe)
    optimizer = make_optimizer(args, qp)
    state = qat.init_train_state(qp, optimizer, mesh)
    del params, qp
    model = Llama(mcfg, dtype=jnp.dtype(args.dtype))
    step_fn = qat.make_train_step(make_loss(model, None if args.float else recipe, args.distill,
                                            args.distill_temperature), optimizer, None if args.float else recipe,
                                  mesh=mesh)
    frozen = () if teacher is None else (qat.shard_tree(teacher, mesh),)
    del teacher

    if resume_step is not None:
        state, extra = ckpt.restore(state, resume_step)
        batches.restore(extra["data"])
    start = int(jax.device_get(state["step"]))
    console_out = jax.process_index() == 0
    if console_out:
        print(f"{source}: {'float control' if args.float else recipe.name}"
              f"{f', KD alpha {args.distill}' if args.distill else ''}, {len(windows)} windows of "
              f"{args.seq_len} tokens from {len(files)} file(s), mesh {dict(mesh.shape)}, steps {start}..{args.steps}, "
              f"batch {args.grad_accum}x{args.batch_size}", file=sys.stderr)

    def gathered(st):
        """The trained {"params", "quant"} tree on the host (all-gathered across processes)."""
        trained = st["params"]
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            trained = multihost_utils.process_allgather(trained, tiled=True)
        return jax.device_get(trained)

    bar = _Progress(args.steps, start, enabled=console_out and not args.no_progress)
    curve: list[dict[str, float]] = []  # perplexity every --eval-every steps; eval time is not training time
    eval_s = 0.0
    tokens_per_step = args.grad_accum * args.batch_size * args.seq_len
    losses: list[float] = []
    step_seconds: list[float] = []
    train_t0 = time.perf_counter()
    try:
        for step in range(start, args.steps):
            ts = time.perf_counter()
            state, metrics = step_fn(state, qat.shard_batch(next(batches), mesh), *frozen)
            loss = float(metrics["loss"])
            losses.append(loss)
            step_seconds.append(time.perf_counter() - ts)
            if console_out:
                bar.update(step + 1, loss, tokens_per_step / step_seconds[-1])
            if ckpt is not None and (step + 1) % args.ckpt_every == 0 and step + 1 < args.steps:
                ckpt.save(state, {"data": batches.state()})
            if args.eval_every and (step + 1) % args.eval_every == 0 and step + 1 < args.steps:
                te = time.perf_counter()
                trained = gathered(state)  # the float control's curve is the float model's own
                curve.append({"step": step + 1, "train_seconds": te - train_t0 - eval_s, "perplexity": evaluate(
                    trained["params"] if args.float else qat.convert(trained, recipe))["perplexity"]})
                took = time.perf_counter() - te
                eval_s += took
                if console_out:
                    bar.note(f"step {step + 1}: perplexity {curve[-1]['perplexity']:.3f} "
                             f"({args.eval_windows} × {args.eval_window} tokens, {took:.0f} s)")
    finally:
        bar.close()
    train_s = time.perf_counter() - train_t0 - eval_s
    if ckpt is not None:
        if args.steps > start:
            ckpt.save(state, {"data": batches.state()})
        ckpt.close()

    result: dict[str, Any] = {
        "model": source, "recipe": recipe.name, "mode": "float" if args.float else "qat", "steps": args.steps,
        **({"distill": {"alpha": args.distill, "temperature": args.distill_temperature}} if args.distill else {}),
        **({"init_recipe": ptq_log} if ptq_log else {}),
        "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None,
        "train_seconds": train_s,
        # steady state: the first step of a run includes compilation
        "tokens_per_second": tokens_per_step * (len(step_seconds) - 1) / sum(step_seconds[1:])
        if len(step_seconds) > 1 else None,
    }
    if curve:
        result["curve"] = curve
    if args.out or args.eval_windows:
        trained = gathered(state)
        qparams = jax.block_until_ready(qat.convert(trained, recipe))
        if args.out and console_out:
            meta = {"model": source, "model_config": dataclasses.asdict(mcfg), "recipe_file": str(args.recipe),
                    "qat": {k: v for k, v in result.items() if k != "model"}}
            result["out"] = str(checkpoint.save(args.out, qparams, recipe=recipe, meta=meta, overwrite=args.overwrite))
        if args.eval_windows:
            result["eval"] = evaluate(qparams)
            if args.float:  # the control's own perplexity: how much the fine-tune alone moved the float model
                result["eval_float"] = evaluate(trained["params"])
    result["seconds"] = time.perf_counter() - t0
    if console_out:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
