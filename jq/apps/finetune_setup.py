"""The pieces of `jq qat` (`jq.apps.finetune`): its flags, the model and text it trains on, the PTQ start, the
optimizer, the loss and the progress display."""

from __future__ import annotations

import argparse
import dataclasses
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from jq.models import LoadedModel

if TYPE_CHECKING:
    import jax
    import optax
    from flax import linen as nn

    from jq.tree.recipe import QuantConfig

REPO = Path(__file__).resolve().parents[2]


class ByteTokenizer:
    """UTF-8 bytes as token ids (vocabulary 256): the tokenizer of the `--model tiny` smoke model."""

    vocab_size = 256
    bos_id = eos_id = None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """The UTF-8 bytes of `text` as ids (no special tokens: there are none)."""
        return list(text.encode("utf-8"))


def build_parser() -> argparse.ArgumentParser:
    """The parser of `jq qat`'s flags."""
    p = argparse.ArgumentParser(prog="jq qat", description="Quantization-aware fine-tuning, then conversion.")
    p.add_argument("--model", default="smollm2-135m",
                   help="a .gguf file, a Hugging Face directory, smollm2-135m, or 'tiny' "
                        "(random one-block Llama, byte tokens)")
    p.add_argument("--recipe", default="qat_w4_g128", help="QAT / PTQ recipe: a YAML file or a shipped recipe's name "
                                                               "(default qat_w4_g128)")
    p.add_argument("--init-recipe",
                   help="start from this calibrated PTQ recipe's result (e.g. AWQ + GPTQ, same grid as --recipe, "
                        "act_order: false) instead of RTN: masters = its dequantized weights, learned step sizes = "
                        "its scales and zeros (jq.qat.init_from)")
    from jq.apps.data import add_calib_args

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
    p.add_argument("--coordinator", help="multi-host: coordinator HOST:PORT (or JAX_COORDINATOR_ADDRESS), or 'auto' "
                   "on a TPU pod slice / SLURM (docs/MULTIHOST.md)")
    p.add_argument("--num-processes", type=int, help="multi-host: number of processes")
    p.add_argument("--process-id", type=int, help="multi-host: this process's index")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (log lines instead)")
    from jq.apps.finetune_adapters import add_adapter_args

    add_adapter_args(p)
    return p


# -- model and data ---------------------------------------------------------------------------------------------


def training_model(name: str, seed: int) -> LoadedModel:
    """The model to fine-tune: a model name / path (`jq.apps.pipeline.load`), or for 'tiny' a random one-block
    Llama (width 32) on byte tokens."""
    if name == "tiny":
        import jax

        from jq.models import get_family
        from jq.models.llama.config import LlamaConfig
        from jq.models.llama.model import init_params

        cfg = dataclasses.replace(LlamaConfig.tiny(vocab_size=ByteTokenizer.vocab_size), n_layers=1)
        params = jax.jit(init_params, static_argnums=0)(cfg, jax.random.PRNGKey(seed))
        return LoadedModel(get_family("llama"), cfg, params, ByteTokenizer(), "tiny")
    from jq.apps import pipeline

    return pipeline.load(name)


def corpus_windows(tokenizer: Any, files: list[Path], seq_len: int) -> np.ndarray:
    """Non-overlapping windows of `seq_len` tokens from each file's token stream → int32 [N, seq_len] (BOS +
    seq_len - 1 text tokens each for a model whose tokenizer adds BOS, as evaluation does)."""
    from jq.apps import data
    from jq.apps.perplexity import make_windows

    out = []
    for f in files:
        ids, bos = data.text_ids(tokenizer, data.read_text(f, "--corpus"))
        n = len(ids) // (seq_len - (bos is not None))
        if n:
            out.append(make_windows(ids, seq_len, n, bos))
    windows = np.concatenate(out) if out else np.zeros((0, seq_len), np.int32)
    if not len(windows):
        raise ValueError(f"the corpus {[str(f) for f in files]} holds no window of {seq_len} tokens")
    return windows


