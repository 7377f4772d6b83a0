"""Sequential calibrated quantization: block i is calibrated on the outputs of the already quantized blocks
before it, and inside a block stage by stage ("true sequential": q/k/v, then o, then gate/up, then down).

A model takes part by describing its blocks with a `BlockSpec` (see `jq.models.llama.blocks` for the Llama one):

    BlockSpec(module=Block(cfg),                 # one block: module.apply({"params": p}, h, *extra) -> h
              names=("layers_0", ...),           # the params keys of the blocks, in order
              embed=lambda params, tokens: h,    # the hidden states entering block 0
              extra=lambda tokens: (positions,), # extra per-batch arguments of a block (optional)
              stages=(("attn/q_proj/kernel", ...), ...),   # kernel paths in a block, in execution order
              folds=(Fold("input_norm/scale", ("attn/q_proj/kernel", ...)), ...))  # who produces each input

Per block: (1) if a rule asks for transforms (AWQ, SmoothQuant), statistics of the float block are captured and
per-input-channel scales s are folded into the producer (norm scale or linear kernel, divided by s) and the
consumers (kernel rows multiplied by s), so the float block computes the same function; (2) each stage's inputs
are captured with the earlier stages already quantized and its kernels quantized (GPTQ, AWQ clip, …);
(3) the quantized block maps the hidden states on to the next block. Leaves outside blocks are quantized by the
same rules without data.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import time
import warnings
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from jq.algorithms.stats import StatSums
from jq.algorithms.transforms import tie
from jq.calibration import capture as calibrate
from jq.interop.linen import apply
from jq.numbers.qtensor import is_qtensor
from jq.tree.recipe import QuantConfig
from jq.tree.paths import get_path, leaf_paths, set_path
from jq.tree.quantize import quantize_leaf, quantize_params

__all__ = ["Fold", "BlockSpec", "quantize_sequential", "quantize_block", "calibration_batches", "rest_rule",
           "apply_fold"]


@dataclasses.dataclass(frozen=True)
class Fold:
    """`prev` (a norm scale [K], or a linear kernel [..., P]) produces the input that the `consumers` (kernels
    [K, N]) read; paths are relative to the block."""

    prev: str
    consumers: tuple[str, ...]

    @staticmethod
    def channels(n_prev: int, n_in: int, head_dim: int | None = None) -> np.ndarray | None:
        """For each of the consumers' `n_in` input rows, the producer output channel it reads (int [n_in]); None
        when the shapes allow no fold. Equal counts: the same channels. Grouped-query attention's v -> o (o_proj's
        n_in = n_heads·head_dim inputs from v_proj's n_prev = n_kv·head_dim outputs, `head_dim` given): row
        h·head_dim + d of query head h reads channel (h // (n_in / n_prev))·head_dim + d of its kv head, so a scale
        folds through only when it is equal on the query heads that share a kv head
        (`jq.algorithms.transforms.tie`)."""
        if n_prev == n_in:
            return np.arange(n_in)
        if head_dim is None or n_prev % head_dim or n_in % n_prev:
            return None
        k = np.arange(n_in)
        return (k // head_dim) // (n_in // n_prev) * head_dim + k % head_dim


@dataclasses.dataclass(frozen=True, eq=False)
class BlockSpec:
    module: nn.Module
    names: tuple[str, ...]
    embed: Callable[[Any, jax.Array], jax.Array]
    extra: Callable[[jax.Array], tuple] = lambda tokens: ()
    stages: tuple[tuple[str, ...], ...] = ()
    folds: tuple[Fold, ...] = ()
    # Optional fast path: staged(block, hs, extras, quantize_stage) -> (block, outputs) runs the block's dataflow
    # once, calling quantize_stage(paths, inputs) -> block with the per-batch inputs shared by a stage's layers, or
    # quantize_stage(paths, (), stats=...) with statistics it computed itself (stacked per expert: MoE) (a tuple
    # gives one per block, for blocks that differ).
    staged: Callable | tuple[Callable, ...] | None = None
    # Optional: blocks that differ (Gemma's local / global attention) give one module per name; `module` is the
    # default for the names this tuple does not cover (None entries).
    modules: tuple[nn.Module | None, ...] = ()
    # Optional: the attention head size, so that AWQ / SmoothQuant scales fold from o_proj into v_proj under
    # grouped-query attention too (`Fold.channels`)
    head_dim: int | None = None

    def module_for(self, index: int) -> nn.Module:
        """The module of block `index`."""
        m = self.modules[index] if index < len(self.modules) else None
        return self.module if m is None else m


def apply_fold(block: dict, fold: Fold, s: jax.Array, head_dim: int | None = None) -> None:
    """In place: divide the producer's output channels by s and multiply the consumers' input rows by s, so the
    block's float function is unchanged. s: [K], the consumers' inputs (under grouped-query attention, `head_dim`
    given, equal on the rows that read one producer channel: `jq.algorithms.transforms.tie`)."""
    s = jnp.asarray(s, jnp.float32)
    prev = jnp.asarray(get_path(block, fold.prev), jnp.float32)
    idx = fold.channels(prev.shape[-1], s.shape[0], head_dim)
    if idx is None:
        raise ValueError(f"fold {fold.prev} -> {fold.consumers}: producer has {prev.shape[-1]} outputs, scales {s.shape}")
    s_prev = jnp.zeros(prev.shape[-1], jnp.float32).at[jnp.asarray(idx)].set(s)
    if not np.allclose(np.asarray(s_prev)[idx], np.asarray(s), rtol=1e-6):
        raise ValueError(f"fold {fold.prev} -> {fold.consumers}: the scales differ between inputs that read one "
                         "producer channel (query heads sharing a kv head); tie them (jq.algorithms.transforms.tie)")
    set_path(block, fold.prev, prev / s_prev)
    for c in fold.consumers:
        w = jnp.asarray(get_path(block, c), jnp.float32)
        set_path(block, c, w * s.reshape((-1,) + (1,) * (w.ndim - 1)))


_batch_sums = jax.jit(StatSums.of)


class _Compiled:
    """jitted capture / block functions, cached across blocks (the blocks share shapes and metadata)."""

    def __init__(self, spec: BlockSpec):
        self.spec = spec
        self._capture: dict = {}
        self.forward = jax.jit(lambda p, h, extra: apply(spec.module, {"params": p}, h, *extra))

    def capture(self, params: dict, inputs: Sequence[tuple], paths: Sequence[str]) -> dict:
        key = tuple(sorted(paths))
        if key not in self._capture:
            self._capture[key] = calibrate.capture_fns(self.spec.module, key)
        return calibrate.accumulate(self._capture[key], {"params": params}, inputs, paths=key)


def calibration_batches(spec: BlockSpec, tokens: np.ndarray, batch_size: int = 8,
                        mesh: jax.sharding.Mesh | None = None) -> tuple[list, list[tuple]]:
    """(token batches [B, L], their extra block arguments) of calibration `tokens` [S, L]."""
    tokens = np.asarray(tokens)
    if tokens.ndim != 2 or len(tokens) == 0:
        raise ValueError(f"calibration tokens must be [samples, length] with samples >= 1, got shape {tokens.shape}")
    batches = calibrate.batched(tokens, batch_size, mesh)
    return batches, [tuple(spec.extra(b)) for b in batches]


def rest_rule(cfg: QuantConfig, path: str, ndim: int):
    """The rule of a leaf outside the blocks (quantized without data); a calibrated one is refused."""
    r = cfg.rule_for(path, ndim)
    if r is not None and r.scheme is not None and r.needs_calibration:
        raise ValueError(f"{path}: calibrated method {r.method!r} is only supported inside blocks; use rtn for it")
    return r


def quantize_sequential(
    spec: BlockSpec,
    params: dict,
    cfg: QuantConfig,
    tokens: np.ndarray,
    *,
    batch_size: int = 8,
    true_sequential: bool = True,
    progress: bool = True,
    mesh: jax.sharding.Mesh | None = None,
) -> tuple[dict, dict]:
    """Quantize `params` block by block on calibration `tokens` [S, L].

    mesh: data parallel — each batch's rows are split over the mesh (`capture.shard_rows`; over every process of
    a multi-controller run, each passing the same `tokens`); statistics are all-reduced, then every process
    quantizes the same weights from the same statistics.
    Returns (qparams, log) where log has per-block seconds and the transforms applied.
    (`jq.apps.convert_sequential` runs the same blocks on weights streamed from a file.)
    """
    batches, extras = calibration_batches(spec, tokens, batch_size, mesh)
    compiled: dict[int, _Compiled] = {}
    embed = jax.jit(spec.embed)
    hs = [embed(params, b) for b in batches]
    out = copy.copy(params)
    log: dict[str, Any] = {"blocks": [], "transforms": []}
    bar = _progress(len(spec.names), progress)
    for i, name in enumerate(spec.names):
        t0 = time.perf_counter()
        block = jax.tree_util.tree_map(lambda x: x, copy.deepcopy(params[name]))
        out[name], hs = quantize_block(spec, i, block, cfg, hs, extras, compiled, log, true_sequential)
        secs = time.perf_counter() - t0
        log["blocks"].append({"block": name, "seconds": secs})
        bar(i + 1, name, secs)
    rest = {k: v for k, v in out.items() if k not in spec.names}
    for p, w in leaf_paths(rest):
        rest_rule(cfg, p, getattr(w, "ndim", 0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # block rules do not match outside blocks, by design
        rest_cfg = dataclasses.replace(cfg, rules=tuple(r for r in cfg.rules if not r.needs_calibration))
        out.update(quantize_params(rest, rest_cfg, warn_unmatched=False) if rest_cfg.rules else rest)
    return out, log


def quantize_block(spec: BlockSpec, i: int, block: dict, cfg: QuantConfig, hs: list, extras: list[tuple],
                   compiled: dict, log: dict, true_sequential: bool = True) -> tuple[dict, list]:
    """Calibrate and quantize block `i` (its float params `block`, changed in place) on the hidden states `hs`
    entering it (per batch [B, T, D]); returns (quantized block, hidden states leaving it). `compiled` caches
    jitted functions across calls; transforms applied are appended to log["transforms"]."""
    name = spec.names[i]
    module = spec.module_for(i)
    if id(module) not in compiled:
        compiled[id(module)] = _Compiled(dataclasses.replace(spec, module=module))
    comp = compiled[id(module)]
    rules = {p: cfg.rule_for(f"{name}/{p}", getattr(w, "ndim", 0)) for p, w in leaf_paths(block)}
    rules = {p: r for p, r in rules.items() if r is not None and r.scheme is not None}
    inputs = [(h, *e) for h, e in zip(hs, extras)]

    # (1) transforms on the float block
    fold_rules = [(f, rules.get(f.consumers[0])) for f in spec.folds]
    fold_rules = [(f, r) for f, r in fold_rules if r is not None and r.transforms]
    if fold_rules:
        stats = comp.capture(block, inputs, sorted({c for f, _ in fold_rules for c in f.consumers}))
        for fold, rule in fold_rules:
            others = {rules.get(c).transforms if rules.get(c) else () for c in fold.consumers}
            if len(others) != 1:
                raise ValueError(f"{name}: layers {fold.consumers} share an input but their rules ask for "
                                 f"different transforms {sorted(others)}; give them the same transforms")
            n_prev = jnp.asarray(get_path(block, fold.prev)).shape[-1]
            idx = fold.channels(n_prev, jnp.asarray(get_path(block, fold.consumers[0])).shape[0], spec.head_dim)
            if idx is None:
                continue  # shapes do not allow this fold (v -> o under grouped-query attention without head_dim)
            st = stats[fold.consumers[0]]
            for transform in rule.transform_records:
                weights = [jnp.asarray(get_path(block, c), jnp.float32) for c in fold.consumers]
                if len(idx) == n_prev:
                    s = transform.scales(weights, st, rule.scheme)
                else:  # grouped-query v -> o: scales equal on the query heads of a kv head; a transform that
                    # searches (AWQ) measures tied candidates, any other's result is tied after
                    tied = (tuple(int(c) for c in idx), n_prev)
                    takes = "tied" in inspect.signature(transform.scales).parameters
                    s = tie(transform.scales(weights, st, rule.scheme, **({"tied": tied} if takes else {})), *tied)
                apply_fold(block, fold, s, spec.head_dim)
                st = st.scaled(s)
                log["transforms"].append({"block": name, "transform": transform.name, "prev": fold.prev,
                                          "scale_min": float(jnp.min(s)), "scale_max": float(jnp.max(s))})

    # (2) stages, each calibrated with the earlier ones quantized; (3) on to the next block
    def quantize_stage(paths, stage_inputs, block, stats=None):
        todo = [p for p in paths if p in rules]
        if stats is None and any(rules[p].needs_calibration for p in todo):
            acc = None
            for x in stage_inputs:
                st = _batch_sums(x)
                acc = st if acc is None else acc.merge(st)
            stats = acc.finalize()
        for p in todo:
            set_path(block, p, quantize_leaf(f"{name}/{p}", jnp.asarray(get_path(block, p)), rules[p], stats))
        return block

    staged = spec.staged[i] if isinstance(spec.staged, tuple) else spec.staged
    if staged is not None and true_sequential:
        block, hs = staged(block, hs, extras,
                           lambda paths, xs, b=block, stats=None: quantize_stage(paths, xs, b, stats))
        leftover = [p for p in rules if not is_qtensor(get_path(block, p))]
        if leftover:
            raise ValueError(f"{name}: the staged BlockSpec left {leftover} unquantized; list them in its stages")
    else:
        stages = list(spec.stages) if (true_sequential and spec.stages) else [tuple(sorted(rules))]
        staged = {p for st_ in stages for p in st_}
        stages.append(tuple(sorted(p for p in rules if p not in staged)))  # anything the spec did not list
        for stage in stages:
            todo = [p for p in stage if p in rules]
            need = [p for p in todo if rules[p].needs_calibration]
            stats = comp.capture(block, inputs, need) if need else {}
            for p in todo:
                set_path(block, p, quantize_leaf(f"{name}/{p}", jnp.asarray(get_path(block, p)), rules[p], stats.get(p)))
        hs = [comp.forward(block, h, e) for h, e in zip(hs, extras)]
    return block, hs


def _progress(total: int, enabled: bool):
    if not enabled:
        return lambda *a: None
    from rich.console import Console

    console = Console(stderr=True)
    start = time.perf_counter()

    def show(done, name, secs):
        console.print(f"  calibrated {name} ({done}/{total}) in {secs:.1f} s; {time.perf_counter() - start:.0f} s total",
                      highlight=False)

    return show
