"""Compute on quantized weights: `qdot_general` and `qeinsum` accept a QTensor wherever a weight goes.

Dispatch: registered kernels (see `register_kernel`; the Pallas kernels plug in here) are asked in order whether
they support the call; the first that does runs it. Otherwise the fallback dequantizes inside the traced
function and calls XLA's dot — correct for every format, layout and shape. Why a call fell back is logged at
DEBUG level on the "jq.ops" logger (`logging.getLogger("jq.ops").setLevel("DEBUG")`).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Callable

import jax
import jax.numpy as jnp

from jq.formats import get_format
from jq.qtensor import QTensor

__all__ = ["qdot_general", "qeinsum", "qdot", "register_kernel", "KERNELS", "quantize_activations"]

log = logging.getLogger("jq.ops")


@dataclasses.dataclass(frozen=True)
class Kernel:
    """A matmul implementation: `supports(lhs, rhs, dimension_numbers)` returns None if it can run the call,
    else a short reason; `fn(lhs, rhs, dimension_numbers, preferred_element_type)` computes it."""

    name: str
    supports: Callable[..., str | None]
    fn: Callable[..., jax.Array]


KERNELS: list[Kernel] = []


def register_kernel(name: str, supports: Callable[..., str | None], fn: Callable[..., jax.Array]) -> None:
    """Add a kernel to the dispatch list (later registrations are asked first)."""
    KERNELS.insert(0, Kernel(name, supports, fn))


def _operand(x, dtype):
    return x.dequantize(dtype) if isinstance(x, QTensor) else x


def quantize_activations(x: jax.Array, fmt: str, axes: tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
    """Dynamic per-token quantization: codes of x (int8 or fp8 e4m3) and f32 scales with one value per token
    (the abs-max over the contracted `axes`, kept as size-1 dims)."""
    amax = jnp.max(jnp.abs(x.astype(jnp.float32)), axis=axes, keepdims=True)
    f = get_format(fmt)
    qmax = 127.0 if fmt == "int8" else f.max
    scale = jnp.where(amax > 0, amax / qmax, 1.0)
    return f.encode(x.astype(jnp.float32) / scale, symmetric=True, restricted=True), scale


def _w8a8_int(lhs, rhs: QTensor, dimension_numbers):
    """int8 x int8 -> int32 dot, scales applied after: activations per token, weights per output channel."""
    (lc, rc), (lb, rb) = dimension_numbers
    xq, xs = quantize_activations(lhs, "int8", tuple(lc))
    acc = jax.lax.dot_general(xq, rhs.codes, dimension_numbers, preferred_element_type=jnp.int32)
    xs = jnp.squeeze(xs, tuple(lc))  # [batch..., lhs free...]
    ws = jnp.squeeze(rhs.scale.astype(jnp.float32), tuple(rc))  # [rhs free...]
    xs = xs.reshape(xs.shape + (1,) * ws.ndim)
    return acc.astype(jnp.float32) * xs * ws


def _int_path_ok(lhs, rhs, dimension_numbers) -> bool:
    (_, rc), (lb, rb) = dimension_numbers
    lay = rhs.layout
    return (rhs.act == "int8" and rhs.fmt == "int8" and rhs.symmetric and lay.granularity == "channel"
            and rhs.perm is None and not lb and not rb and tuple(rc) == tuple(lay.axes) and not isinstance(lhs, QTensor))


def qdot_general(
    lhs,
    rhs,
    dimension_numbers,
    precision=None,
    preferred_element_type=None,
) -> jax.Array:
    """`lax.dot_general` where either operand may be a QTensor (usually `rhs`, the weight).

    Shapes follow `lax.dot_general`; a QTensor takes part with its logical shape. The result dtype is the
    activation dtype (or `preferred_element_type`).
    """
    if not isinstance(lhs, QTensor) and not isinstance(rhs, QTensor):
        return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision, preferred_element_type)
    reasons = []
    for k in KERNELS:
        why = k.supports(lhs, rhs, dimension_numbers)
        if why is None:
            return k.fn(lhs, rhs, dimension_numbers, preferred_element_type)
        reasons.append(f"{k.name}: {why}")
    if isinstance(rhs, QTensor) and rhs.act is not None:
        if _int_path_ok(lhs, rhs, dimension_numbers):
            log.debug("qdot_general: W8A8 int8 x int8 -> int32 XLA dot")
            return _w8a8_int(lhs, rhs, dimension_numbers).astype(lhs.dtype)
        (lc, _), _ = dimension_numbers
        xq, xs = quantize_activations(lhs, rhs.act, tuple(lc))
        lhs = (xq.astype(jnp.float32) * xs).astype(lhs.dtype)  # fake-quantized activations, same numbers
    act = rhs if isinstance(lhs, QTensor) else lhs
    dtype = act.dtype if not isinstance(act, QTensor) else jnp.float32
    log.debug("qdot_general falls back to dequantize + XLA dot (%s)", "; ".join(reasons) or "no kernel registered")
    return jax.lax.dot_general(
        _operand(lhs, dtype), _operand(rhs, dtype), dimension_numbers, precision, preferred_element_type
    )


def qdot(x: jax.Array, w, precision=None) -> jax.Array:
    """`x @ w` for x [..., K] and a weight w [K, N] (array or QTensor) → [..., N]."""
    return qdot_general(x, w, (((x.ndim - 1,), (0,)), ((), ())), precision)


def qeinsum(subscripts: str, x: jax.Array, w, precision=None, preferred_element_type=None) -> jax.Array:
    """`jnp.einsum(subscripts, x, w)` with `w` a QTensor or array (falls back to dequantize + einsum)."""
    if isinstance(w, QTensor):
        log.debug("qeinsum %s falls back to dequantize + XLA einsum", subscripts)
        w = w.dequantize(x.dtype)
    return jnp.einsum(subscripts, x, w, precision=precision, preferred_element_type=preferred_element_type)
