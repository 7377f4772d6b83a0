"""Per-expert calibration statistics of mixture-of-experts layers, from the tokens actually routed to each expert.

The protocol a model follows (`jq.models.moe` does): the experts of one MoE layer live in one linen scope that
  - holds them as bias-free `nn.Einsum` layers whose kernels are stacked [E, K, N] — the kernel's subscripts are
    "expert, contracted, output" (e.g. `"btd,edf->btef"`: the input [B, T, D] shared by all experts, or
    `"btef,efd->bted"`: one input per expert [B, T, E, F]) — and
  - sows its routing mask as `self.sow("intermediates", "expert_mask", mask)`, mask [tokens..., E] (1 where the
    token is routed to the expert, 0 elsewhere; the token axes are the input's non-expert, non-contracted axes,
    in order).

Each expert e then gets `StatSums` over its routed tokens only: hessian_e = Σ_t m_te x_te x_teᵀ, abs / square sums,
max |x| over routed tokens and count_e = Σ_t m_te, stacked on a leading expert axis ([E, K, K], [E, K], [E]);
`finalize` turns them into stacked `LayerStats` (means per expert; an expert no token reached keeps count 0, and
`jq.algorithms.experts.quantize_stacked` quantizes it with RTN and a warning). `quantize_params(params, cfg,
calib=capture_experts(...))` then runs any method (GPTQ, …) per expert by `vmap` over the expert axis.

Streaming as in `jq.calibration.capture`: one jitted step per batch adds to the running sums. Expert parallel:
with params sharded over a mesh axis on the experts' leading axis, XLA keeps the per-expert sums sharded the
same way (each device sums its experts' routed tokens).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from jq.algorithms.stats import Stats, StatSums
from jq.interop.layers import LayerCall, layer_interceptor
from jq.interop.linen import apply
from jq.numbers.qtensor import is_qtensor

__all__ = ["MASK", "expert_sums", "finalize", "einsum_axes", "capture_experts", "capture_expert_fn", "routed_counts"]

MASK = "expert_mask"  # the name MoE layers sow their routing mask under
_HI = jax.lax.Precision.HIGHEST


def expert_sums(x: jax.Array, mask: jax.Array, expert_axis: int | None = None) -> StatSums:
    """Per-expert running sums of a stacked expert layer's input over the routed tokens.

    x: [tokens..., K] (one input shared by all experts) or, with `expert_axis`, [..., E, ..., K] (one input per
    expert; the contracted features last). mask: [tokens..., E], 1 for a routed (token, expert), 0 otherwise
    (other non-negative values weight the tokens; count is then their sum). Returns `StatSums` with hessian
    [E, K, K], abs_sum / sq_sum / act_absmax [E, K], count [E]."""
    k, n = x.shape[-1], mask.shape[-1]
    m = jnp.asarray(mask, jnp.float32).reshape(-1, n)                                        # [T, E]
    if expert_axis is None:
        xe = jnp.asarray(x, jnp.float32).reshape(-1, 1, k)                                   # [T, 1, K]
    else:
        xe = jnp.moveaxis(jnp.asarray(x, jnp.float32), expert_axis, -2).reshape(-1, n, k)    # [T, E, K]
    xe = jnp.broadcast_to(xe, (m.shape[0], n, k))
    xm = xe * m[:, :, None]
    ax = jnp.abs(xe)
    return StatSums(
        hessian=jnp.einsum("tek,tel->ekl", xm, xe, precision=_HI),
        abs_sum=jnp.einsum("te,tek->ek", m, ax, precision=_HI),
        sq_sum=jnp.einsum("te,tek->ek", m, xe * xe, precision=_HI),
        act_absmax=jnp.max(jnp.where(m[:, :, None] > 0, ax, 0.0), axis=0),
        count=jnp.sum(m, axis=0),
    )


def finalize(sums: dict[str, StatSums]) -> Stats:
    """Stacked running sums → stacked per-expert `LayerStats` (means over each expert's routed tokens), by path."""
    return {p: jax.vmap(StatSums.finalize)(s) for p, s in sums.items()}


def einsum_axes(eq: str, path: str = "<einsum>") -> tuple[int | None, int]:
    """(expert axis or None, contracted axis) of the *input* of an expert `nn.Einsum` with equation `eq` whose
    kernel is stacked [E, K, N] ("btd,edf->btef" → (None, 2); "btef,efd->bted" → (2, 3)). Raises ValueError
    naming `path` for an equation of another form."""
    lhs, _, _ = eq.replace(" ", "").partition("->")
    x, _, w = lhs.partition(",")
    if "." in eq or len(w) != 3 or w[1] not in x or w[2] in x or x.count(w[1]) != 1:
        raise ValueError(f"{path}: einsum {eq!r} is not an expert layer of the form 'x...,ekn->...' (a stacked "
                         "kernel [E, K, N] contracted over K with the input's last axis); per-expert statistics "
                         "need that form")
    if x.index(w[1]) != len(x) - 1:
        raise ValueError(f"{path}: einsum {eq!r} contracts input axis {x.index(w[1])}; per-expert statistics need "
                         "the contracted features last")
    return (x.index(w[0]) if w[0] in x else None), len(x) - 1


def _scope_of(path: str) -> str:
    """The scope holding an expert einsum: 'layers_0/moe/experts' for 'layers_0/moe/experts/gate/kernel'."""
    return path.rsplit("/", 2)[0]


def _find_masks(tree: Any, prefix: str = "") -> dict[str, jax.Array]:
    """Sown routing masks by the scope that sowed them."""
    out = {}
    if isinstance(tree, dict):
        for k, v in tree.items():
            here = f"{prefix}/{k}" if prefix else str(k)
            if k == MASK:
                out[prefix] = v[-1] if isinstance(v, tuple) else v
            else:
                out.update(_find_masks(v, here))
    return out


def capture_expert_fn(module: nn.Module, paths: Iterable[str] | None = None,
                      method: Any = None) -> Callable[[dict, tuple], dict[str, StatSums]]:
    """A function `run(variables, args) -> {kernel path: stacked StatSums}` of one batch (not jitted): runs
    `module` and sums the input of every expert einsum (kernel path in `paths`, or all) over the tokens its
    scope's sown `expert_mask` routes to each expert. Layers whose kernel is a QTensor are not recorded."""
    wanted = None if paths is None else set(paths)

    def run(variables: dict, args: tuple) -> dict[str, StatSums]:
        seen: dict[str, tuple[jax.Array, str]] = {}

        def record(c: LayerCall):
            if c.is_einsum and (wanted is None or c.path in wanted) and not is_qtensor(c.kernel) \
                    and jnp.ndim(c.kernel) == 3:
                eq = (c.args[1] if len(c.args) > 1 else c.kwargs.get("einsum_str")) or c.module.einsum_str
                seen[c.path] = (c.x, eq)
            return c.proceed()

        _, state = apply(module, variables, *args, method=method, mutable=["intermediates"],
                         interceptor=layer_interceptor(record))
        masks = _find_masks(state.get("intermediates", {}))
        out = {}
        for path, (x, eq) in seen.items():
            mask = masks.get(_scope_of(path))
            if mask is None:
                if wanted is not None:
                    raise ValueError(f"{path}: no routing mask was sown in {_scope_of(path)!r}; an MoE layer must "
                                     f"call self.sow('intermediates', {MASK!r}, mask) in the scope of its experts")
                continue
            e_axis, _ = einsum_axes(eq, path)
            out[path] = expert_sums(x, mask, e_axis)
        return out

    return run


def capture_experts(module: nn.Module, variables: dict, batches: Iterable[Any], *,
                    paths: Iterable[str] | None = None, method: Any = None,
                    progress: Callable[[int], None] | None = None) -> Stats:
    """Run `module` over `batches` (tuples of positional arguments, or single arrays such as tokens [B, T]) and
    return per-expert statistics of its expert layers, keyed by kernel path: `LayerStats` with hessian [E, K, K],
    act_absmean / act_sq / act_absmax [E, K], count [E] (routed tokens per expert).

    `variables["params"]` may hold QTensors (quantized layers run through jq.ops and are not recorded) and may be
    sharded (expert parallel: the sums follow the experts' sharding). Every path in `paths` must be recorded."""
    run = capture_expert_fn(module, paths, method)
    first = jax.jit(run)
    step = jax.jit(lambda acc, v, a: {p: acc[p].merge(s) for p, s in run(v, a).items()}, donate_argnums=(0,))
    acc = None
    for i, batch in enumerate(batches):
        args = batch if isinstance(batch, tuple) else (batch,)
        acc = first(variables, args) if acc is None else step(acc, variables, args)
        if progress is not None:
            progress(i + 1)
    if acc is None:
        raise ValueError("capture_experts: no calibration batches were given; pass at least one batch")
    missing = sorted(set(paths or ()) - set(acc))
    if missing:
        raise ValueError(f"capture_experts: expert layer(s) {missing} were never called by the model; check the "
                         "paths (jq inspect lists them)")
    if not acc:
        raise ValueError("capture_experts: the model has no expert layers (stacked nn.Einsum kernels under a scope "
                         f"that sows {MASK!r}); use jq.calibration.capture.capture for dense layers")
    return finalize(acc)


def routed_counts(stats: Stats) -> dict[str, np.ndarray]:
    """Routed tokens per expert [E] of each recorded layer (a quick look at the router's balance)."""
    return {p: np.asarray(s.count) for p, s in stats.items()}
