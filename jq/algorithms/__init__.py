"""Quantization algorithms: one file per method, each a pure function of arrays (and statistics) → QTensor.

A method has the signature `method(w, scheme, layout, stats=None, **options) -> QTensor`, where `w` is the float
weight in its logical shape, `layout` the validated `Layout` (contraction axes, groups), and `stats` the
calibration statistics for this weight (None for data-free methods). `register` puts it in `METHODS`, which is
what recipes name. Methods never import Flax, Optax, Orbax or models.
"""

from __future__ import annotations

from typing import Callable, Protocol

from jq.numbers.qtensor import Layout, QTensor
from jq.numbers.scheme import Scheme


class Method(Protocol):
    def __call__(self, w, scheme: Scheme, layout: Layout, stats=None, **options) -> QTensor: ...


METHODS: dict[str, Method] = {}


def register(name: str, *, needs_calibration: bool = False) -> Callable[[Method], Method]:
    """Decorator: make `fn` available to recipes as `method: name`."""

    def deco(fn: Method) -> Method:
        fn.needs_calibration = needs_calibration
        METHODS[name] = fn
        return fn

    return deco


def get_method(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; choose one of {sorted(METHODS)}") from None


from jq.algorithms import awq, gptq, hqq, rtn, smoothquant  # noqa: E402,F401  (registers)
