"""Compute on quantized weights: `qdot_general` and `qeinsum` accept a QTensor wherever a weight goes.

Dispatch: registered kernels (see `register_kernel`; the Pallas kernels plug in here) are asked in order whether
they support the call; the first that does runs it. Otherwise the fallback dequantizes inside the traced
function and calls XLA's dot — correct for every format, layout and shape. Why a call fell back is logged at
DEBUG level on the "jq.ops" logger (`logging.getLogger("jq.ops").setLevel("DEBUG")`).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp

from jq.numbers import progressive
from jq.numbers.lowrank import LowRank
from jq.numbers.qtensor import QTensor
from jq.ops.activations import fake_quantize_activations, outlier_channels, quantize_activations
from jq.ops.matrix_view import einsum_dimension_numbers, matrix_view
from jq.ops.registry import KERNELS, Kernel, register_kernel

if TYPE_CHECKING:
    from jax.lax import DotDimensionNumbers, PrecisionLike
    from jax.typing import DTypeLike

__all__ = ["qdot_general", "qeinsum", "qdot", "register_kernel", "Kernel", "KERNELS", "quantize_activations",
           "fake_quantize_activations", "outlier_channels"]

log = logging.getLogger("jq.ops")


_kernels_unavailable = False


def _load_kernels() -> None:
    """Make sure the Pallas kernels (`jq.pallas_kernels`) are registered, behind any user kernels. Imported lazily:
    no import cycle, and on CPU (where they only run when forced) Pallas is not imported unless JQ_KERNELS asks."""
    global _kernels_unavailable
    if _kernels_unavailable or (jax.default_backend() == "cpu" and not os.environ.get("JQ_KERNELS")):
        return
    try:
        import jq.pallas_kernels as pallas_kernels  # registers itself on import
    except Exception as e:  # no usable Pallas in this install: the XLA fallback still serves every call
        _kernels_unavailable = True
        log.warning("Pallas kernels unavailable, using the XLA fallback: %s", e)
        return
    pallas_kernels.register()  # idempotent; re-adds them if someone reset KERNELS


def _operand(x: jax.Array | QTensor | LowRank, dtype: DTypeLike) -> jax.Array:
    return x.dequantize(dtype) if isinstance(x, (QTensor, LowRank)) else x


@functools.partial(jax.custom_jvp, nondiff_argnums=(2,))
def _w8a8_int(lhs: jax.Array, rhs: QTensor, dimension_numbers: DotDimensionNumbers) -> jax.Array:
    """int8 x int8 -> int32 dot, scales applied after: activations per token, weights per output channel. Its
    derivative in x is the straight-through one, x̂ ≈ x (adapters train through a W8A8 base)."""
    (lc, rc), (lb, rb) = dimension_numbers
    xq, xs = quantize_activations(lhs, "int8", tuple(lc), rhs.policy.act_clip)
    acc = jax.lax.dot_general(xq, rhs.codes, dimension_numbers, preferred_element_type=jnp.int32)
    xs = jnp.squeeze(xs, tuple(lc))  # [batch..., lhs free...]
    ws = jnp.squeeze(rhs.scale.astype(jnp.float32), tuple(rc))  # [rhs free...]
    xs = xs.reshape(xs.shape + (1,) * ws.ndim)
    return acc.astype(jnp.float32) * xs * ws


@_w8a8_int.defjvp
def _w8a8_int_jvp(dimension_numbers, primals, tangents):
    lhs, rhs = primals
    return _w8a8_int(lhs, rhs, dimension_numbers), jax.lax.dot_general(
        tangents[0], rhs.dequantize(jnp.float32), dimension_numbers).astype(jnp.float32)


def _int_path_ok(lhs: jax.Array | QTensor, rhs: QTensor, dimension_numbers: DotDimensionNumbers) -> bool:
    (_, rc), (lb, rb) = dimension_numbers
    lay = rhs.layout
    return (rhs.policy.act == "int8" and rhs.fmt == "int8" and rhs.symmetric and lay.granularity == "channel"
            and rhs.perm is None and not lb and not rb and tuple(rc) == tuple(lay.axes) and not isinstance(lhs, QTensor))


def qdot_general(
    lhs: jax.Array | QTensor,
    rhs: jax.Array | QTensor,
    dimension_numbers: DotDimensionNumbers,
    precision: PrecisionLike = None,
    preferred_element_type: DTypeLike | None = None,
) -> jax.Array:
    """`lax.dot_general` where either operand may be a QTensor (usually `rhs`, the weight).

    Shapes follow `lax.dot_general` (e.g. x [B, T, K] · w [K, N] over ((2,), (0,)) → [B, T, N]); a QTensor takes
    part with its logical shape. The result dtype is the activation dtype (or `preferred_element_type`). A
    `LowRank` weight (base + adapter) runs its base here and adds the adapter's x·a·b beside it.
    """
    if isinstance(rhs, LowRank) and not isinstance(lhs, (QTensor, LowRank)):
        return _lowrank(lhs, rhs, dimension_numbers, precision, preferred_element_type)
    if not isinstance(lhs, QTensor) and not isinstance(rhs, QTensor):
        return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision, preferred_element_type)
    if isinstance(rhs, QTensor) and rhs.policy.rotation is not None and not isinstance(lhs, QTensor):
        return _rotated(lhs, rhs, dimension_numbers, precision, preferred_element_type)
    view = matrix_view(lhs, rhs, dimension_numbers) if isinstance(rhs, QTensor) and not isinstance(lhs, QTensor) \
        else None
    if view is not None:  # an N-D weight contracting its leading axes runs as the matrix [K, N] it is stored as
        x, q, shape = view
        return qdot_general(x, q, (((x.ndim - 1,), (0,)), ((), ())), precision, preferred_element_type).reshape(shape)
    if isinstance(rhs, QTensor) and rhs.sparse_index is not None and not isinstance(lhs, QTensor):
        return _dense_and_sparse(lhs, rhs, dimension_numbers, precision, preferred_element_type)
    if isinstance(rhs, QTensor) and rhs.policy.act_outlier is not None and not isinstance(lhs, QTensor):
        return _outlier_split(lhs, rhs, dimension_numbers, precision, preferred_element_type)
    if (isinstance(rhs, QTensor) and rhs.policy.act == "int8" and progressive.is_progressive(rhs)
            and not isinstance(lhs, QTensor)):  # QoQ W4A8: (q − z)·s8 is int8 exactly; the W8A8 paths take it
        rhs = progressive.as_int8(rhs)
    _load_kernels()
    reasons = []
    for k in KERNELS:
        why = k.supports(lhs, rhs, dimension_numbers)
        if why is None:
            return k.fn(lhs, rhs, dimension_numbers, preferred_element_type)
        reasons.append(f"{k.name}: {why}")
    if isinstance(rhs, QTensor) and rhs.policy.act is not None:
        if _int_path_ok(lhs, rhs, dimension_numbers):
            log.debug("qdot_general: W8A8 int8 x int8 -> int32 XLA dot")
            return _w8a8_int(lhs, rhs, dimension_numbers).astype(lhs.dtype)
        (lc, _), _ = dimension_numbers
        xq = fake_quantize_activations(lhs, rhs.policy.act, tuple(lc), rhs.policy.act_clip)  # the integer codes' numbers
        lhs = jax.lax.stop_gradient(xq) + (lhs - jax.lax.stop_gradient(lhs))  # value-exact straight-through gradient
    act = rhs if isinstance(lhs, QTensor) else lhs
    dtype = act.dtype if not isinstance(act, QTensor) else jnp.float32
    log.debug("qdot_general falls back to dequantize + XLA dot (%s)", "; ".join(reasons) or "no kernel registered")
    return jax.lax.dot_general(
        _operand(lhs, dtype), _operand(rhs, dtype), dimension_numbers, precision, preferred_element_type
    )


def _rotated(lhs: jax.Array, rhs: QTensor, dimension_numbers: DotDimensionNumbers, precision: PrecisionLike,
             preferred_element_type: DTypeLike | None) -> jax.Array:
    """A weight stored as Qᵀ W (rotation "hadamard"): x W = (x Q)(Qᵀ W), the input rotated online in O(K log K)."""
    (lc, rc), _ = dimension_numbers
    if len(lc) != 1:
        raise ValueError(f"qdot_general: a Hadamard-rotated weight needs one contraction axis, got lhs axes {lc}")
    return qdot_general(rhs.policy.rotation.apply(lhs, axis=lc[0]), rhs.unrotated(), dimension_numbers, precision,
                        preferred_element_type)


def _outlier_split(lhs: jax.Array, rhs: QTensor, dimension_numbers: DotDimensionNumbers, precision: PrecisionLike,
                   preferred_element_type: DTypeLike | None) -> jax.Array:
    """LLM.int8 decomposition: the outlier input channels (some |x| > threshold in this batch) multiply the
    dequantized weight in float; the others go through the quantized-activation path. Shapes stay static: the
    two parts are the input masked both ways (the zeroed channels add nothing to either product)."""
    (lc, _), _ = dimension_numbers
    m = outlier_channels(lhs, tuple(lc), rhs.policy.act_outlier)
    inner = qdot_general(lhs * (1 - m), dataclasses.replace(rhs, policy=dataclasses.replace(rhs.policy, act_outlier=None)), dimension_numbers, precision,
                         preferred_element_type)
    outer = jax.lax.dot_general(lhs * m, rhs.dequantize(lhs.dtype), dimension_numbers, precision,
                                preferred_element_type)
    return inner + outer


def _dense_and_sparse(lhs: jax.Array, rhs: QTensor, dimension_numbers: DotDimensionNumbers, precision: PrecisionLike,
                      preferred_element_type: DTypeLike | None) -> jax.Array:
    """x·dense + x·S (`jq.numbers.sparse`): the dense codes through `qdot_general` (kernels, activation quantization),
    the nnz kept weights as a gather of their input rows and a scatter-add into their output columns, in float32."""
    y = qdot_general(lhs, rhs.dense_part(), dimension_numbers, precision, preferred_element_type)
    (lc, rc), (lb, rb) = dimension_numbers
    shape, nc = rhs.shape, len(rc)
    val = rhs.sparse_value.astype(jnp.float32)
    if lb or rb or tuple(rc) != tuple(range(nc)):  # an unusual contraction: multiply the dense form of S
        s = jnp.zeros(rhs.size, jnp.float32).at[rhs.sparse_index].add(val).reshape(shape)
        return y + jax.lax.dot_general(lhs.astype(jnp.float32), s, dimension_numbers, precision).astype(y.dtype)
    k = math.prod(shape[:nc])
    n = rhs.size // k
    x = jnp.moveaxis(lhs, tuple(lc), tuple(range(lhs.ndim - nc, lhs.ndim)))
    x = x.reshape(x.shape[: lhs.ndim - nc] + (k,)).astype(jnp.float32)
    rows, cols = rhs.sparse_index // n, rhs.sparse_index % n
    out = jnp.zeros(x.shape[:-1] + (n,), jnp.float32).at[..., cols].add(x[..., rows] * val)
    return y + out.reshape(x.shape[:-1] + shape[nc:]).astype(y.dtype)


def _lowrank(lhs: jax.Array, rhs: LowRank, dimension_numbers: DotDimensionNumbers, precision: PrecisionLike,
             preferred_element_type: DTypeLike | None) -> jax.Array:
    """x·base + scale·((x a) b): the base through `qdot_general` (kernels, rotations, activation quantization), the
    adapter in the activation dtype, its input dropped out when the leaf carries a key. The product a b is never
    formed unless the matmul contracts something other than the weight's leading `in_ndim` axes."""
    y = qdot_general(lhs, rhs.base, dimension_numbers, precision, preferred_element_type)
    (lc, rc), (lb, rb) = dimension_numbers
    if lb or rb or tuple(rc) != tuple(range(rhs.in_ndim)):  # an unusual contraction: the merged delta is correct
        return y + jax.lax.dot_general(lhs, rhs.delta(lhs.dtype), dimension_numbers, precision,
                                       preferred_element_type).astype(y.dtype)
    x = lhs
    if rhs.key is not None and rhs.dropout > 0:
        keep = jax.random.bernoulli(rhs.key, 1.0 - rhs.dropout, x.shape)
        x = jnp.where(keep, x / (1.0 - rhs.dropout), 0).astype(lhs.dtype)
    if rhs.pool > 1:  # QA-LoRA: sum the input over each group of `pool` rows, then multiply by a [K / pool, r]
        x = jnp.moveaxis(x, lc[0], -1)
        k = x.shape[-1]
        x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, -k % rhs.pool)])  # a short last group, as padded groups are
        x = x.reshape(x.shape[:-1] + (x.shape[-1] // rhs.pool, rhs.pool)).sum(-1)
        lc = (x.ndim - 1,)
    t = jax.lax.dot_general(x, rhs.a.astype(lhs.dtype), ((tuple(lc), tuple(range(rhs.in_ndim))), ((), ())), precision)
    u = jnp.tensordot(t, rhs.b.astype(lhs.dtype), axes=1, precision=precision)
    return y + (rhs.scale * u).astype(y.dtype)


def qdot(x: jax.Array, w: jax.Array | QTensor, precision: PrecisionLike = None) -> jax.Array:
    """`x @ w` for x [..., K] and a weight w [K, N] (array or QTensor) → [..., N]."""
    return qdot_general(x, w, (((x.ndim - 1,), (0,)), ((), ())), precision)


def qeinsum(subscripts: str, x: jax.Array, w: jax.Array | QTensor, precision: PrecisionLike = None,
            preferred_element_type: DTypeLike | None = None) -> jax.Array:
    """`jnp.einsum(subscripts, x, w)` with `w` a QTensor, LowRank or array; shapes as the subscripts say, a QTensor
    taking part with its logical shape (e.g. "btk,kn->btn": [B, T, K], [K, N] → [B, T, N]). A two-operand contraction
    runs through `qdot_general` (kernels, rotations, activation quantization); other strings dequantize + einsum."""
    if isinstance(w, (QTensor, LowRank)):
        spec = einsum_dimension_numbers(subscripts, jnp.ndim(x), w.ndim)
        base = w.base if isinstance(w, LowRank) else w
        rotated = isinstance(base, QTensor) and base.policy.rotation is not None
        if spec is not None and not (rotated and len(spec[0][0][1]) > 1):  # online rotations take one axis
            dn, order = spec
            return jnp.transpose(qdot_general(x, w, dn, precision, preferred_element_type), order)
        log.debug("qeinsum %s falls back to dequantize + XLA einsum", subscripts)
        w = w.dequantize(x.dtype)
    return jnp.einsum(subscripts, x, w, precision=precision, preferred_element_type=preferred_element_type)
