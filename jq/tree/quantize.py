"""The tree-level API: `quantize_params`, `dequantize_params`, and a per-leaf report.

`quantize_params(params, cfg, calib=None)` is a pure function: the same pytree comes back with QTensors at the
leaves the recipe quantizes. It works on linen `variables["params"]` dicts and on NNX `State`s alike, and it is
jit-able (the config is static; bad-input checks that need concrete values run only outside a trace).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import warnings
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import DTypeLike

from jq.algorithms import Method, get_method
from jq.algorithms import experts
from jq.algorithms.rtn import RTN
from jq.algorithms.stats import LayerStats, Stats
from jq.numbers.hadamard import Rotation
from jq.numbers.lowrank import is_weight_leaf
from jq.numbers.qtensor import QTensor, is_qtensor
from jq.tree.axes import LeafUsage, axes_from_use, unmatched_matmuls, warn_if_larger
from jq.tree.paths import leaf_paths, path_str
from jq.numbers.scheme import Scheme
from jq.tree.recipe import QuantConfig, Rule
from jq.types import Params

__all__ = ["quantize_params", "dequantize_params", "quantize_leaf", "check_scales", "check_rotatable",
           "warn_unmatched_rules"]


def _default_axes(path: str, ndim: int) -> tuple[int, ...]:
    """Contraction axes when the scheme names none: embeddings contract their last axis (as in `attend`);
    stacked expert weights [E, K, N] (3-D leaves under an `experts` scope, as `jq.models.moe` stores them) their
    middle one, so groups run per expert; Flax kernels (`Dense` (in, out), `DenseGeneral` (in, ..., out)) their
    first."""
    if "embed" in path.rsplit("/", 1)[-1] or path.endswith("embedding"):
        return (ndim - 1,)
    if ndim == 3 and "experts" in path.split("/")[:-1]:
        return (1,)
    return (0,)


@functools.lru_cache(maxsize=None)
def _jitted(record: Method, info: bool = False) -> Callable[..., Any]:
    """One compiled function per method record (and per its `quantize_with_info`); scheme and layout are static, so
    each distinct weight shape / scheme compiles once and is reused across layers."""
    return jax.jit(record.quantize_with_info if info else record.quantize, static_argnums=(1, 2))


def _check_finite(path: str, w: Any) -> None:
    if isinstance(w, jax.core.Tracer):
        return
    a = np.asarray(w)
    if not np.issubdtype(a.dtype, np.floating) and a.dtype.kind != "V":
        a = a.astype(np.float32)
    bad = ~np.isfinite(a.astype(np.float32))
    if bad.any():
        idx = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ValueError(
            f"{path}: {int(bad.sum())} non-finite value(s) in a weight of shape {a.shape} "
            f"(first at index {idx}: {a[idx]!r}); repair the checkpoint, or keep this leaf float with "
            f"ignore: ['{path}']"
        )


def _stats_for(calib: Stats | dict | None, path: str) -> LayerStats | dict | None:
    if calib is None:
        return None
    if isinstance(calib, dict) and path in calib:
        return calib[path]
    node = calib
    for part in path.split("/"):
        if isinstance(node, dict) and part in node:
            node = node[part]
        else:
            return None
    return node


@contextlib.contextmanager
def _refusals_named(path: str) -> Iterator[None]:
    """Re-raise a ValueError that does not start with `path` as one that does (a method's own message). A context
    manager, not a wrapper function, so the warnings raised inside keep their stack levels."""
    try:
        yield
    except ValueError as e:
        if str(e).startswith(path):
            raise
        raise ValueError(f"{path}: {e}") from e


def quantize_leaf(path: str, w: jax.Array, rule: Rule, stats: LayerStats | dict | None = None, *,
                  axes: tuple[int, ...] | None = None) -> QTensor:
    """Quantize one weight by `rule` (its scheme, method and options). Checks the input; for calibrated methods,
    a layer whose statistics saw no token falls back to RTN with a warning, and (outside jit) a method's
    `with_info` variant reports damping increases, inputs that never fired and fallbacks, which are warned about
    naming the layer. Outside jit, scales that do not fit the scheme's `scale_dtype` are refused (`check_scales`).
    w: the float weight in its logical shape (a Dense kernel [K, N]); stats: its input's, e.g. `hessian` [K, K]
    (K = the contraction axes flattened in order); axes: the contraction axes (default: the scheme's, else guessed
    from the path by `_default_axes`; `quantize_params(..., usage=)` passes the traced ones). A method's refusal
    (ValueError) that does not name the leaf is prefixed by its path."""
    with _refusals_named(path):
        if not jnp.issubdtype(jnp.result_type(w), jnp.floating):
            raise ValueError(f"{path}: dtype {jnp.result_type(w)} is not floating point; only float weights quantize")
        _check_finite(path, w)
        ndim = w.ndim
        if axes is None:
            axes = rule.scheme.axes if rule.scheme.axes is not None else _default_axes(path, ndim)
        layout = rule.scheme.layout(tuple(w.shape), axes, path)
        if rule.scheme.grid.progressive:
            _check_progressive(path, rule)
        spec = get_method(rule.method)
        stats = LayerStats.coerce(stats)
        if experts.is_stacked(stats):  # per-expert statistics of a stacked expert weight [E, K, N]
            if rule.scheme.policy.rotation is not None:
                raise ValueError(f"{path}: rotate: hadamard is not supported on stacked expert weights; drop rotate "
                                 "for this leaf")
            dtype, (w, outer) = jnp.result_type(w), _prescale(rule.scheme, jnp.asarray(w), layout.axes)
            q = experts.quantize_stacked(path, w, rule.record, rule.scheme, layout, stats,
                                         method=rule.method, reports_info=spec.reports_info)
            check_scales(path, w, q, rule.scheme)
            return _with_outer(q, outer, dtype)
        if rule.scheme.policy.rotation is not None:
            w, stats = _rotate_input(path, jnp.asarray(w), axes, stats, rule.scheme.policy.rotation)
        dtype, (w, outer) = jnp.result_type(w), _prescale(rule.scheme, jnp.asarray(w), layout.axes)
        q = None
        if spec.needs_calibration:
            if stats is None:
                raise ValueError(
                    f"{path}: method {rule.method!r} needs calibration statistics but none were given for this leaf; "
                    "calibrate first (jq eval/quantize --calib, or jq.calibration.capture.capture) or choose method: "
                    "rtn"
                )
            count = stats.count
            if count is not None and not isinstance(count, jax.core.Tracer) and float(count) == 0:
                lut = rule.scheme.fmt.is_lookup  # codebooks: no RTN grid, fit unweighted
                warnings.warn(f"{path}: no calibration token reached this layer; quantized with "
                              f"{'unweighted ' + rule.method if lut else 'RTN'} instead of {rule.method!r}",
                              stacklevel=3)
                q = _jitted(rule.record if lut else RTN())(w, rule.scheme, layout, None)
            elif spec.reports_info and not isinstance(w, jax.core.Tracer):
                q, info = _jitted(rule.record, True)(w, rule.scheme, layout, stats)
                _warn_info(path, rule, info)
        if q is None:
            q = _jitted(rule.record)(w, rule.scheme, layout, stats)
        check_scales(path, w, q, rule.scheme)
        return _with_outer(q, outer, dtype)


def _check_progressive(path: str, rule: Rule) -> None:
    """Refuse fitters that choose float scales or zeros (HQQ, GPTQ's hqq / refit options, AWQ's search on the
    unscaled weight): a progressive grid's group scales and zeros are integers on a per-channel int8 grid."""
    opts = dict(rule.options)
    bad = ([rule.method] if rule.method not in ("rtn", "gptq") else []) + [
        k for k in ("hqq", "refit") if opts.get(k)] + [n for n, _ in rule.transforms if n == "awq"]
    if bad:
        raise ValueError(f"{path}: progressive: true keeps integer group scales and zeros, which {', '.join(bad)} "
                         "would replace by float fits; use method rtn or gptq without hqq / refit / awq")


def _prescale(scheme: Scheme, w: jax.Array, axes: tuple[int, ...]) -> tuple[jax.Array, jax.Array | None]:
    """(w / outer, outer) for a grid with a second-level scale (`Grid.outer_scale`: NVFP4's per tensor, a progressive
    grid's per output channel over `axes`), else (w, None): every method then quantizes the scaled weight on the
    grid's own block scales."""
    outer = scheme.grid.outer_scale(w, axes)
    return (w, None) if outer is None else (w.astype(jnp.float32) / outer, outer)


def _with_outer(q: QTensor, outer: jax.Array | None, dtype: DTypeLike) -> QTensor:
    """q with its second-level scale stored (`QTensor.outer_scale`) and the weight's own dtype, or q itself."""
    return q if outer is None else dataclasses.replace(q, outer_scale=outer, dtype=jnp.dtype(dtype).name)


def check_scales(path: str, w: jax.Array, q: QTensor, scheme: Scheme) -> None:
    """Refuse a QTensor whose scales or zero points overflowed the scheme's `scale_dtype` (they would dequantize to
    NaN), naming the leaf, the range that needs the larger scale and the fix; warn when non-zero groups' scales
    underflowed it (those groups dequantize to zero). No-op under a trace. w: the float weight q was made from
    (in the basis q stores: rotated for `rotate: hadamard`)."""
    if isinstance(q.scale, jax.core.Tracer):
        return
    scale = np.asarray(q.scale, np.float32)
    bad = ~np.isfinite(scale)
    if q.zero is not None:
        bad |= ~np.isfinite(np.asarray(q.zero, np.float32))
    flushed = scale == 1.0  # an all-zero group, or a scale rounded to zero (`Scheme.scale_zero` sets both to 1)
    if not bad.any() and (not flushed.any() or scheme.fmt.is_mx or scheme.grid.progressive):  # presets / integer
        return  # scales: the spec's scales (none to choose), or integers clipped to 1..255 (1 is a real scale)
    lay = q.layout
    xg = np.asarray(lay.to_grouped(jnp.asarray(w, jnp.float32)))
    lo, hi = xg.min(lay.reduce_axes, keepdims=True), xg.max(lay.reduce_axes, keepdims=True)
    if lay.granularity == "group":
        lo, hi = np.squeeze(lo, lay.inner_axis), np.squeeze(hi, lay.inner_axis)
    span = (np.maximum(np.abs(lo), np.abs(hi)) if scheme.symmetric else np.maximum(hi, 0) - np.minimum(lo, 0))
    span = span.reshape(scale.shape)
    unit = {"group": f"group of {lay.group_size}", "channel": "output channel", "tensor": "tensor"}[lay.granularity]
    article = "an" if unit[0] in "aeiou" else "a"
    sdt = jnp.finfo(jnp.dtype(scheme.scale_dtype))
    if bad.any():
        worst = float(span[bad].max())
        raise ValueError(
            f"{path}: {int(bad.sum())} of {scale.size} scales overflow scale_dtype {scheme.scale_dtype} (largest "
            f"finite value {float(sdt.max):.4g}): {article} {unit} spans {worst:.4g} ({'max |w|' if scheme.symmetric else 'max − min'}"
            f"), so its {scheme.format} scale would be about {worst / scheme.grid.code_span:.4g}. Set scale_dtype: float32 "
            f"(or bfloat16) in the rule for this leaf, or keep it float with ignore: ['{path}']")
    lost = flushed & (span > 0) & ((span / scheme.grid.code_span).astype(jnp.dtype(scheme.scale_dtype)) == 0)
    if lost.any():
        warnings.warn(
            f"{path}: {int(lost.sum())} of {scale.size} scales underflow scale_dtype {scheme.scale_dtype} (smallest "
            f"positive value {float(sdt.smallest_subnormal):.3g}): those {unit}s span at most {float(span[lost].max()):.3g}"
            f" and dequantize to zero. Set scale_dtype: float32 in the rule for this leaf if they matter",
            stacklevel=3)


def check_rotatable(path: str, shape: tuple[int, ...], axes: tuple[int, ...]) -> None:
    """Raise ValueError naming the leaf unless `rotate: hadamard` can apply: one contraction axis whose length has a
    Hadamard construction."""
    from jq.numbers.hadamard import supported

    if len(axes) != 1:
        raise ValueError(f"{path}: rotate: hadamard needs one contraction axis, the weight has axes {axes}; "
                         "drop rotate for this leaf")
    if not supported(shape[axes[0]]):
        raise ValueError(f"{path}: rotate: hadamard along axis {axes[0]} of length {shape[axes[0]]}, which has no "
                         "Hadamard construction (see jq.numbers.hadamard.decompose); drop rotate for this leaf")


def _rotate_input(path: str, w: jax.Array, axes: tuple[int, ...], stats: LayerStats | None,
                  rotation: Rotation) -> tuple[jax.Array, LayerStats | None]:
    """For a rotated scheme: the stored weight Qᵀ W and the statistics of the rotated input x Q."""
    check_rotatable(path, tuple(w.shape), axes)
    return rotation.apply(w, axis=axes[0]), None if stats is None else stats.rotated(rotation.apply)


def _warn_info(path: str, rule: Rule, info: dict) -> None:
    if bool(info.get("no_data", False)):
        warnings.warn(f"{path}: no calibration signal reached this layer (its inputs were zero on every calibration "
                      f"token), so {rule.method} had nothing to fit and it was quantized with RTN. Check that the "
                      "calibration data reaches it (a branch or expert that no token used)", stacklevel=4)
    elif "fallback" in info and bool(info["fallback"]):
        warnings.warn(f"{path}: {rule.method} failed even after raising the damping (Hessian not positive "
                      "definite); this layer fell back to RTN", stacklevel=4)
    elif "damp" in info and float(info["damp"]) > float(dict(rule.options).get("damp", 0.01)) * 1.0001:
        warnings.warn(f"{path}: {rule.method} raised the relative damping to {float(info['damp']):.3g} for a "
                      "stable Cholesky factorisation", stacklevel=4)
    dead = int(info.get("dead", 0))
    if dead and not bool(info.get("no_data", False)):
        warnings.warn(f"{path}: {dead} input channel(s) never fired on the calibration data (zero on every token); "
                      f"{rule.method} cannot tell how they matter and rounded their weights without error feedback. "
                      "Calibrate on more or other data (--calib FILES, --calib-samples) so that they fire, or quantize "
                      "this layer with method: rtn", stacklevel=4)


def quantize_params(params: Params, cfg: QuantConfig, calib: Stats | dict | None = None, *,
                    warn_unmatched: bool = True, usage: Mapping[str, LeafUsage] | None = None) -> Params:
    """Quantize a parameter pytree by the rules of `cfg`.

    Args:
      params: a pytree of float arrays (linen `variables["params"]`, an NNX `State`, or any nesting of dicts).
      cfg: a `QuantConfig` (see `jq.tree.recipe`, `jq.load_recipe`).
      calib: optional statistics mirroring the parameter paths (a nested dict, or a flat dict keyed by path),
        as produced by calibration; methods that need data raise if their leaf has none.
      warn_unmatched: warn about rules that match no leaf (usually a typo in the regex).
      usage: how the model uses each leaf, by path (`jq.interop.trace_usage(module, variables, *args)`). With it,
        a rule without `axes` quantizes each leaf along the axes its matmuls contract (not a guess from its name);
        a rule whose `axes` disagree with the use is refused; leaves whose rows are gathered (embeddings) and
        leaves no matmul reads stay float (warned, naming them) unless a rule with `force: true` (and, for the
        latter, `axes`) says otherwise. Without it, behaviour is as before: axes from the rule or `_default_axes`.

    Returns:
      The same tree structure with `QTensor`s at the quantized leaves; other leaves are returned unchanged.
    """
    kept: dict[str, list[str]] = {"embedding": [], "no matmul": []}

    def visit(keypath, w):
        path = path_str(keypath)
        rule = cfg.rule_for(path, getattr(w, "ndim", 0))
        if rule is None:
            return w
        if rule.scheme is None or is_qtensor(w):  # already quantized leaves pass through
            return w
        axes = None
        if usage is not None and path in usage:
            use = usage[path]
            if use.gathered and not rule.force:
                kept["embedding"].append(path)
                return w
            axes = axes_from_use(path, tuple(w.shape), rule.scheme.axes, use)
            if axes is None:
                kept["no matmul"].append(f"{path} ({use.describe()})")
                return w
        q = quantize_leaf(path, w, rule, _stats_for(calib, path), axes=axes)
        lay = q.layout
        warn_if_larger(path, q.size, 8 * jnp.dtype(w.dtype).itemsize, q.bits_per_weight, q.describe(),
                       lay.shape, lay.group_axis, lay.padded)
        return q

    out = jax.tree_util.tree_map_with_path(visit, params, is_leaf=is_qtensor)
    if kept["embedding"]:
        warnings.warn(f"recipe {cfg.name!r}: {len(kept['embedding'])} leaves the model gathers rows of (embeddings) "
                      f"stay float: {', '.join(kept['embedding'])}; a rule with force: true quantizes them",
                      stacklevel=2)
    if kept["no matmul"]:
        warnings.warn(f"recipe {cfg.name!r}: {len(kept['no matmul'])} matched leaves reach no matmul in the traced "
                      f"model and stay float: {', '.join(kept['no matmul'])}; give the rule axes to quantize them "
                      "anyway", stacklevel=2)
    if warn_unmatched:
        warn_unmatched_rules(params, cfg, usage, stacklevel=3)
    return out


def warn_unmatched_rules(params: Params, cfg: QuantConfig, usage: Mapping[str, LeafUsage] | None = None,
                         stacklevel: int = 2) -> list[str]:
    """Warn about each rule of `cfg` that matches no leaf of `params` (usually a regex written for another model's
    names), listing matrices it could have matched (with `usage`: the float matmul weights no rule decides).
    Returns the unmatched patterns."""
    used = [False] * len(cfg.rules)
    decided: set[str] = set()
    unruled: list[tuple[bool, str]] = []  # (ignored, matrix) no rule quantizes, named when a rule matches nothing
    for path, w in leaf_paths(params):
        ndim = getattr(w, "ndim", 0)
        rule = cfg.rule_for(path, ndim)
        if rule is None:
            if ndim >= 2 and not is_qtensor(w):
                unruled.append((cfg.ignored(path, ndim), f"{path} {tuple(w.shape)}"))
            continue
        used[cfg.rules.index(rule)] = True
        decided.add(path)
    hint = unmatched_matmuls(usage, decided) if usage is not None else (
        "; the matrices no rule quantizes include "  # ignored ones (embeddings) last
        + ", ".join(name for _, name in sorted(unruled, key=lambda u: u[0])[:5]) if unruled else "")
    missed = [r.pattern for r, u in zip(cfg.rules, used) if not u]
    for pattern in missed:
        warnings.warn(f"recipe {cfg.name!r}: rule pattern {pattern!r} matched no parameter; check the regex against "
                      f"the paths (jq inspect prints them){hint}", stacklevel=stacklevel)
    return missed


def dequantize_params(qparams: Params, dtype: DTypeLike | None = None) -> Params:
    """Replace every QTensor (and LowRank: base + low-rank term) by its dense dequantized array of its logical
    shape (in its recorded dtype, or `dtype`)."""
    return jax.tree_util.tree_map(lambda x: x.dequantize(dtype) if is_weight_leaf(x) else x, qparams,
                                  is_leaf=is_weight_leaf)
