"""The registries of what recipes name: methods (`method: gptq`) and transforms (`transforms: [awq]`).

A method is a frozen record with `quantize(w, scheme, layout, stats=None) -> QTensor` (and, for methods that report
how it went, `quantize_with_info -> (QTensor, info)`); a recipe's `options` build it. `register` turns a plain
function `fn(w, scheme, layout, stats=None, **options) -> QTensor` into such a method, so a new method is one file:

    @register("my_round")
    def my_round(w, scheme, layout, stats=None, *, bias=0.0): ...

A transform is a frozen record with `scales(weights, stats, scheme) -> s [K]`, folded into the producer of the
input the weights share (`jq.calibration.sequential`).
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from typing import Any, Protocol

from jq.numbers.qtensor import Layout, QTensor
from jq.numbers.scheme import Scheme

__all__ = ["Method", "MethodSpec", "METHODS", "register", "register_method", "get_method", "FunctionMethod",
           "Transform", "TRANSFORMS", "register_transform", "get_transform"]


class Method(Protocol):
    """A quantization method record: frozen and hashable (it is a static argument of jit)."""

    def quantize(self, w: Any, scheme: Scheme, layout: Layout, stats: Any = None) -> QTensor:
        """Quantize `w` (logical shape `layout.shape`, e.g. a Dense kernel [K, N]) with optional calibration `stats`
        (`LayerStats`, e.g. `hessian` [K, K])."""


@dataclasses.dataclass(frozen=True)
class MethodSpec:
    """What a recipe's `method:` name stands for: `build(**options)` gives the method record. Calling the spec
    quantizes directly: `spec(w, scheme, layout, stats=None, **options)`."""

    name: str
    build: Callable[..., Method]
    needs_calibration: bool = False
    reports_info: bool = False  # its records have quantize_with_info (damping, fallbacks, dead inputs)

    def __call__(self, w: Any, scheme: Scheme, layout: Layout, stats: Any = None, **options: Any) -> QTensor:
        """`build(**options).quantize(w, scheme, layout, stats)`: w in its logical shape `layout.shape`."""
        return self.build(**options).quantize(w, scheme, layout, stats)


@dataclasses.dataclass(frozen=True)
class FunctionMethod:
    """A method given as a plain function and its options (the records `register` builds)."""

    fn: Callable[..., QTensor]
    options: tuple[tuple[str, Any], ...] = ()

    def quantize(self, w: Any, scheme: Scheme, layout: Layout, stats: Any = None) -> QTensor:
        """`fn(w, scheme, layout, stats, **options)`: w in its logical shape `layout.shape`."""
        return self.fn(w, scheme, layout, stats, **dict(self.options))


METHODS: dict[str, MethodSpec] = {}


def register_method(name: str, build: Callable[..., Method], *, needs_calibration: bool = False,
                    reports_info: bool = False) -> MethodSpec:
    """Make recipes' `method: name` build its record with `build(**options)`; returns the spec."""
    spec = MethodSpec(name, build, needs_calibration, reports_info)
    METHODS[name] = spec
    return spec


def register(name: str, *, needs_calibration: bool = False) -> Callable[[Callable[..., QTensor]], Callable[..., QTensor]]:
    """Decorator: make the function `fn(w, scheme, layout, stats=None, **options) -> QTensor` available to recipes as
    `method: name` (its keyword-only parameters are the options a rule may give)."""

    def deco(fn: Callable[..., QTensor]) -> Callable[..., QTensor]:
        allowed = {p.name for p in inspect.signature(fn).parameters.values() if p.kind is p.KEYWORD_ONLY}

        def build(**options: Any) -> FunctionMethod:
            unknown = sorted(set(options) - allowed)
            if unknown:
                raise ValueError(f"method {name!r}: unknown option(s) {unknown}; allowed: {sorted(allowed)}")
            return FunctionMethod(fn, tuple(sorted(options.items())))

        register_method(name, build, needs_calibration=needs_calibration)
        return fn

    return deco


def get_method(name: str) -> MethodSpec:
    """The registered spec of `method: name`; ValueError naming the known methods otherwise."""
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; choose one of {sorted(METHODS)}") from None


class Transform(Protocol):
    """A model-level transform record: per-input-channel scales for kernels that share one input."""

    name: str

    def scales(self, weights: list, stats: Any, scheme: Scheme) -> Any:
        """Per-input-channel scales s [K] for `weights`, kernels [K, N_i] (input axis first) sharing one input."""


TRANSFORMS: dict[str, Callable[..., Transform]] = {}


def register_transform(name: str, build: Callable[..., Transform]) -> None:
    """Make recipes' `transforms: [name]` (or `[{name: {options}}]`) build `build(**options)`."""
    TRANSFORMS[name] = build


def get_transform(name: str, **options: Any) -> Transform:
    """The transform record `name` with `options`; errors name the transform and what is allowed."""
    if name not in TRANSFORMS:
        raise ValueError(f"unknown transform {name!r}; choose from {sorted(TRANSFORMS)}")
    try:
        return TRANSFORMS[name](**options)
    except TypeError as e:
        raise ValueError(f"transform {name!r}: {e}") from None
