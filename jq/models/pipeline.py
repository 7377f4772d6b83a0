"""End to end on a Llama-family model: load, quantize by a recipe, evaluate perplexity. Used by the CLI and demo."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import jq
from jq.config import QuantConfig
from jq.models.config import LlamaConfig
from jq.models.eval import perplexity
from jq.models.llama import Llama
from jq.qtensor import QTensor

__all__ = ["LoadedModel", "load", "quantized_forward", "size_summary", "evaluate", "default_eval_text",
           "calibration_tokens", "default_calib_files", "quantize"]


@dataclasses.dataclass
class LoadedModel:
    cfg: LlamaConfig
    params: dict
    tokenizer: Any
    source: str


def load(model: str) -> LoadedModel:
    """Load a GGUF file, a Hugging Face directory or a known name (`smollm2-135m`)."""
    from jq.models.hub import load_model, resolve_model

    cfg, params, tok = load_model(model)
    if tok is None:
        raise ValueError(f"{model}: no tokenizer found (tokenizer.json in the directory, or a GGUF vocabulary)")
    return LoadedModel(cfg, params, tok, str(resolve_model(model)))


def quantized_forward(cfg: LlamaConfig, dtype=jnp.float32):
    """A jitted `forward(params, ids[B, T]) -> logits[B, T, V]` that accepts float or quantized params."""
    model = Llama(cfg, dtype=dtype)
    return jax.jit(lambda params, ids: jq.flax.apply(model, {"params": params}, ids))


def size_summary(params) -> dict[str, float]:
    """Stored bytes and bits/weight: over the whole model, and over the linear kernels (what recipes target)."""
    tot_n = tot_b = lin_n = lin_b = 0
    for path, x in jq.leaf_paths(params):
        if isinstance(x, QTensor):
            n, b = x.size, x.nbytes
        else:
            n, b = int(np.prod(x.shape)), int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize
        tot_n, tot_b = tot_n + n, tot_b + b
        if path.endswith("kernel") and "lm_head" not in path:
            lin_n, lin_b = lin_n + n, lin_b + b
    return {
        "model_bytes": tot_b,
        "bits_per_weight": 8.0 * tot_b / tot_n,
        "linear_bits_per_weight": 8.0 * lin_b / max(lin_n, 1),
        "params": tot_n,
    }


def calibration_tokens(tokenizer, files: list[Path], samples: int = 128, length: int = 512, seed: int = 0) -> np.ndarray:
    """`samples` non-overlapping windows of `length` tokens drawn at random (seeded) from the files' token streams
    → int32 [samples, length]. Errors name the files, the tokens they hold and what was asked."""
    if samples < 1 or length < 2:
        raise ValueError(f"calibration needs samples >= 1 and length >= 2, got {samples} x {length}")
    streams = [np.asarray(tokenizer.encode(Path(f).read_text(encoding="utf-8")), np.int32) for f in files]
    slots = [(i, j * length) for i, st in enumerate(streams) for j in range(len(st) // length)]
    if len(slots) < samples:
        total = sum(len(s_) for s_ in streams)
        raise ValueError(
            f"calibration text too short: {', '.join(str(f) for f in files)} hold {total} tokens, {len(slots)} "
            f"windows of {length}; {samples} were asked. Pass more text (--calib) or fewer/shorter samples "
            "(--calib-samples / --calib-len)"
        )
    pick = np.random.default_rng(seed).choice(len(slots), size=samples, replace=False)
    return np.stack([streams[slots[k][0]][slots[k][1] : slots[k][1] + length] for k in sorted(pick)])


def default_calib_files(eval_text: Path | None = None) -> list[Path]:
    """The shared Austen books other than the evaluation text (empty when the shared data is absent)."""
    d = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "austen"
    if not d.is_dir():
        return []
    name = Path(eval_text).name if eval_text else "persuasion.txt"
    return sorted(p for p in d.glob("*.txt") if p.name != name)


def quantize(m: LoadedModel, recipe: QuantConfig, calib: np.ndarray | None = None, *, progress: bool = True):
    """Quantize the model's params by `recipe`: sequentially on `calib` tokens [S, L] when the recipe needs data."""
    if not recipe.needs_calibration:
        return jax.block_until_ready(jq.quantize_params(m.params, recipe)), {}
    if calib is None:
        raise ValueError(f"recipe {recipe.name!r} needs calibration data: pass calibration text (--calib FILE ...)")
    from jq.models.llama_blocks import block_spec
    from jq.sequential import quantize_sequential

    return quantize_sequential(block_spec(m.cfg), m.params, recipe, calib, progress=progress)


def evaluate(
    m: LoadedModel,
    text: str,
    recipe: QuantConfig | None = None,
    *,
    window: int = 512,
    windows: int = 16,
    batch_size: int = 4,
    dtype=jnp.float32,
    calib: np.ndarray | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Quantize `m` by `recipe` (None: float; calibrated on `calib` tokens when the recipe needs data) and
    measure perplexity on `text` (see `jq.models.eval`)."""
    t0 = time.perf_counter()
    ids = np.asarray(m.tokenizer.encode(text), np.int32)
    params, qlog = m.params, {}
    if recipe is not None:
        params, qlog = quantize(m, recipe, calib, progress=progress)
    t1 = time.perf_counter()
    result = perplexity(quantized_forward(m.cfg, dtype), params, ids, window=window, windows=windows, batch_size=batch_size)
    t2 = time.perf_counter()
    return {
        "model": m.source,
        "recipe": recipe.name if recipe is not None else "float",
        **result,
        **size_summary(params),
        "quantize_seconds": t1 - t0,
        "calibration": None if calib is None or not recipe or not recipe.needs_calibration
        else {"samples": int(calib.shape[0]), "length": int(calib.shape[1]), "transforms": qlog.get("transforms", [])},
        "eval_seconds": t2 - t1,
        "seconds": t2 - t0,
    }


def default_eval_text() -> Path:
    """persuasion.txt from the shared Austen data when present, else the excerpt shipped in the repo."""
    repo = Path(__file__).resolve().parents[2]
    for p in (repo.parent / "shared" / "data" / "austen" / "persuasion.txt", repo / "data" / "persuasion_excerpt.txt"):
        if p.exists():
            return p
    raise FileNotFoundError("no default evaluation text: pass --text FILE")
