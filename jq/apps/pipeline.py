"""End to end on any registered causal-LM family: load, quantize by a recipe (rotated and calibrated as it asks),
evaluate perplexity. Used by the CLI, the demo and fine-tuning; the model's family record does the model-specific
parts (its module, calibration blocks, rotation)."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from jq.adapters.lorc import compensate_model
from jq.apps.data import check_window, text_ids
from jq.apps.perplexity import make_windows, perplexity
from jq.calibration.capture import capture
from jq.calibration.sequential import quantize_sequential
from jq.interop import apply
from jq.models import LoadedModel, family_of, load_model
from jq.models.family import config_dict
from jq.numbers.kvcache import KVCacheConfig
from jq.tree.paths import leaf_paths
from jq.tree.quantize import quantize_params
from jq.tree.recipe import QuantConfig
from jq.tree.report import size_summary

__all__ = ["LoadedModel", "load", "quantized_forward", "evaluate", "rotated", "quantize", "outlier_fractions",
           "load_quantized", "checkpoint_config", "quantized_weights"]

Params = dict[str, Any]


def load(model: str, native: bool = False) -> LoadedModel:
    """Load a GGUF file, a Hugging Face directory or a known name (`smollm2-135m`) of a causal-LM family, with its
    tokenizer; `native`: keep a GGUF file's legacy block types as the QTensors they are (the model as shipped)."""
    m = load_model(model, native)
    if not m.family.causal_lm:
        raise ValueError(f"{model}: a {m.family.name} model is not a causal language model; perplexity and "
                         "generation need one (an encoder is measured by benchmarks/minilm_fidelity.py)")
    if m.tokenizer is None:
        raise ValueError(f"{model}: no tokenizer found (tokenizer.json in the directory, or a GGUF vocabulary)")
    return m


def quantized_forward(cfg: Any, dtype: Any = jnp.float32,
                      kv_cache: KVCacheConfig | None = None) -> Callable[[Params, jax.Array], jax.Array]:
    """A jitted `forward(params, ids[B, T]) -> logits[B, T, V]` of the family whose config `cfg` is, accepting
    float or quantized params; `kv_cache` (e.g. `recipe.kv_cache`) quantizes k/v before attention."""
    model = family_of(cfg).module(cfg, dtype=dtype, kv_cache=kv_cache)
    return jax.jit(lambda params, ids: apply(model, {"params": params}, ids))


def rotated(m: LoadedModel, recipe: QuantConfig | None) -> LoadedModel:
    """`m` with the recipe's model-level rotation applied by its family, or `m` itself when the recipe has none.
    The rotated model computes the same function; its config may differ (Llama's unties the LM head)."""
    if recipe is None or recipe.rotation is None:
        return m
    rotate = m.family.needs("rotate", f"recipe {recipe.name!r} (its rotation section)")
    params, cfg = rotate(m.params, m.cfg, recipe.rotation)
    return dataclasses.replace(m, cfg=cfg, params=params)


def quantize(m: LoadedModel, recipe: QuantConfig, calib: np.ndarray | None = None, *,
             progress: bool = True) -> tuple[Params, dict[str, Any]]:
    """Quantize the model's params by `recipe` → (params, log): rotated first when the recipe has a `rotation`
    (then `log["model_config"]` is the rotated model's config, which the quantized params need), sequentially on
    `calib` tokens [S, L] through the family's calibration blocks when the recipe needs data."""
    r = rotated(m, recipe)
    extra: dict[str, Any] = {"model_config": r.cfg} if r is not m else {}
    if recipe.needs_calibration and calib is None:
        raise ValueError(f"recipe {recipe.name!r} needs calibration data: pass calibration text (--calib FILE ...)")
    if recipe.smooth_attention is not None:  # QoQ: keys' outlier channels moved into the queries (same function)
        smooth = m.family.needs("smooth_attention", f"recipe {recipe.name!r} (its smooth_attention section)")
        sparams, extra["smooth_attention"] = smooth(r.params, r.cfg, recipe.smooth_attention, calib)
        r = dataclasses.replace(r, params=sparams)
    if not recipe.rules_need_calibration:
        params, log = jax.block_until_ready(quantize_params(r.params, recipe)), {}
    else:
        block_spec = m.family.needs("block_spec", f"the calibrated recipe {recipe.name!r}")
        params, log = quantize_sequential(block_spec(r.cfg), r.params, recipe, calib, progress=progress)
    if recipe.lowrank is not None:  # LoRC after the rules, Hessians from the float (rotated) model
        params, log["lowrank"] = compensate_model(r.family.module(r.cfg), r.params, params, recipe.lowrank, calib)
    return params, {**log, **extra}


def outlier_fractions(m: LoadedModel, recipe: QuantConfig, tokens: np.ndarray) -> dict[str, float]:
    """For rules with an LLM.int8 threshold (`act_outlier`): per layer, the fraction of input channels whose
    |x| exceeds it for some token of `tokens` [B, T] in the float (rotated, if the recipe rotates) model — the
    channels the decomposition keeps in float for such a batch."""
    r = rotated(m, recipe)
    thr = {}
    for path, w in leaf_paths(r.params):
        rule = recipe.rule_for(path, np.ndim(w))
        if rule is not None and rule.scheme is not None and rule.scheme.act_outlier is not None:
            thr[path] = rule.scheme.act_outlier
    if not thr:
        return {}
    stats = capture(r.family.module(r.cfg), {"params": r.params}, [jnp.asarray(tokens)], paths=list(thr))
    return {p: float(np.mean(np.asarray(stats[p].act_absmax) > t)) for p, t in thr.items()}