def default_corpus() -> list[Path]:
    """The training text files: the Austen books but the evaluation text, else the bundled excerpt."""
    from jq.apps import data

    files = data.default_calib_files()
    if files:
        return files
    excerpt = REPO / "data" / "persuasion_excerpt.txt"
    if excerpt.exists():
        return [excerpt]
    raise FileNotFoundError("no default corpus (shared Austen data absent): pass --corpus FILE [FILE ...]")


def evaluator(mcfg: Any, tokenizer: Any, args: argparse.Namespace) -> Callable[[Any], dict[str, Any]]:
    """`evaluate(params) -> perplexity dict` of float or quantized params on the first `args.eval_windows` windows
    of persuasion.txt; the text is tokenized and the forward jitted once, so the PTQ start and the converted model
    (same tree structure) share one compilation."""
    import jax.numpy as jnp

    from jq.apps import data, pipeline
    from jq.apps.perplexity import perplexity

    ids, bos = data.text_ids(tokenizer, data.default_eval_text().read_text(encoding="utf-8"))
    fwd = pipeline.quantized_forward(mcfg, jnp.dtype(args.dtype))
    return lambda params: perplexity(fwd, params, ids, window=args.eval_window, windows=args.eval_windows, bos=bos)


def ptq_start(m: LoadedModel, args: argparse.Namespace, files: list[Path],
              rotation: Any = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Quantize `m.params` by `args.init_recipe` (calibrated on the training corpus `files`) → (quantized params,
    {"name", "seconds", "calibration"}). `m` is already rotated by the QAT recipe's `rotation` section (or not,
    when it is None); the PTQ recipe must rotate the same way or not at all, as QAT trains one architecture."""
    import jq
    from jq.apps import data, pipeline

    ptq = jq.load_recipe(args.init_recipe)
    if ptq.rotation is not None and ptq.rotation != rotation:
        raise ValueError(f"--init-recipe {args.init_recipe}: its rotation section ({ptq.rotation}) differs from the "
                         f"QAT recipe's ({rotation}); QAT trains the model the QAT recipe describes. Give the QAT "
                         "recipe the same rotation section, or pick a PTQ recipe without one")
    ptq = dataclasses.replace(ptq, rotation=None)  # the model arrives rotated
    t0 = time.perf_counter()
    calib = calib_info = None
    if ptq.needs_calibration:
        calib, calib_info = data.calibration_draw(m.tokenizer, files, args.calib_samples, args.calib_len,
                                                  args.calib_seed, args.calib_sampling)
    qparams, _ = pipeline.quantize(m, ptq, calib, progress=not args.no_progress)
    return qparams, {"name": ptq.name, "seconds": time.perf_counter() - t0, "calibration": calib_info}


# -- training pieces --------------------------------------------------------------------------------------------


def make_optimizer(args: argparse.Namespace, qat_params: dict[str, Any]) -> optax.GradientTransformation:
    """AdamW on the weights (decay on ≥2-D weights only), Adam on learned step sizes, warm-up + cosine, clipped.
    `qat_params` is the `{"params": ..., "quant": ...}` tree of `jq.qat.init`."""
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


def _tree_const(tree: Any, value: str) -> Any:
    import jax

    return jax.tree_util.tree_map(lambda _: value, tree)


def make_loss(model: nn.Module, act_cfg: QuantConfig | None, alpha: float = 0.0,
              temperature: float = 1.0) -> Callable[..., jax.Array]:
    """loss(params, ids[B, T], [teacher_params]) = mean next-token cross-entropy of the (fake-quantized) model, or
    with alpha > 0 the `jq.qat.distill_loss` mix with KD from the float teacher's logits on the same ids."""
    from jq import qat

    def loss_fn(params, ids, teacher=None):
        logits = qat.apply(model, {"params": params}, ids, cfg=act_cfg)[:, :-1]
        target = None if teacher is None else model.apply({"params": teacher}, ids)[:, :-1]
        return qat.distill_loss(logits, target, ids[:, 1:], alpha if teacher is not None else 0.0, temperature)

    return loss_fn


def tree_bytes(tree: Any) -> int:
    """Bytes of every array in `tree` (QTensor codes, scales and zeros included): memory a train state holds."""
    import jax

    return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree_util.tree_leaves(tree)
               if hasattr(x, "shape") and hasattr(x, "dtype"))


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
