"""Running a model with fake-quantized activations during QAT, linen or NNX: the inputs of the layers whose rule sets
`act` ("int8", "int4", "fp8_e4m3") are quantized per token over their contracted axes — the numbers `jq.ops` uses
when the converted model runs — through the same layer interceptor (`jq.interop.layers`) every other hook uses.

A `rotate: hadamard` rule quantizes the rotated input, as `jq.ops` does with the converted QTensor (which multiplies
x Q by the stored Qᵀ W): the layer sees fq(x Q) Qᵀ, so fq(x Q) Qᵀ · Q fq(Qᵀ W) = fq(x Q) · fq(Qᵀ W). A rule with
`ste: trust` (QuEST) masks the activations' gradient with the trust estimator as well (`act_ste` sets the
activations' estimator apart from the weights')."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
from flax import linen as nn
from flax import nnx

from jq.interop.layers import LayerCall, layer_interceptor
from jq.interop.linen import apply as interop_apply
from jq.interop.nnx import nnx_merge as interop_nnx_merge
from jq.numbers.scheme import Scheme
from jq.qat import ste as S
from jq.qat.tree import qat_options
from jq.tree.recipe import QuantConfig

__all__ = ["act_interceptor", "apply", "nnx_merge"]


def _act_scheme(cfg: QuantConfig, path: str, ndim: int) -> tuple[Scheme, float | None] | None:
    """(scheme, trust factor or None) of the kernel at `path` when it quantizes its layer's input activations, else
    None; the trust factor is set when the rule's activations train with the trust estimator (`ste: trust`, unless
    `act_ste: identity` keeps it to the weights; or `act_ste: trust` alone)."""
    rule = cfg.rule_for(path, ndim)
    if rule is None or rule.scheme is None or not rule.scheme.act:
        return None
    o = qat_options(rule)
    return rule.scheme, (o["trust"] if o["act_ste"] == "trust" else None)


def _fq_act(x: jax.Array, act: tuple[Scheme, float | None], axes: tuple[int, ...]) -> jax.Array:
    """x [..., K...] fake-quantized per token over `axes` as the scheme's `act` (and `act_clip`) asks, in the basis
    of its online rotation (one contraction axis) when it has one."""
    sch, trust = act
    rot = sch.policy.rotation
    if rot is None:
        return S.fake_quant_act(x, sch.act, axes, getattr(sch, "act_clip", 1.0), trust)
    if len(axes) != 1:
        raise ValueError(f"rotate: hadamard needs one contraction axis; this layer contracts {tuple(axes)}")
    xr = rot.apply(x, axis=axes[0])
    return rot.inverse(S.fake_quant_act(xr, sch.act, axes, getattr(sch, "act_clip", 1.0), trust), axis=axes[0])


def act_interceptor(cfg: QuantConfig) -> Callable[..., Any]:
    """A linen interceptor fake-quantizing the inputs of every `nn.Dense` / `nn.DenseGeneral` whose kernel's rule
    sets `act`, per token over the contracted axes."""

    def fake_quantize_input(c: LayerCall) -> Any:
        sch = None if c.is_einsum else _act_scheme(cfg, c.path, c.kernel.ndim)  # (scheme, trust) or None
        return c.proceed() if sch is None else c.proceed(_fq_act(c.x, sch, c.axes))

    return layer_interceptor(fake_quantize_input)


def _has_act(cfg: QuantConfig | None) -> bool:
    return cfg is not None and any(r.scheme is not None and r.scheme.act for r in cfg.rules)


def apply(module: nn.Module, variables: dict, *args, cfg: QuantConfig | None = None, **kwargs) -> Any:
    """`jq.interop.apply(module, variables, *args, **kwargs)` with activations fake-quantized where `cfg`'s rules set
    `act`. Pass `{"params": jq.qat.fake_quantize(qat_params, cfg)}` as variables."""
    return interop_apply(module, variables, *args, interceptor=act_interceptor(cfg) if _has_act(cfg) else None,
                         **kwargs)


def nnx_merge(graphdef: Any, state: Any, *states: Any, cfg: QuantConfig | None = None) -> nnx.Module:
    """`jq.interop.nnx_merge(graphdef, state, *states)`, and every `nnx.Linear` whose kernel's rule sets `act`
    fake-quantizes its inputs per token. `state` is the fake-quantized State (`fake_quantize({"params": state,
    ...}, cfg)`)."""
    if not _has_act(cfg):
        return interop_nnx_merge(graphdef, state, *states)

    def hook(path: str, x: jax.Array, axes: tuple[int, ...]) -> jax.Array:
        sch = _act_scheme(cfg, path, 2)
        return x if sch is None else _fq_act(x, sch, axes)

    return interop_nnx_merge(graphdef, state, *states, input_hook=hook)
