"""The two grid drivers: one tiled matmul skeleton per style, parameterised by a tile function and an epilogue.

A kernel (w4a16, w8a16, w8a8, fp8) is two pure functions of *values*:

- `tile(*k_step_values) -> (bm, bn)` partial product of one K step (dequantize the weight tile, dot);
- `epilogue(acc, *epilogue_values) -> (bm, bn)` what happens to the accumulator (scales of W8A8).

The driver cuts the operands into blocks and feeds them to these functions; the functions are identical in both
styles and in interpret mode, so what the CPU tests run is the body compiled on GPU/TPU. Operand kinds:

| kind   | array shape     | per K step the tile function sees                              |
|--------|-----------------|----------------------------------------------------------------|
| "lhs"  | (Mp, width·nk)  | (bm, width): the row block's columns of this step              |
| "rhs"  | (width·nk, Np)  | (width, bn): this step's rows of the column block               |
| "kcol" | (width·nk, Np)  | (width, bn) rows of per-K-step metadata (group scales / zeros)  |
|        | (1, Np), per_k=False | (1, bn), the same at every step (per-channel scales)       |
| "row"  | (Mp, 1)         | epilogue only: one value per output row (per-token scales)      |
| "col"  | (1, Np)         | epilogue only: one value per output column (per-channel scales) |

GPU style: grid (Mp/bm, Np/bn); blocks span all of K and the kernel walks K with `lax.fori_loop` and `pl.ds`
slices. TPU style: grid (Mp/bm, Np/bn, nk), "kcol" arrays reshaped to (nk, width, Np) with the first dim
squeezed, and a VMEM accumulator.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from jax import lax
from jax.typing import DTypeLike
from jax.experimental import pallas as pl

from jq.pallas_kernels.common import Fit, Mode, compiler_params

__all__ = ["Operand", "tiled_matmul"]

_SQUEEZED = getattr(pl, "squeezed", None)  # pl.squeezed (newer) or None (older) marks a squeezed block dim


@dataclasses.dataclass(frozen=True)
class Operand:
    """How one input is cut (see the module docstring). `width`: columns (lhs) or rows (rhs, kcol) per K step."""

    kind: str
    width: int = 1
    per_k: bool = True

    @property
    def in_tile(self) -> bool:
        """Whether the tile function sees this operand at each K step (lhs, rhs, kcol; not the epilogue's)."""
        return self.kind in ("lhs", "rhs", "kcol")


def tiled_matmul(
    tile: Callable[..., jax.Array],
    epilogue: Callable[..., jax.Array],
    arrays: Sequence[jax.Array],
    specs: Sequence[Operand],
    *,
    fit: Fit,
    out_dtype: DTypeLike,
    acc_dtype: DTypeLike,
    mode: Mode,
    name: str,
) -> jax.Array:
    """Run a tiled matmul over padded operands; returns (fit.Mp, fit.Np) in `out_dtype`."""
    if mode.style == "gpu":
        call = _gpu_call
    else:
        call = _tpu_call
    return call(tile, epilogue, list(arrays), list(specs), fit, jnp.dtype(out_dtype), jnp.dtype(acc_dtype), mode, name)


def _gpu_call(tile, epilogue, arrays, specs, fit: Fit, out_dtype, acc_dtype, mode: Mode, name: str):
    b, nk = fit.blocks, fit.nk
    bm, bn = b.bm, b.bn
    in_specs = []
    for a, sp in zip(arrays, specs):
        if sp.kind == "lhs":
            in_specs.append(pl.BlockSpec((bm, a.shape[1]), lambda i, j: (i, 0)))
        elif sp.kind in ("rhs", "kcol"):
            in_specs.append(pl.BlockSpec((a.shape[0], bn), lambda i, j: (0, j)))
        elif sp.kind == "row":
            in_specs.append(pl.BlockSpec((bm, 1), lambda i, j: (i, 0)))
        elif sp.kind == "col":
            in_specs.append(pl.BlockSpec((1, bn), lambda i, j: (0, j)))
        else:
            raise ValueError(f"unknown operand kind {sp.kind!r}")

    def kernel(*refs):
        ins, o_ref = refs[:-1], refs[-1]

        def step(k, acc):
            vals = []
            for ref, sp in zip(ins, specs):
                if not sp.in_tile:
                    continue
                if sp.kind == "kcol" and not sp.per_k:
                    vals.append(ref[...])
                    continue
                start = pl.multiple_of(k * sp.width, sp.width)
                if sp.kind == "lhs":
                    vals.append(ref[:, pl.ds(start, sp.width)])
                else:
                    vals.append(ref[pl.ds(start, sp.width), :])
            return acc + tile(*vals)

        acc = lax.fori_loop(0, nk, step, jnp.zeros((bm, bn), acc_dtype))
        epi = [ref[...] for ref, sp in zip(ins, specs) if not sp.in_tile]
        o_ref[...] = epilogue(acc, *epi).astype(o_ref.dtype)

    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((fit.Mp, fit.Np), out_dtype),
        grid=(fit.Mp // bm, fit.Np // bn),
        in_specs=in_specs,
        out_specs=pl.BlockSpec((bm, bn), lambda i, j: (i, j)),
        compiler_params=compiler_params("gpu", b),
        interpret=mode.interpret,
        name=name,
    )(*arrays)


def _tpu_call(tile, epilogue, arrays, specs, fit: Fit, out_dtype, acc_dtype, mode: Mode, name: str):
    from jax.experimental.pallas import tpu as pltpu

    b, nk = fit.blocks, fit.nk
    bm, bn = b.bm, b.bn
    in_specs, ops = [], []
    for a, sp in zip(arrays, specs):
        if sp.kind == "lhs":
            in_specs.append(pl.BlockSpec((bm, sp.width), lambda i, j, k: (i, k)))
        elif sp.kind == "rhs":
            in_specs.append(pl.BlockSpec((sp.width, bn), lambda i, j, k: (k, j)))
        elif sp.kind == "kcol" and sp.per_k:
            a = a.reshape(nk, sp.width, a.shape[1])
            in_specs.append(pl.BlockSpec((_SQUEEZED, sp.width, bn), lambda i, j, k: (k, 0, j)))
        elif sp.kind in ("kcol", "col"):
            in_specs.append(pl.BlockSpec((1, bn), lambda i, j, k: (0, j)))
        elif sp.kind == "row":
            in_specs.append(pl.BlockSpec((bm, 1), lambda i, j, k: (i, 0)))
        else:
            raise ValueError(f"unknown operand kind {sp.kind!r}")
        ops.append(a)
    n_in = len(ops)

    def kernel(*refs):
        ins, o_ref, acc_ref = refs[:n_in], refs[n_in], refs[n_in + 1]
        k = pl.program_id(2)

        @pl.when(k == 0)
        def _init():
            acc_ref[...] = jnp.zeros(acc_ref.shape, acc_ref.dtype)

        vals = [ref[...] for ref, sp in zip(ins, specs) if sp.in_tile]
        acc_ref[...] += tile(*vals)

        @pl.when(k == nk - 1)
        def _done():
            epi = [ref[...] for ref, sp in zip(ins, specs) if not sp.in_tile]
            o_ref[...] = epilogue(acc_ref[...], *epi).astype(o_ref.dtype)

    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((fit.Mp, fit.Np), out_dtype),
        grid=(fit.Mp // bm, fit.Np // bn, nk),
        in_specs=in_specs,
        out_specs=pl.BlockSpec((bm, bn), lambda i, j, k: (i, j)),
        scratch_shapes=[pltpu.VMEM((bm, bn), acc_dtype)],
        compiler_params=compiler_params("tpu", b),
        interpret=mode.interpret,
        name=name,
    )(*ops)


def identity_epilogue(acc: jax.Array) -> jax.Array:
    """The epilogue of weight-only kernels: the accumulator (bm, bn) is the result."""
    return acc