def evaluate(
    m: LoadedModel,
    text: str,
    recipe: QuantConfig | None = None,
    *,
    window: int = 512,
    windows: int = 16,
    batch_size: int = 4,
    dtype: Any = jnp.float32,
    calib: np.ndarray | None = None,
    progress: bool = False,
    also: dict[str, str] | None = None,
    quantized: str | Path | None = None,
) -> dict[str, Any]:
    """Quantize `m` by `recipe` (None: float; calibrated on `calib` tokens, int [N, T], when the recipe needs data) —
    or run the weights of the checkpoint directory `quantized` (`jq quantize --out`, `jq qat --out`) — and
    measure perplexity on `text` (see `jq.apps.perplexity`); `also` maps names to more texts scored by the same
    quantized model (same window / windows; fewer windows when a text is shorter), reported under "also"."""
    check_window(m.cfg, window)
    if quantized is not None and recipe is not None:
        raise ValueError(f"a recipe ({recipe.name}) and a quantized checkpoint ({quantized}) cannot both be evaluated: "
                         "the checkpoint's weights are quantized already; pass one of them")
    t0 = time.perf_counter()
    ids, bos = text_ids(m.tokenizer, text)
    params, qlog, cfg, kv, source = m.params, {}, m.cfg, None, None
    if recipe is not None:
        params, qlog = quantize(m, recipe, calib, progress=progress)
        cfg, kv = qlog.get("model_config", m.cfg), recipe.kv_cache
    elif quantized is not None:
        params, cfg, kv = quantized_weights(m, quantized)
        source = f"quantized:{quantized}"
    t1 = time.perf_counter()
    fwd = quantized_forward(cfg, dtype, kv)
    result = perplexity(fwd, params, ids, window=window, windows=windows, batch_size=batch_size, bos=bos)
    extra = {}
    for name, t in (also or {}).items():
        other = text_ids(m.tokenizer, t)[0]
        if len(other) <= window:
            raise ValueError(f"evaluation text {name!r} has {len(other)} tokens, not more than one window of {window}")
        extra[name] = perplexity(fwd, params, other, window=window, windows=min(windows, (len(other) - 1) // window),
                                 batch_size=batch_size, bos=bos)
    t2 = time.perf_counter()
    outliers = {}
    if recipe is not None and any(r.scheme is not None and r.scheme.act_outlier is not None for r in recipe.rules):
        n = min(batch_size, len(ids) // window)
        outliers = outlier_fractions(m, recipe, make_windows(ids, window, n, bos))
    sizes = size_summary(params)
    return {
        "model": m.source,
        "family": m.family.name,
        "recipe": recipe.name if recipe is not None else source or ("native" if m.native else "float"),
        **({"native": m.native} if m.native and recipe is None else {}),
        "kv_cache": kv.describe() if kv is not None else None,
        "rotation": dataclasses.asdict(recipe.rotation) if recipe is not None and recipe.rotation else None,
        **result,
        **{k: sizes[k] for k in ("model_bytes", "bits_per_weight", "linear_bits_per_weight", "params")},
        "quantize_seconds": t1 - t0,
        "calibration": None if calib is None or not recipe or not recipe.needs_calibration
        else {"samples": int(calib.shape[0]), "length": int(calib.shape[1]), "transforms": qlog.get("transforms", []),
              **({"smooth_attention": qlog["smooth_attention"]} if "smooth_attention" in qlog else {})},
        "eval_seconds": t2 - t1,
        "seconds": t2 - t0,
        **({"outlier_fraction": outliers} if outliers else {}),
        **({"also": extra} if extra else {}),
    }


def checkpoint_config(m: LoadedModel, meta: dict[str, Any], where: str) -> Any:
    """The config a quantized checkpoint's params need, checked against the model `m` it is run with: the stored
    `model_config` (whose `derived_fields` a rotation may have changed; every other field must match `m.cfg`),
    else `m.cfg`. `where` names the checkpoint in the error."""
    saved = meta.get("model_config") or {}
    cur = config_dict(m.cfg)
    diff = sorted(k for k in saved if k in cur and saved[k] != cur[k] and k not in m.family.derived_fields)
    if diff:
        raise ValueError(f"{where} was written for another model ({', '.join(diff)} differ from {m.source}); pass "
                         "the model it was quantized from")
    return type(m.cfg)(**{**cur, **{k: v for k, v in saved.items() if k in cur}})


def load_quantized(directory: str | Path) -> tuple[Params, dict[str, Any], KVCacheConfig | None]:
    """(params, meta, kv_cache) of a jq checkpoint (`jq quantize --out DIR`, `jq convert`): `meta` is the writer's
    metadata dict (empty when none is recorded); `kv_cache` is the `KVCacheConfig` of the stored recipe, or None."""
    from jq import checkpoint

    directory = Path(directory)
    if not directory.exists():
        raise FileNotFoundError(f"--quantized {directory}: no such directory (write one with jq quantize --out DIR)")
    tree, info = checkpoint.load(directory)
    recipe = info.get("recipe") or {}
    kv = recipe.get("kv_cache") if isinstance(recipe, dict) else None
    return tree, dict(info.get("meta") or {}), KVCacheConfig(**kv) if kv else None


def quantized_weights(m: LoadedModel, directory: str | Path) -> tuple[Params, Any, KVCacheConfig | None]:
    """(params, config, kv_cache) to run the checkpoint in `directory` with the model `m` it was quantized from: its
    tree, its stored config checked against `m` (`checkpoint_config`), the KV cache of its recipe."""
    params, meta, kv = load_quantized(directory)
    return params, checkpoint_config(m, meta, f"--quantized {directory}"), kv
