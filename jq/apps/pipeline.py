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
from jq.tree.recipe import QuantConfig
from jq.models.llama.config import LlamaConfig
from jq.apps.perplexity import perplexity
from jq.models.llama.model import Llama
from jq.numbers.qtensor import QTensor

__all__ = ["LoadedModel", "load", "quantized_forward", "size_summary", "evaluate", "default_eval_text",
           "calibration_tokens", "calibration_draw", "add_calib_args", "default_calib_files", "quantize", "load_quantized",
           "read_text", "check_window"]


@dataclasses.dataclass
class LoadedModel:
    cfg: LlamaConfig
    params: dict
    tokenizer: Any
    source: str


def load(model: str) -> LoadedModel:
    """Load a GGUF file, a Hugging Face directory or a known name (`smollm2-135m`)."""
    from jq.models.io.hub import load_model, resolve_model

    cfg, params, tok = load_model(model)
    if tok is None:
        raise ValueError(f"{model}: no tokenizer found (tokenizer.json in the directory, or a GGUF vocabulary)")
    return LoadedModel(cfg, params, tok, str(resolve_model(model)))


def quantized_forward(cfg: LlamaConfig, dtype=jnp.float32, kv_cache=None):
    """A jitted `forward(params, ids[B, T]) -> logits[B, T, V]` that accepts float or quantized params;
    `kv_cache` (a `jq.numbers.kvcache.KVCacheConfig`, e.g. `recipe.kv_cache`) quantizes k/v before attention."""
    model = Llama(cfg, dtype=dtype, kv_cache=kv_cache)
    return jax.jit(lambda params, ids: jq.interop.apply(model, {"params": params}, ids))


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


CALIB_SAMPLINGS = ("windows", "stream")


