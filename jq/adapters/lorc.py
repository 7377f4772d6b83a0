"""LoRC / HQQ+-style low-rank compensation after post-training quantization (no training loop): each quantized
weight gets a rank-r term fitted to its quantization error E = W − deq(Q) in the metric of its inputs,

    min ‖X (E − a b)‖_F  →  a b = the activation-weighted truncated SVD of E (`jq.algorithms.lowrank.low_rank_fit`)

(Yao et al. 2023, "ZeroQuant-V2 … Low Rank Compensation"; HQQ+ trains the same term). The result is a
`LowRank(Q, a, b)` leaf that every forward applies and whose factors are stored (float16 by default): its
`bits_per_weight` counts them, r·(K + N)·16 / (K·N) bits on top of the base.
"""

from __future__ import annotations

import math
import re
import time
from typing import Any

import jax
import jax.numpy as jnp

from jq.adapters.lora import in_ndim
from jq.algorithms.lowrank import low_rank_fit
from jq.algorithms.stats import LayerStats
from jq.numbers.lowrank import LowRank, is_weight_leaf
from jq.numbers.qtensor import QTensor
from jq.tree.paths import leaf_paths, path_str

__all__ = ["compensate", "compensate_model"]

_fit = jax.jit(low_rank_fit, static_argnums=(1,))  # one compiled fit per weight shape, shared by every call


def compensate(params: Any, qparams: Any, rank: int, stats: Any = None, *, pattern: str = r".*kernel",
               exclude: str = r".*(embed|lm_head).*", damp: float = 0.01, dtype: Any = jnp.float16) -> Any:
    """`qparams` with every QTensor whose path fully matches `pattern` (not `exclude`) replaced by
    LowRank(Q, a, b): the rank-`rank` fit of W − deq(Q), weighted by the input Hessian `stats[path].hessian` [K, K]
    when `stats` (flat {path: LayerStats}, e.g. `jq.calibration.capture`'s) has one, plain SVD otherwise.

    params: the float weights `qparams` was quantized from (same paths). Raises ValueError naming the leaf for a
    rank above min(K, N), a missing float weight, or a Hessian of the wrong size."""
    inc, exc = re.compile(pattern), re.compile(exclude)
    floats = dict(leaf_paths(params))
    stats = stats or {}

    def fit(kp, q):
        path = path_str(kp)
        if not isinstance(q, QTensor) or not inc.fullmatch(path) or exc.fullmatch(path):
            return q
        if path not in floats:
            raise ValueError(f"{path}: no float weight at this path in params; LoRC fits W − deq(Q) and needs both")
        n_in = in_ndim(path, q)
        kdims, ndims = q.shape[:n_in], q.shape[n_in:]
        k, n = math.prod(kdims), math.prod(ndims)
        if rank > min(k, n):
            raise ValueError(f"{path}: rank {rank} exceeds min(in, out) = min({k}, {n}); use a lower rank")
        e = (jnp.asarray(floats[path], jnp.float32) - q.dequantize(jnp.float32)).reshape(k, n)
        s = LayerStats.coerce(stats.get(path))
        h = None if s is None else s.hessian
        if h is not None and tuple(h.shape) != (k, k):
            raise ValueError(f"{path}: Hessian shape {tuple(h.shape)} != ({k}, {k}) of this layer's inputs")
        a, b = _fit(e, rank, h, damp)
        return LowRank(q, a.reshape(kdims + (rank,)).astype(dtype), b.reshape((rank,) + ndims).astype(dtype),
                       in_ndim=n_in)

    return jax.tree_util.tree_map_with_path(fit, qparams, is_leaf=is_weight_leaf)


def compensate_model(module: Any, params: Any, qparams: Any, cfg: Any, tokens: Any = None,
                     batch_size: int = 8) -> tuple[Any, dict[str, Any]]:
    """A recipe's `lowrank` section (`jq.tree.recipe.LowRankConfig`) applied to `qparams` of the linen `module`:
    with `cfg.weighted`, input Hessians captured on the float `params` over `tokens` [S, T] (`batch_size` windows a
    batch), then `compensate`. Returns (qparams with LowRank leaves, {"rank", "weighted", "leaves", "seconds"})."""
    from jq.calibration.capture import batched, capture
    from jq.numbers.lowrank import is_lowrank

    t0 = time.perf_counter()
    stats = None
    if cfg.weighted:
        if tokens is None:
            raise ValueError(f"lowrank: rank {cfg.rank} weighted by the layer inputs needs calibration tokens; pass "
                             "them, or set weighted: false for a plain SVD")
        paths = [p for p, x in leaf_paths(qparams) if isinstance(x, QTensor)]
        stats = capture(module, {"params": params}, batched(tokens, batch_size), paths=paths)
    out = compensate(params, qparams, cfg.rank, stats, pattern=cfg.pattern, exclude=cfg.exclude, damp=cfg.damp)
    n = sum(1 for _, x in leaf_paths(out) if is_lowrank(x))
    return out, {"rank": cfg.rank, "weighted": cfg.weighted, "leaves": n, "seconds": time.perf_counter() - t0}
