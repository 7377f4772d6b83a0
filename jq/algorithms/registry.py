"""The method registry: the names recipes give (`method: gptq`) and the functions they stand for."""

from __future__ import annotations

from typing import Callable, Protocol

from jq.numbers.qtensor import Layout, QTensor
from jq.numbers.scheme import Scheme

__all__ = ["Method", "METHODS", "register", "get_method"]


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
