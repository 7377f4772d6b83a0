"""Quantization-aware fine-tuning of a causal LM of any registered family on text, sharded over every device, then conversion to the
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
JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID; `--coordinator auto` on a TPU pod slice or under
SLURM); each host runs the same command (docs/MULTIHOST.md; locally: `python -m jq.apps.launch -n 2 -- jq qat ...`).
`main(argv)` is the entry point (`jq qat` and `scripts/qat_finetune.py` call it); its pieces are in
`jq.apps.finetune_setup`.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

from jq.apps.finetune_adapters import adapter_run, save_adapters
from jq.apps.finetune_setup import (_Progress, build_parser, corpus_windows, default_corpus, evaluator, make_loss,
                                    make_optimizer, ptq_start, training_model, tree_bytes)
from jq.models.family import config_dict

__all__ = ["main", "build_parser"]


def main(argv: list[str] | None = None) -> int:
    """Run `jq qat` on `argv` (default `sys.argv[1:]`): fine-tune, convert, optionally evaluate; returns 0."""
    args = build_parser().parse_args(argv)
    from jq import qat

    qat.maybe_initialize_distributed(args.coordinator, args.num_processes, args.process_id)

    import jax
    import jax.numpy as jnp

    import jq
    from jq import checkpoint
    from jq.apps import pipeline
    from jq.apps.data import check_window

    if args.steps < 0 or args.batch_size < 1 or args.grad_accum < 1 or args.seq_len < 2:
        raise ValueError("need --steps >= 0, --batch-size >= 1, --grad-accum >= 1, --seq-len >= 2")
    if args.resume and not args.ckpt_dir:
        raise ValueError("--resume needs --ckpt-dir")
    if args.eval_every < 0 or (args.eval_every and not args.eval_windows):
        raise ValueError(f"--eval-every {args.eval_every} needs --eval-windows N > 0 and must be >= 0")
    if not 0.0 <= args.distill <= 1.0 or args.distill_temperature <= 0:
        raise ValueError(f"--distill {args.distill} must lie in [0, 1] and --distill-temperature "
                         f"{args.distill_temperature} must be > 0")
    adapters = bool(args.lora or args.peqa)
    if adapters and args.float:
        raise ValueError("--lora / --peqa train beside a quantized base; --float has none. Drop --float")
    if args.adapters_out and not args.lora:
        raise ValueError("--adapters-out writes LoRA adapters; it needs --lora RANK")
    if args.distill and args.float:
        raise ValueError("--distill pulls the model towards the float model; with --float it would distill the "
                         "float model from itself (zero loss). Run the float control without --distill")
    t0 = time.perf_counter()
    recipe = jq.load_recipe(args.recipe)
    if args.out and jax.process_index() == 0:
        checkpoint.check_destination(args.out, args.overwrite)  # before the training run, not after it
    m = training_model(args.model, args.seed)
    check_window(m.cfg, args.seq_len, "--seq-len")
    if args.eval_windows:
        check_window(m.cfg, args.eval_window, "--eval-window")
    m = pipeline.rotated(m, recipe)  # QAT trains (and the teacher is) the rotated model: the same function
    mcfg, params, tokenizer, source = m.cfg, m.params, m.tokenizer, m.source
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
    run = None
    if adapters:  # the trained tree is the adapters (or PEQA's scales); the PTQ base is frozen
        def ptq():
            if args.init_recipe:
                return ptq_start(m, args, files, recipe.rotation)
            if recipe.needs_calibration:
                raise ValueError(f"recipe {recipe.name!r} needs calibration; for a calibrated base pass it as "
                                 "--init-recipe (and a data-free --recipe of the same grid)")
            return jq.quantize_params(m.params, dataclasses.replace(recipe, rotation=None)), {"name": recipe.name}

        def hessians():
            from jq.apps import data
            from jq.calibration.capture import batched, capture

            tokens, _ = data.calibration_draw(m.tokenizer, files, args.calib_samples, args.calib_len,
                                              args.calib_seed, args.calib_sampling)
            return capture(m.family.module(mcfg), {"params": m.params}, batched(tokens, 8))

        run = adapter_run(args, params, dataclasses.replace(recipe, rotation=None), ptq, hessians)
        qp = {"params": run.trainable, "quant": {}}
        if args.eval_windows:
            run.info["start_eval"] = evaluate(run.params_of(run.trainable, run.base))
    elif args.init_recipe and resume_step is not None:  # the checkpoint holds the trained state: no PTQ
        ptq_log = {"name": jq.load_recipe(args.init_recipe).name, "resumed_at_step": resume_step}
        qp = qat.init(params, recipe)
    elif args.init_recipe:
        params, ptq_log = ptq_start(m, args, files, recipe.rotation)
        if args.eval_windows:
            ptq_log["eval"] = evaluate(params)
        qp = qat.init_from(params, recipe)
    else:
        qp = {"params": params, "quant": {}} if args.float else qat.init(params, recipe)
    optimizer = make_optimizer(args, qp)
    state = qat.init_train_state(qp, optimizer, mesh)
    del params, qp
    model = m.family.module(mcfg, dtype=jnp.dtype(args.dtype))
    loss = make_loss(model, None if args.float or adapters else recipe, args.distill, args.distill_temperature)
    if run is not None and run.lora is not None:  # every adapter beside a matmul of this model, or a named error
        from jq.adapters import check_routes

        check_routes(model, {"params": run.base}, run.trainable, jnp.zeros((1, 8), jnp.int32))
    if adapters:
        def adapter_loss(trained, ids, base, *teacher, key=None):
            return loss(run.params_of(trained, base, key), ids, *teacher)

        step_fn = qat.make_train_step(adapter_loss, optimizer, None, mesh=mesh,
                                      rng_seed=args.seed if args.lora_dropout > 0 else None)
        frozen = (qat.shard_tree(run.base, mesh),)
    else:
        step_fn = qat.make_train_step(loss, optimizer, None if args.float else recipe, mesh=mesh)
        frozen = ()
    frozen += () if teacher is None else (qat.shard_tree(teacher, mesh),)
    del teacher
    memory = {"train_state_bytes": tree_bytes(state), "frozen_base_bytes": tree_bytes(frozen[:1]) if adapters else 0,
              "teacher_bytes": tree_bytes(frozen[-1]) if args.distill else 0}

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
                now = (trained["params"] if args.float else run.params_of(trained["params"], run.base) if adapters
                       else qat.convert(trained, recipe))
                curve.append({"step": step + 1, "train_seconds": te - train_t0 - eval_s,
                              "perplexity": evaluate(now)["perplexity"]})
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
        "model": source, "recipe": recipe.name, "mode": "float" if args.float else run.info["mode"] if adapters
        else "qat", "steps": args.steps, **({"adapters": run.info} if adapters else {}),
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
    import resource

    result["memory"] = {**memory, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if args.out or args.eval_windows or args.adapters_out:
        trained = gathered(state)
        if adapters:  # --out: the base (LoRA), the merged integer model (QA-LoRA), the tuned scales (PEQA)
            qparams, trained_adapters = run.export(trained["params"], run.base)
            if args.adapters_out:  # every process: a checkpoint write is collective over processes
                result["adapters_out"] = save_adapters(run, trained_adapters, args.adapters_out, args.overwrite,
                                                       {"model": source, "base_recipe": recipe.name})
        else:
            qparams, trained_adapters = qat.convert(trained, recipe), None
        qparams = jax.block_until_ready(qparams)
        if args.out:  # every process (collective); process 0 writes the metadata
            meta = {"model": source, "model_family": m.family.name, "model_config": config_dict(mcfg),
                    "recipe_file": str(args.recipe),
                    "qat": {k: v for k, v in result.items() if k != "model"}}
            result["out"] = str(checkpoint.save(args.out, qparams, recipe=recipe, meta=meta, overwrite=args.overwrite))
        if args.eval_windows:
            # what was written: the base with its adapters (LoRA), else the exported integer model itself
            result["eval"] = evaluate(qparams if trained_adapters is None else run.params_of(trained["params"],
                                                                                             run.base))
            if args.float:  # the control's own perplexity: how much the fine-tune alone moved the float model
                result["eval_float"] = evaluate(trained["params"])
    result["seconds"] = time.perf_counter() - t0
    if console_out:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