def read_text(path: str | Path, what: str = "text file") -> str:
    """The UTF-8 text of `path`; errors name `what` (e.g. "--calib"), the file, and the fix: a missing file, or
    bytes that are not UTF-8 (with the first bad byte and its offset)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{what} {p}: no such file" + (" (it is a directory)" if p.is_dir() else ""))
    data = p.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{what} {p}: not UTF-8 text (byte {data[e.start]:#04x} at offset {e.start}); convert it "
                         "to UTF-8 (e.g. `iconv -f latin1 -t utf-8`) or pass another file") from None


def check_window(cfg: Any, window: int, what: str = "window") -> None:
    """Refuse a window longer than the model's context (`cfg.max_seq_len`): positions beyond it were never
    trained, so a perplexity there means nothing."""
    ctx = getattr(cfg, "max_seq_len", None)
    if ctx is not None and window > ctx:
        raise ValueError(f"{what} {window} is longer than the model's context of {ctx} tokens (max_seq_len); use "
                         f"{what} {ctx} or less")


def add_calib_args(parser, what: str = "calibration") -> None:
    """The flags of a calibration draw (`calibration_draw`'s arguments, with its defaults) on an argparse parser:
    --calib-samples, --calib-len, --calib-seed, --calib-sampling. `what` names the windows in the help text."""
    parser.add_argument("--calib-samples", type=int, default=128, help=f"{what} windows (default 128)")
    parser.add_argument("--calib-len", type=int, default=512, help=f"tokens per {what} window (default 512)")
    parser.add_argument("--calib-seed", type=int, default=0, help=f"seed for drawing the {what} windows")
    parser.add_argument("--calib-sampling", choices=CALIB_SAMPLINGS, default=CALIB_SAMPLINGS[0],
                        help="windows: distinct aligned windows per file (default); stream: random starts anywhere "
                             "in the concatenated text, with replacement (the published GPTQ code's draw)")


def calibration_tokens(tokenizer, files: list[Path], samples: int = 128, length: int = 512, seed: int = 0,
                       sampling: str = "windows") -> np.ndarray:
    """`samples` windows of `length` tokens drawn at random (seeded) from the files' token streams → int32
    [samples, length]. `sampling="windows"`: distinct non-overlapping windows aligned within each file;
    `"stream"`: a uniformly random start anywhere in the files' concatenated stream, with replacement (windows may
    overlap or straddle two files) — how the published GPTQ code draws its calibration set. Errors name the files,
    the tokens they hold and what was asked."""
    if samples < 1 or length < 2:
        raise ValueError(f"calibration needs samples >= 1 and length >= 2, got {samples} x {length}")
    if sampling not in CALIB_SAMPLINGS:
        raise ValueError(f"calibration sampling {sampling!r}: expected one of {', '.join(CALIB_SAMPLINGS)}")
    streams = [np.asarray(tokenizer.encode(read_text(f, "calibration file")), np.int32) for f in files]
    total = sum(len(s_) for s_ in streams)
    rng = np.random.default_rng(seed)
    if sampling == "stream":
        if total < length:
            raise ValueError(f"calibration text too short: {', '.join(str(f) for f in files)} hold {total} tokens, "
                             f"fewer than one window of {length}. Pass more text (--calib) or a shorter --calib-len")
        stream = np.concatenate(streams)
        starts = rng.integers(0, total - length + 1, size=samples)
        return np.stack([stream[i : i + length] for i in starts])
    slots = [(i, j * length) for i, st in enumerate(streams) for j in range(len(st) // length)]
    if len(slots) < samples:
        raise ValueError(
            f"calibration text too short: {', '.join(str(f) for f in files)} hold {total} tokens, {len(slots)} "
            f"windows of {length}; {samples} were asked. Pass more text (--calib) or fewer/shorter samples "
            "(--calib-samples / --calib-len), or --calib-sampling stream (windows may overlap)"
        )
    pick = rng.choice(len(slots), size=samples, replace=False)
    return np.stack([streams[slots[k][0]][slots[k][1] : slots[k][1] + length] for k in sorted(pick)])


def calibration_draw(tokenizer, files: list[Path], samples: int = 128, length: int = 512, seed: int = 0,
                     sampling: str = "windows") -> tuple[np.ndarray, dict]:
    """`calibration_tokens(...)` and the record of the draw (files, samples, length, seed, sampling) that results
    and checkpoints carry, so a figure names the calibration it came from."""
    tokens = calibration_tokens(tokenizer, files, samples, length, seed, sampling)
    return tokens, {"files": [str(f) for f in files], "samples": samples, "length": length, "seed": seed,
                    "sampling": sampling}


def default_calib_files(eval_text: Path | None = None) -> list[Path]:
    """The shared Austen books other than the evaluation text (empty when the shared data is absent)."""
    d = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "austen"
    if not d.is_dir():
        return []
    name = Path(eval_text).name if eval_text else "persuasion.txt"
    return sorted(p for p in d.glob("*.txt") if p.name != name)


def rotated(m: LoadedModel, recipe: QuantConfig | None) -> LoadedModel:
    """`m` with the recipe's model-level rotation applied (`jq.models.llama.rotate`), or `m` itself when it has none.
    The rotated model computes the same function; its config unties the LM head."""
    if recipe is None or recipe.rotation is None:
        return m
    from jq.models.llama.rotate import rotate

    params, cfg = rotate(m.params, m.cfg, recipe.rotation)
    return dataclasses.replace(m, cfg=cfg, params=params)


def quantize(m: LoadedModel, recipe: QuantConfig, calib: np.ndarray | None = None, *, progress: bool = True):
    """Quantize the model's params by `recipe` → (params, log): rotated first when the recipe has a `rotation`
    (then `log["model_config"]` is the rotated model's config, which the quantized params need), sequentially on
    `calib` tokens [S, L] when the recipe needs data."""
    r = rotated(m, recipe)
    extra = {"model_config": r.cfg} if r is not m else {}
    if not recipe.needs_calibration:
        return jax.block_until_ready(jq.quantize_params(r.params, recipe)), extra
    if calib is None:
        raise ValueError(f"recipe {recipe.name!r} needs calibration data: pass calibration text (--calib FILE ...)")
    from jq.models.llama.blocks import block_spec
    from jq.calibration.sequential import quantize_sequential

    params, log = quantize_sequential(block_spec(r.cfg), r.params, recipe, calib, progress=progress)
    return params, {**log, **extra}


def outlier_fractions(m: LoadedModel, recipe: QuantConfig, tokens: np.ndarray) -> dict[str, float]:
    """For rules with an LLM.int8 threshold (`act_outlier`): per layer, the fraction of input channels whose
    |x| exceeds it for some token of `tokens` [B, T] in the float (rotated, if the recipe rotates) model — the
    channels the decomposition keeps in float for such a batch."""
    from jq.calibration.capture import capture
    from jq.tree.quantize import leaf_paths

    r = rotated(m, recipe)
    thr = {}
    for path, w in leaf_paths(r.params):
        rule = recipe.rule_for(path, np.ndim(w))
        if rule is not None and rule.scheme is not None and rule.scheme.act_outlier is not None:
            thr[path] = rule.scheme.act_outlier
    if not thr:
        return {}
    stats = capture(Llama(r.cfg), {"params": r.params}, [jnp.asarray(tokens)], paths=list(thr))
    return {p: float(np.mean(np.asarray(stats[p]["act_absmax"]) > t)) for p, t in thr.items()}


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
    also: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Quantize `m` by `recipe` (None: float; calibrated on `calib` tokens when the recipe needs data) and
    measure perplexity on `text` (see `jq.apps.perplexity`); `also` maps names to more texts scored by the same
    quantized model (same window / windows; fewer windows when a text is shorter), reported under "also"."""
    check_window(m.cfg, window)
    t0 = time.perf_counter()
    ids = np.asarray(m.tokenizer.encode(text), np.int32)
    params, qlog = m.params, {}
    if recipe is not None:
        params, qlog = quantize(m, recipe, calib, progress=progress)
    t1 = time.perf_counter()
    kv = recipe.kv_cache if recipe is not None else None
    cfg = qlog.get("model_config", m.cfg)
    fwd = quantized_forward(cfg, dtype, kv)
    result = perplexity(fwd, params, ids, window=window, windows=windows, batch_size=batch_size)
    extra = {}
    for name, t in (also or {}).items():
        other = np.asarray(m.tokenizer.encode(t), np.int32)
        if len(other) <= window:
            raise ValueError(f"evaluation text {name!r} has {len(other)} tokens, not more than one window of {window}")
        extra[name] = perplexity(fwd, params, other, window=window, windows=min(windows, (len(other) - 1) // window),
                                 batch_size=batch_size)
    t2 = time.perf_counter()
    outliers = {}
    if recipe is not None and any(r.scheme is not None and r.scheme.act_outlier is not None for r in recipe.rules):
        n = min(batch_size, len(ids) // window)
        outliers = outlier_fractions(m, recipe, ids[: n * window].reshape(n, window))
    return {
        "model": m.source,
        "recipe": recipe.name if recipe is not None else "float",
        "kv_cache": kv.describe() if kv is not None else None,
        "rotation": dataclasses.asdict(recipe.rotation) if recipe is not None and recipe.rotation else None,
        **result,
        **size_summary(params),
        "quantize_seconds": t1 - t0,
        "calibration": None if calib is None or not recipe or not recipe.needs_calibration
        else {"samples": int(calib.shape[0]), "length": int(calib.shape[1]), "transforms": qlog.get("transforms", [])},
        "eval_seconds": t2 - t1,
        "seconds": t2 - t0,
        **({"outlier_fraction": outliers} if outliers else {}),
        **({"also": extra} if extra else {}),
    }


def default_eval_text() -> Path:
    """persuasion.txt from the shared Austen data when present, else the excerpt shipped in the repo."""
    repo = Path(__file__).resolve().parents[2]
    for p in (repo.parent / "shared" / "data" / "austen" / "persuasion.txt", repo / "data" / "persuasion_excerpt.txt"):
        if p.exists():
            return p
    raise FileNotFoundError("no default evaluation text: pass --text FILE")


def load_quantized(directory: str | Path):
    """(params, meta, kv_cache) of a jq checkpoint (`jq quantize --out DIR`, `jq convert`): `meta` is the writer's
    metadata dict (empty when none is recorded); `kv_cache` is the `KVCacheConfig` of the stored recipe, or None."""
    from jq import checkpoint
    from jq.numbers.kvcache import KVCacheConfig

    directory = Path(directory)
    if not directory.exists():
        raise FileNotFoundError(f"--quantized {directory}: no such directory (write one with jq quantize --out DIR)")
    tree, info = checkpoint.load(directory)
    recipe = info.get("recipe") or {}
    kv = recipe.get("kv_cache") if isinstance(recipe, dict) else None
    return tree, dict(info.get("meta") or {}), KVCacheConfig(**kv) if kv else None
