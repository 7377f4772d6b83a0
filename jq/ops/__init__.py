"""Compute on quantized weights: `qdot_general` and `qeinsum` accept a QTensor wherever a weight goes.

Dispatch: registered kernels (see `register_kernel`; the Pallas kernels plug in here) are asked in order whether
they support the call; the first that does runs it. Otherwise the fallback dequantizes inside the traced
function and calls XLA's dot — correct for every format, layout and shape. Why a call fell back is logged at
DEBUG level on the "jq.ops" logger (`logging.getLogger("jq.ops").setLevel("DEBUG")`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Callable

import jax
import jax.numpy as jnp

from jq.numbers.formats import get_format
from jq.numbers.qtensor import QTensor

__all__ = ["qdot_general", "qeinsum", "qdot", "register_kernel", "KERNELS", "quantize_activations",
           "fake_quantize_activations", "outlier_channels"]

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


_kernels_unavailable = False


def _load_kernels() -> None:
    """Make sure the Pallas kernels (`jq.pallas_kernels`) are registered, behind any user kernels. Imported lazily:
    no import cycle, and on CPU (where they only run when forced) Pallas is not imported unless JQ_KERNELS asks."""
    global _kernels_unavailable
    if _kernels_unavailable or (jax.default_backend() == "cpu" and not os.environ.get("JQ_KERNELS")):
        return
    try:
        from jq.pallas_kernels import dispatch
    except Exception as e:  # no usable Pallas in this install: the XLA fallback still serves every call
        _kernels_unavailable = True
        log.warning("Pallas kernels unavailable, using the XLA fallback: %s", e)
        return
    dispatch.register()  # idempotent; re-adds them if someone reset KERNELS


def _operand(x, dtype):
    return x.dequantize(dtype) if isinstance(x, QTensor) else x


def quantize_activations(x: jax.Array, fmt: str, axes: tuple[int, ...], clip: float = 1.0
                         ) -> tuple[jax.Array, jax.Array]:
    """Dynamic per-token quantization: codes of x (int8, int4 (unpacked, in int8) or fp8 e4m3) and f32 scales with
    one value per token: clip · abs-max over the contracted `axes` / qmax, kept as size-1 dims. Integer grids are
    symmetric restricted (±127, ±7); values beyond a clipped range saturate."""
    amax = jnp.max(jnp.abs(x.astype(jnp.float32)), axis=axes, keepdims=True) * clip
    f = get_format(fmt)
    qmax = float(2 ** (f.bits - 1) - 1) if f.is_int else f.max
    scale = jnp.where(amax > 0, amax / qmax, 1.0)
    return f.encode(x.astype(jnp.float32) / scale, symmetric=True, restricted=True), scale


def fake_quantize_activations(x: jax.Array, fmt: str, axes: tuple[int, ...], clip: float = 1.0) -> jax.Array:
    """x through `quantize_activations` and back, in x's dtype."""
    xq, xs = quantize_activations(x, fmt, axes, clip)
    return (get_format(fmt).decode(xq, jnp.float32) * xs).astype(x.dtype)


def outlier_channels(x: jax.Array, axes: tuple[int, ...], threshold: float) -> jax.Array:
    """LLM.int8's outlier mask: 1.0 for the contracted channels (`axes`) where some token of x has |x| > threshold,
    as a float array broadcastable against x."""
    other = tuple(a for a in range(x.ndim) if a not in axes)
    return (jnp.max(jnp.abs(x.astype(jnp.float32)), axis=other, keepdims=True) > threshold).astype(x.dtype)


def _w8a8_int(lhs, rhs: QTensor, dimension_numbers):
    """int8 x int8 -> int32 dot, scales applied after: activations per token, weights per output channel."""
    (lc, rc), (lb, rb) = dimension_numbers
    xq, xs = quantize_activations(lhs, "int8", tuple(lc), rhs.act_clip)
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
    if isinstance(rhs, QTensor) and rhs.rotation is not None and not isinstance(lhs, QTensor):
        return _rotated(lhs, rhs, dimension_numbers, precision, preferred_element_type)
    if isinstance(rhs, QTensor) and rhs.act_outlier is not None and not isinstance(lhs, QTensor):
        return _outlier_split(lhs, rhs, dimension_numbers, precision, preferred_element_type)
    _load_kernels()
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
        lhs = fake_quantize_activations(lhs, rhs.act, tuple(lc), rhs.act_clip)  # same numbers as integer codes
    act = rhs if isinstance(lhs, QTensor) else lhs
    dtype = act.dtype if not isinstance(act, QTensor) else jnp.float32
    log.debug("qdot_general falls back to dequantize + XLA dot (%s)", "; ".join(reasons) or "no kernel registered")
    return jax.lax.dot_general(
        _operand(lhs, dtype), _operand(rhs, dtype), dimension_numbers, precision, preferred_element_type
    )


def _rotated(lhs, rhs: QTensor, dimension_numbers, precision, preferred_element_type):
    """A weight stored as Qᵀ W (rotation "hadamard"): x W = (x Q)(Qᵀ W), the input rotated online in O(K log K)."""
    from jq.numbers.hadamard import hadamard_transform

    (lc, rc), _ = dimension_numbers
    if len(lc) != 1:
        raise ValueError(f"qdot_general: a Hadamard-rotated weight needs one contraction axis, got lhs axes {lc}")
    return qdot_general(hadamard_transform(lhs, axis=lc[0]), rhs.unrotated(), dimension_numbers, precision,
                        preferred_element_type)


def _outlier_split(lhs, rhs: QTensor, dimension_numbers, precision, preferred_element_type):
    """LLM.int8 decomposition: the outlier input channels (some |x| > threshold in this batch) multiply the
    dequantized weight in float; the others go through the quantized-activation path. Shapes stay static: the
    two parts are the input masked both ways (the zeroed channels add nothing to either product)."""
    (lc, _), _ = dimension_numbers
    m = outlier_channels(lhs, tuple(lc), rhs.act_outlier)
    inner = qdot_general(lhs * (1 - m), dataclasses.replace(rhs, act_outlier=None), dimension_numbers, precision,
                         preferred_element_type)
    outer = jax.lax.dot_general(lhs * m, rhs.dequantize(lhs.dtype), dimension_numbers, precision,
                                preferred_element_type)
    return inner + outer


def qdot(x: jax.Array, w, precision=None) -> jax.Array:
    """`x @ w` for x [..., K] and a weight w [K, N] (array or QTensor) → [..., N]."""
    return qdot_general(x, w, (((x.ndim - 1,), (0,)), ((), ())), precision)


def qeinsum(subscripts: str, x: jax.Array, w, precision=None, preferred_element_type=None) -> jax.Array:
    """`jnp.einsum(subscripts, x, w)` with `w` a QTensor or array (falls back to dequantize + einsum)."""
    if isinstance(w, QTensor):
        log.debug("qeinsum %s falls back to dequantize + XLA einsum", subscripts)
        w = w.dequantize(x.dtype)
    return jnp.einsum(subscripts, x, w, precision=precision, preferred_element_type=preferred_element_type)
