"""LoftQ (Li et al. 2023): a quantized base and adapters initialised together, so base + adapter starts close to the
float weight instead of at the quantized one (QLoRA's zero-initialised adapter starts at the quantization error).

For each adapted weight W, T alternating steps: Q_t = quantize(W − (α/r)·a_{t−1} b_{t−1}) by the recipe's rule, then
(a_t, b_t) = the rank-r truncated SVD of W − deq(Q_t), divided by α/r. The reported residual
‖W − deq(Q_t) − (α/r)·a_t b_t‖_F / ‖W‖_F falls with t (t = 0 is plain quantization, no adapter) — mostly: the
quantizer rounds W − a b to its own grid, not to the one that minimises the joint residual, so a late step can rise a
little; the iterate with the smallest residual is the one returned.

With `stats` (input Hessians H = XᵀX by path, as `jq.calibration.capture` returns them) the SVD step is the
activation-weighted one of LoRC (`low_rank_fit(…, h)`), and residuals are measured in the layer-output metric
‖X(W − deq Q − a b)‖ / ‖X W‖: the adapter then spends its rank where the layer's inputs are large (an extension of
LoftQ here, not in the paper).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

from jq.adapters.lora import LoraConfig, factor_shapes, targets
from jq.algorithms.lowrank import damped_cholesky, low_rank_fit
from jq.algorithms.stats import LayerStats
from jq.numbers.lowrank import dense_base, is_weight_leaf
from jq.tree.paths import get_path, path_str, set_path
from jq.tree.quantize import quantize_leaf, quantize_params
from jq.tree.recipe import QuantConfig

__all__ = ["init"]


def init(params: Any, recipe: QuantConfig, cfg: LoraConfig, steps: int = 5, stats: Any = None,
         damp: float = 0.01) -> tuple[Any, dict, dict[str, list]]:
    """(quantized params, adapters, residuals by path) for float `params`: every leaf `cfg` adapts (and `recipe`
    quantizes with a data-free method) alternates quantization and SVD `steps` times; the other leaves are
    quantized by `recipe` as usual. residuals[path] = [relative residual of plain quantization, after step 1, ..,
    steps]; each leaf keeps its best step."""
    if steps < 1:
        raise ValueError(f"LoftQ steps {steps} must be >= 1 (steps = 0 is QLoRA's zero-initialised adapter)")
    if cfg.pooled:
        raise ValueError("LoftQ initialises plain adapters; pooled (QA-LoRA) adapters merge into zero points and are "
                         "zero-initialised (pooled: false for LoftQ)")
    qparams = quantize_params(params, recipe)
    adapters: dict = {}
    residuals: dict[str, list] = {}
    done: dict[str, Any] = {}
    for path, w in targets(params, cfg):
        rule = recipe.rule_for(path, w.ndim)
        if rule is None or rule.scheme is None:
            raise ValueError(f"{path}: LoftQ adapts a quantized base, but recipe {recipe.name!r} keeps this leaf float;"
                             " exclude it (LoraConfig.exclude) or give it a rule")
        if rule.needs_calibration:
            raise ValueError(f"{path}: LoftQ re-quantizes W − a b each step; method {rule.method!r} needs calibration "
                             "statistics of that weight's inputs. Use a data-free method (rtn, hqq, higgs) for LoftQ")
        s = LayerStats.coerce((stats or {}).get(path))
        q, a, b, res = _alternate(path, jnp.asarray(w, jnp.float32), rule, cfg, steps,
                                  tuple(get_path(qparams, path).layout.axes), None if s is None else s.hessian, damp)
        set_path(adapters, path, {"a": a, "b": b})
        residuals[path] = res
        done[path] = q
    qparams = jax.tree_util.tree_map_with_path(lambda kp, x: done.get(path_str(kp), x), qparams, is_leaf=is_weight_leaf)
    return qparams, adapters, residuals


def _alternate(path: str, w: jax.Array, rule: Any, cfg: LoraConfig, steps: int, axes: tuple[int, ...],
               h: jax.Array | None, damp: float):
    n_in = len(axes)
    kdims, ndims = w.shape[:n_in], w.shape[n_in:]
    k, n = math.prod(kdims), math.prod(ndims)
    w2 = w.reshape(k, n)
    if h is not None and tuple(h.shape) != (k, k):
        raise ValueError(f"{path}: Hessian shape {tuple(h.shape)} != ({k}, {k}) of this layer's inputs")
    lt = None if h is None else damped_cholesky(h, damp).T  # ‖Lᵀ x‖ = ‖X x‖, damped as low_rank_fit damps
    size = (lambda x: float(jnp.linalg.norm(x))) if lt is None else (lambda x: float(jnp.linalg.norm(lt @ x)))
    norm = size(w2) or 1.0
    lr = jnp.zeros_like(w2)
    q = quantize_leaf(path, w, rule, axes=axes)
    res = [size(w2 - dense_base(q, jnp.float32).reshape(k, n)) / norm]
    factor_shapes(path, q, cfg)  # rank check, naming the leaf
    best = None
    for t in range(steps):
        if t:
            q = quantize_leaf(path, (w2 - lr).reshape(w.shape), rule, axes=axes)
        a, b = low_rank_fit(w2 - dense_base(q, jnp.float32).reshape(k, n), cfg.rank, h, damp)
        lr = a @ b
        res.append(size(w2 - dense_base(q, jnp.float32).reshape(k, n) - lr) / norm)
        if best is None or res[-1] < best[0]:
            best = (res[-1], q, a, b)
    _, q, a, b = best
    root = math.sqrt(cfg.scale)  # the forward multiplies a b by α/r
    return q, (a / root).reshape(kdims + (cfg.rank,)), (b / root).reshape((cfg.rank,) + ndims), res

