"""`quantize_model`: calibrated quantization of a user's own model — linen or NNX — with no declarations.

It traces the model's use of its weights (contraction axes, embeddings by their gathered rows), then calibrates:

- **block by block** (`jq.calibration.sequential`) when `jq.calibration.discover` finds repeated top-level linen
  blocks (`layers_0 … layers_N`) whose calibrated weights are standard layers — jitted per block, staged by shared
  input;
- **weight by weight through the traced jaxpr** (`jq.calibration.traced_sequential`) otherwise — `nn.scan`
  stacks, NNX models (`nnx.List` of blocks or any structure), custom einsum modules, keyword-argument blocks: each
  weight on the inputs the already quantized weights before it produce;
- **in one shot** (`sequential=False`, linen): every weight on the float model's activations, streamed batch by
  batch (the least memory).
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np

from jq.calibration.capture import batched, capture
from jq.calibration.discover import discover_blocks
from jq.calibration.sequential import quantize_sequential
from jq.calibration.traced_sequential import quantize_traced
from jq.interop.usage import Usage, trace_nnx_usage, trace_usage
from jq.tree.paths import leaf_paths
from jq.tree.quantize import quantize_params, warn_unmatched_rules
from jq.tree.recipe import QuantConfig

__all__ = ["quantize_model"]


def _is_nnx(model: Any) -> bool:
    from flax import nnx

    return isinstance(model, nnx.GraphDef)


def _trace(model: Any, params: Any, batch: np.ndarray) -> Usage:
    if _is_nnx(model):
        return trace_nnx_usage(model, params, jnp.asarray(batch))
    return trace_usage(model, {"params": params}, jnp.asarray(batch))


def _equal_batches(tokens: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """`tokens` [S, ...] cut into batches of one shape (the traced one): the largest size <= batch_size dividing S."""
    b = max(d for d in range(1, min(batch_size, len(tokens)) + 1) if len(tokens) % d == 0)
    return [tokens[i:i + b] for i in range(0, len(tokens), b)]


def quantize_model(model: Any, params: Any, cfg: QuantConfig, tokens: Sequence[Any] | np.ndarray | None, *,
                   batch_size: int = 8, progress: bool = False, sequential: bool = True) -> tuple[Any, dict[str, Any]]:
    """Quantize a model's params by `cfg`, calibrating on `tokens` (the model's input, [S, ...]) when a rule needs
    data (see the module docstring for the modes).

    Args:
      model, params: a linen module and its `variables["params"]`, or an NNX model split as
        `graphdef, state = nnx.split(model)` (then `nnx.merge(graphdef, state)(x)` runs it; use the quantized
        state with `jq.nnx_merge`).
      tokens: calibration inputs [S, ...]; None for a data-free recipe (axes then follow the Flax convention).
      batch_size: rows per batch (the weight-by-weight mode holds, for all S rows, the activations that cross
        from one calibrated weight to the next, e.g. the residual stream).
      sequential: False calibrates a linen model in one shot on the float model's activations.
    Returns (qparams, log): log["mode"] is "data-free", "sequential" (blocks), "sequential (traced)" or
    "one-shot"; log["discovery"] says what was found. A recipe's `lowrank` section (LoRC, linen) is applied last,
    its Hessians from the float model on `tokens`."""
    from flax import nnx

    if isinstance(model, nnx.Module):
        raise TypeError(f"quantize_model: got the NNX module {type(model).__name__} itself; pass its split parts: "
                        "graphdef, state = nnx.split(model); jq.quantize_model(graphdef, state, cfg, tokens)")
    if cfg.lowrank is not None:
        if _is_nnx(model):
            raise ValueError("quantize_model: a recipe's lowrank section (LoRC) is supported on linen models only; "
                             "drop it for this NNX model")
        from jq.adapters.lorc import compensate_model

        qparams, log = quantize_model(model, params, dataclasses.replace(cfg, lowrank=None), tokens,
                                      batch_size=batch_size, progress=progress, sequential=sequential)
        qparams, log["lowrank"] = compensate_model(model, params, qparams, cfg.lowrank, tokens, batch_size)
        return qparams, log
    # how the model uses each leaf (contraction axes, embeddings by their gathered rows): a model's own einsum
    # weights quantize along the axes it contracts, not the Flax kernel convention
    usage = None if tokens is None else _trace(model, params, np.asarray(tokens)[:batch_size])
    if not cfg.needs_calibration:
        return quantize_params(params, cfg, usage=usage), {"mode": "data-free"}
    tokens = np.asarray(tokens)
    if any(r.transforms for r in cfg.rules):
        warnings.warn("AWQ / SmoothQuant transforms need to know which norm or layer produces each input, which a "
                      "model does not declare; they are skipped. Give a BlockSpec with folds "
                      "(jq.calibration.sequential) to apply them", stacklevel=2)
    if _is_nnx(model):
        spec, found = None, "an NNX model: its weights are followed in the traced jaxpr"
    else:
        spec, found = discover_blocks(model, params, tokens[:batch_size])
    if spec is not None:
        staged = {p for stage in spec.stages for p in stage}
        calibrated = [p for p, w in leaf_paths(params[spec.names[0]])
                      if (r := cfg.rule_for(f"{spec.names[0]}/{p}", getattr(w, "ndim", 0))) is not None
                      and r.scheme is not None and r.needs_calibration and p not in staged]
        if calibrated:
            spec, found = None, (f"{spec.names[0]}'s calibrated weights {calibrated} are not kernels of standard "
                                 "layers (nn.Dense / DenseGeneral / Einsum), which block-by-block capture reads")
    if spec is not None and sequential:
        warn_unmatched_rules(params, cfg, usage, stacklevel=3)  # the block-by-block pass does not say it
        qparams, log = quantize_sequential(spec, params, cfg, tokens, batch_size=batch_size, progress=progress)
        return qparams, {**log, "mode": "sequential", "discovery": found}
    if sequential or _is_nnx(model):
        batches = _equal_batches(tokens, batch_size)
        if len(batches[0]) != min(batch_size, len(tokens)):
            usage = _trace(model, params, batches[0])
        qparams, log = quantize_traced(usage, params, cfg, [(b,) for b in batches], progress=progress)
        return qparams, {**log, "mode": "sequential (traced)", "discovery": found}
    stats = capture(model, {"params": params}, batched(tokens, batch_size))
    return quantize_params(params, cfg, stats, usage=usage), {"mode": "one-shot", "discovery": found}
