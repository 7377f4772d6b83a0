"""Parameters of a model file that are not read yet (`LazyParam`), built from a file's tensor table through a
family's name map, with the checks every reader shares: unknown, missing and misshaped tensors are named."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np

from jq.models.family import ModelFamily, TensorMap, check_shapes
from jq.tree.paths import set_path

__all__ = ["LazyParam", "StoredTensor", "lazy_params", "materialize"]


@dataclasses.dataclass(frozen=True)
class LazyParam:
    """One parameter of a model file, not yet read: `load()` reads and converts it (fp32, the family's layout).

    `shape` is the shape `load()` returns (kernels already transposed to (in, out)), known from the file header.
    Streaming conversion (`jq.apps.convert`) reads one at a time, so peak memory is one tensor, not the model.
    """

    path: str
    shape: tuple[int, ...]
    load: Callable[[], Any]
    dtype: str = "float32"


@dataclasses.dataclass(frozen=True)
class StoredTensor:
    """A tensor as a file lists it: name, shape in NumPy order (a linear weight is (out, in)), the file, a reader
    returning it as fp32 in that order, and optionally `native(map)`: the tensor as the QTensor it already is, in
    the parameter's layout (None when it has no exact jq layout: then `read` is used)."""

    name: str
    shape: tuple[int, ...]
    file: Path
    read: Callable[[], np.ndarray]
    native: Callable[[TensorMap], Any] | None = None


def _read_mapped(t: StoredTensor, m: TensorMap) -> Any:
    if t.native is not None and (q := t.native(m)) is not None:
        return q
    return m.apply(np.asarray(t.read(), np.float32))


def lazy_params(family: ModelFamily, cfg: Any, tensors: Iterable[StoredTensor],
                mapper: Callable[[str, Any], TensorMap | None], source: str | Path) -> list[LazyParam]:
    """One LazyParam per tensor the family's `mapper(name, cfg)` places (None: not a parameter, skipped); a tensor
    whose shape does not fit the family's config, two tensors for one parameter, or a parameter no tensor
    provides raise a ValueError naming the file, the tensor and the parameter."""
    want = family.expected_shapes(cfg)
    out: dict[str, LazyParam] = {}
    for t in tensors:
        m = mapper(t.name, cfg)
        if m is None:
            continue
        shape = tuple(t.shape[::-1]) if m.transpose else tuple(t.shape)
        if m.path in want and shape != tuple(want[m.path]):
            stored = tuple(want[m.path])[::-1] if m.transpose else tuple(want[m.path])
            raise ValueError(f"{t.file}: tensor {t.name!r} has shape {tuple(t.shape)}, expected {stored} for "
                             f"parameter {m.path} of this {family.name} config")
        if m.path in out:
            raise ValueError(f"{t.file}: tensor {t.name!r} provides parameter {m.path} a second time")
        out[m.path] = LazyParam(m.path, shape, lambda t=t, m=m: _read_mapped(t, m))
    check_shapes(family, cfg, {p.path: p.shape for p in out.values()}, source)
    return list(out.values())


def materialize(lazy: Iterable[LazyParam]) -> dict[str, Any]:
    """Read every parameter into a nested dict of fp32 arrays."""
    params: dict[str, Any] = {}
    for p in lazy:
        set_path(params, p.path, p.load())
    return params
