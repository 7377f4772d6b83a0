"""Comparing checkpointed trees bit for bit, and listing what a write left beside its output."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax.numpy as jnp
import numpy as np

import jq

__all__ = ["_same", "_leftovers"]


def _same(x, y) -> None:
    """Bit-for-bit equality of two trees of arrays / QTensors: values, dtypes and static fields."""
    lx, ly = jq.leaf_paths(x), jq.leaf_paths(y)
    assert [p for p, _ in lx] == [p for p, _ in ly]
    for (p, a), (_, b) in zip(lx, ly):
        if isinstance(a, jq.QTensor):
            assert isinstance(b, jq.QTensor), p
            static = [f.name for f in dataclasses.fields(jq.QTensor) if f.metadata.get("static")]
            assert [getattr(a, f) for f in static] == [getattr(b, f) for f in static], p
            for f in ("codes", "scale", "zero", "perm"):
                u, v = getattr(a, f), getattr(b, f)
                assert (u is None) == (v is None), (p, f)
                if u is not None:
                    assert u.dtype == v.dtype, (p, f)
                    np.testing.assert_array_equal(np.asarray(u), np.asarray(v), err_msg=f"{p} {f}")
        else:
            assert jnp.dtype(a.dtype) == jnp.dtype(b.dtype), p
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=p)


def _leftovers(parent: Path, name: str) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if name in p.name)
