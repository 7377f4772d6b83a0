"""Which QTensor matmuls the kernels take, and how a QTensor's arrays are handed to them.

`register()` adds five kernels to `jq.ops.KERNELS` (as `jq.ops.Kernel(name, supports, fn)`, at the end of the list
so kernels a user registers with `register_kernel` keep priority); `jq.ops.qdot_general` asks each
`supports(lhs, rhs, dimension_numbers)` and runs the first that returns None, else falls back to dequantize +
XLA dot and logs every kernel's reason at DEBUG.

Taken (all of): kernels enabled here (`common.kernel_mode`: GPU/TPU, or forced interpret mode); float
activations x (bf16 / f16 / f32) contracting their last axis; a QTensor weight contracting exactly its first
axis (`layout.axes == (0,)`, a Dense kernel (K, N) or (K, *features), features flattened to N); no batch
dimensions; per-axis groups (not `flat`). Then by format:

| kernel            | weight                        | scales                     | activations              |
|-------------------|-------------------------------|----------------------------|--------------------------|
| pallas_w4a16      | int4, sym or asym             | group (g), channel, tensor | float                    |
| pallas_w8a16      | int8 sym / asym, fp8 (GPU)    | group (g), channel, tensor | float                    |
| pallas_w8a8_int8  | int8 sym, `act="int8"`        | channel, tensor            | int8 per token (act_clip)|
| pallas_w8a8_fp8   | fp8_e4m3, `act="fp8_e4m3"`    | channel, tensor            | e4m3 per token (GPU)     |
| pallas_lut        | codebook cb{b}, cb{b}x{d}; 2-D | group (g), channel, tensor | float                    |

Group sizes: powers of two on GPU (Triton tiles), multiples of 16 (int4) / 8 (int8) / 8·d (codebooks with
vectors of d) on TPU — so GPTVQ's group_size 192 takes the LUT kernel on TPU only. Refused on a compiled TPU:
fp8 and float16 activations. Rotated weights and LLM.int8 outlier splits are resolved by `jq.ops` before the
kernels are asked. On a compiled TPU, codebooks with more than `LUT_TPU_MAX_VALUES` table values per index
(cb8x2, cb8x4, cb7x4) are left to XLA (the lookup there is a select over the entries: `lut`).

On a device, `supports` also selects blocks for the shape (`autotune`): the first trace of a new shape compiles
and times candidates (or, with JQ_AUTOTUNE=0, compiles and runs the defaults once); if nothing builds, the reason
is returned and the call falls back instead of failing the user's jit.

Handled on the fly in XLA before the call (cheap, O(M·K) or O(scales)): act-order (`perm`: the kernels see
x[..., perm], since x @ W == x[..., perm] @ stored); padded groups and a K that is not a multiple of 8 (x is
zero-padded to the stored length); M not a multiple of the block (rows padded); scale / zero reshapes. K or N
that no legal block divides are padded too, which copies the weight on every call: correct but slow (real model
shapes never need it). Bit-packed codebook indices are unpacked to one byte each in XLA before the LUT kernel (an
extra pass over the weight). Activation quantization for W8A8 is `jq.ops.quantize_activations`, so kernel and
fallback see the same codes.

Gradients: the forward pass is the kernel; the backward pass is XLA's x-gradient with the dequantized weight
(straight-through for activation quantization); quantized weights receive no gradient.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Iterator

import jax
import jax.numpy as jnp

from jq.pallas_kernels import autotune, lut, w4a16, w8a8, w8a16
from jq.pallas_kernels.common import Mode, forced, kernel_mode
from jq.pallas_kernels.fp8 import fp8_matmul
from jq.pallas_kernels.w8a8 import w8a8_int8_matmul
from jq.numbers.qtensor import QTensor
from jq.ops.activations import quantize_activations
from jq.ops.registry import KERNELS, Kernel

if TYPE_CHECKING:
    from jax.lax import DotDimensionNumbers
    from jax.typing import DTypeLike

__all__ = ["register", "force_interpret", "KERNEL_NAMES"]

FLOAT_ACTS = tuple(jnp.dtype(d) for d in (jnp.bfloat16, jnp.float16, jnp.float32))
FP8_WEIGHTS = ("fp8_e4m3", "fp8_e5m2")
LUT_TPU_MAX_VALUES = 256  # 2^bits · vec: the TPU lookup costs O(that) VPU selects per index (a bound, not measured)


# -- what every kernel needs ------------------------------------------------------------------------------------


def _common(lhs: jax.Array | QTensor, rhs: jax.Array | QTensor,
            dimension_numbers: DotDimensionNumbers) -> tuple[Mode | None, str | None]:
    mode, why = kernel_mode()
    if mode is None:
        return None, why
    if isinstance(lhs, QTensor) or not isinstance(rhs, QTensor):
        return None, "only a float lhs with a QTensor rhs"
    (lc, rc), (lb, rb) = dimension_numbers
    lay = rhs.layout
    if lb or rb:
        return None, "batch dimensions"
    if tuple(rc) != (0,) or tuple(lay.axes) != (0,):
        return None, f"contraction over rhs axes {tuple(rc)} (layout axes {lay.axes}); kernels take axis 0 only"
    if tuple(lc) != (jnp.ndim(lhs) - 1,):
        return None, f"lhs contracts axes {tuple(lc)}, not its last"
    if rhs.ndim < 2:
        return None, "a 1-D weight"
    if lay.flat or rhs.outer_scale is not None:
        return None, "flat groups" if lay.flat else "a per-tensor outer scale (two-level scales: NVFP4)"
    if rhs.policy.rotation is not None or rhs.policy.act_outlier is not None or rhs.sparse_index is not None:
        return None, "rotation / outlier split / sparse term pending (jq.ops resolves those before asking the kernels)"
    if jnp.dtype(lhs.dtype) not in FLOAT_ACTS:
        return None, f"activation dtype {jnp.dtype(lhs.dtype).name}"
    if mode.style == "tpu" and not mode.interpret and jnp.dtype(lhs.dtype) == jnp.float16:
        return None, "float16 activations on TPU"
    if math.prod(jnp.shape(lhs)) == 0 or math.prod(rhs.shape[1:]) == 0:
        return None, "an empty operand"
    return mode, None


def _probe(select: Callable[[], object]) -> str | None:
    """Run the block selection now (on a device with tuning on, this compiles and times candidates), so that a
    kernel that cannot compile here falls back to XLA instead of failing the user's jit."""
    try:
        select()
    except autotune.NoBlocks as e:
        return str(e)
    return None


def _mkn(lhs: jax.Array, rhs: QTensor, k_rows: int) -> tuple[int, int, int]:
    return math.prod(jnp.shape(lhs)[:-1]), k_rows, math.prod(rhs.shape[1:])


def _group(rhs: QTensor) -> int | None:
    return rhs.layout.group_size if rhs.layout.granularity == "group" else None


def _fp8_gpu_ok(mode: Mode) -> str | None:
    """fp8 conversions and dots need compute capability >= 8.9 on GPU."""
    if mode.interpret or mode.style != "gpu":
        return None
    cc = getattr(jax.devices()[0], "compute_capability", None)
    try:
        if cc is not None and tuple(int(p) for p in str(cc).split(".")[:2]) < (8, 9):
            return f"fp8 needs compute capability >= 8.9, this GPU has {cc}"
    except ValueError:
        pass
    return None


def _x2d(lhs: jax.Array, rhs: QTensor) -> jax.Array:
    """Activations as (M, K), permuted to the stored order of an act-order weight."""
    x = lhs if rhs.perm is None else jnp.take(lhs, rhs.perm, axis=-1)
    return x.reshape(-1, x.shape[-1])


def _meta(rhs: QTensor) -> tuple[jax.Array, jax.Array | None]:
    """Scales and zero points as (G, N) for groups, (1, N) per channel or per tensor."""
    N = math.prod(rhs.shape[1:])

    def flat(a):
        if a is None:
            return None
        if rhs.layout.granularity == "tensor":
            return jnp.broadcast_to(a.reshape(1, 1), (1, N))
        return a.reshape(-1, N)

    return flat(rhs.scale), flat(rhs.zero)


def _codes2d(rhs: QTensor) -> jax.Array:
    return rhs.codes.reshape(rhs.codes.shape[0], -1)


def _with_xla_grad(kernel_fn: Callable[[jax.Array, QTensor], jax.Array], lhs: jax.Array, rhs: QTensor) -> jax.Array:
    """kernel_fn(lhs, rhs) in the forward pass; the XLA dot's gradient for lhs in the backward pass."""

    @jax.custom_vjp
    def f(x, w):
        return kernel_fn(x, w)

    def fwd(x, w):
        return kernel_fn(x, w), (x, w)

    def bwd(res, g):
        x, w = res
        wd = w.dequantize(jnp.float32).reshape(x.shape[-1], -1)
        dx = jnp.dot(g.reshape(-1, wd.shape[1]).astype(jnp.float32), wd.T)
        return dx.reshape(x.shape).astype(x.dtype), None

    f.defvjp(fwd, bwd)
    return f(lhs, rhs)


def _out_shape(lhs: jax.Array, rhs: QTensor) -> tuple[int, ...]:
    return tuple(jnp.shape(lhs)[:-1]) + tuple(rhs.shape[1:])


# -- W4A16 ------------------------------------------------------------------------------------------------------


def supports_w4a16(lhs: jax.Array | QTensor, rhs: jax.Array | QTensor,
                   dimension_numbers: DotDimensionNumbers) -> str | None:
    """None if `run_w4a16` takes x [..., K] · an int4 QTensor [K, N...], else the reason it does not."""
    mode, why = _common(lhs, rhs, dimension_numbers)
    if why:
        return why
    if rhs.fmt != "int4":
        return f"format {rhs.fmt} is not int4"
    if rhs.policy.act is not None:
        return f"activations quantized to {rhs.policy.act}"
    g = _group(rhs)
    if why := w4a16.unsupported(mode.style, g):
        return why
    M, K, N = _mkn(lhs, rhs, rhs.codes.shape[0] * 2)
    return _probe(lambda: w4a16.select_blocks(M, K, N, group_size=g, symmetric=rhs.symmetric, dtype=lhs.dtype,
                                              mode=mode))


def run_w4a16(lhs: jax.Array, rhs: QTensor, dimension_numbers: DotDimensionNumbers,
              preferred_element_type: DTypeLike | None = None) -> jax.Array:
    """x [..., K] · int4 QTensor [K, N...] → [..., N...] by the W4A16 kernel (in x's dtype by default)."""
    mode, _ = kernel_mode()
    out_dtype = preferred_element_type or lhs.dtype

    def k(x, w):
        scale, zero = _meta(w)
        y = w4a16.w4a16_matmul(_x2d(x, w), _codes2d(w), scale, zero, group_size=_group(w), symmetric=w.symmetric,
                               zero_min=w.zero_min, out_dtype=out_dtype, mode=mode)
        return y.reshape(_out_shape(x, w))

    return _with_xla_grad(k, lhs, rhs)


# -- W8A16 ------------------------------------------------------------------------------------------------------


def supports_w8a16(lhs: jax.Array | QTensor, rhs: jax.Array | QTensor,
                   dimension_numbers: DotDimensionNumbers) -> str | None:
    """None if `run_w8a16` takes x [..., K] · an int8 / fp8 QTensor [K, N...], else the reason it does not."""
    mode, why = _common(lhs, rhs, dimension_numbers)
    if why:
        return why
    if rhs.fmt not in ("int8",) + FP8_WEIGHTS:
        return f"format {rhs.fmt} is not int8 / fp8"
    if rhs.policy.act is not None:
        return f"activations quantized to {rhs.policy.act}"
    if rhs.fmt in FP8_WEIGHTS:
        if mode.style == "tpu" and not mode.interpret:
            return "fp8 weights are not enabled in the TPU style"
        if why := _fp8_gpu_ok(mode):
            return why
    g = _group(rhs)
    if why := w8a16.unsupported(mode.style, g):
        return why
    M, K, N = _mkn(lhs, rhs, rhs.codes.shape[0])
    return _probe(lambda: w8a16.select_blocks(M, K, N, group_size=g, codes_dtype=rhs.codes.dtype,
                                              asym=rhs.zero is not None, dtype=lhs.dtype, mode=mode))


def run_w8a16(lhs: jax.Array, rhs: QTensor, dimension_numbers: DotDimensionNumbers,
              preferred_element_type: DTypeLike | None = None) -> jax.Array:
    """x [..., K] · int8 / fp8 QTensor [K, N...] → [..., N...] by the W8A16 kernel (in x's dtype by default)."""
    mode, _ = kernel_mode()
    out_dtype = preferred_element_type or lhs.dtype

    def k(x, w):
        scale, zero = _meta(w)
        y = w8a16.w8a16_matmul(_x2d(x, w), _codes2d(w), scale, zero, group_size=_group(w), zero_min=w.zero_min,
                               out_dtype=out_dtype, mode=mode)
        return y.reshape(_out_shape(x, w))

    return _with_xla_grad(k, lhs, rhs)


# -- W8A8 int8 and fp8 ----------------------------------------------------------------------------------------


def _supports_w8a8(lhs: jax.Array | QTensor, rhs: jax.Array | QTensor, dimension_numbers: DotDimensionNumbers,
                   fmt: str) -> str | None:
    mode, why = _common(lhs, rhs, dimension_numbers)
    if why:
        return why
    if rhs.policy.act != fmt or rhs.fmt != fmt:
        return f"weight {rhs.fmt} with activations {rhs.policy.act}, not {fmt} x {fmt}"
    if not rhs.symmetric:
        return "asymmetric weights"
    if rhs.layout.granularity not in ("channel", "tensor"):
        return f"{rhs.layout.granularity} scales (the epilogue takes per-channel or per-tensor)"
    if fmt != "int8":
        if mode.style == "tpu" and not mode.interpret:
            return "fp8 matmuls are not enabled in the TPU style"
        if why := _fp8_gpu_ok(mode):
            return why
    M, K, N = _mkn(lhs, rhs, rhs.codes.shape[0])
    name, acc = ("w8a8_int8", jnp.int32) if fmt == "int8" else ("w8a8_fp8", jnp.float32)
    return _probe(lambda: w8a8.select_blocks(M, K, N, codes_dtype=rhs.codes.dtype, acc_dtype=acc, name=name,
                                             mode=mode))


def supports_w8a8_int8(lhs: jax.Array | QTensor, rhs: jax.Array | QTensor,
                       dimension_numbers: DotDimensionNumbers) -> str | None:
    """None if `run_w8a8_int8` takes x [..., K] · an int8 QTensor [K, N...] with int8 activations, else why not."""
    return _supports_w8a8(lhs, rhs, dimension_numbers, "int8")


def supports_w8a8_fp8(lhs: jax.Array | QTensor, rhs: jax.Array | QTensor,
                      dimension_numbers: DotDimensionNumbers) -> str | None:
    """None if `run_w8a8_fp8` takes x [..., K] · an fp8_e4m3 QTensor [K, N...] with e4m3 activations, else why not."""
    return _supports_w8a8(lhs, rhs, dimension_numbers, "fp8_e4m3")


def _run_w8a8(lhs: jax.Array, rhs: QTensor, preferred_element_type: DTypeLike | None, fmt: str,
              kernel: Callable[..., jax.Array]) -> jax.Array:
    mode, _ = kernel_mode()
    out_dtype = preferred_element_type or lhs.dtype

    clip = rhs.policy.act_clip
    extra = () if clip == 1.0 else (clip,)  # the per-token range covers clip · max |x|

    def k(x, w):
        xq, xs = quantize_activations(_x2d(x, w), fmt, (1,), *extra)
        ws, _ = _meta(w)
        y = kernel(xq, xs, _codes2d(w), ws, out_dtype=out_dtype, mode=mode)
        return y.reshape(_out_shape(x, w))

    return _with_xla_grad(k, lhs, rhs)


def run_w8a8_int8(lhs: jax.Array, rhs: QTensor, dimension_numbers: DotDimensionNumbers,
                  preferred_element_type: DTypeLike | None = None) -> jax.Array:
    """x [..., K] · int8 QTensor [K, N...] → [..., N...]: x quantized per token to int8, int32 accumulation."""
    return _run_w8a8(lhs, rhs, preferred_element_type, "int8", w8a8_int8_matmul)


def run_w8a8_fp8(lhs: jax.Array, rhs: QTensor, dimension_numbers: DotDimensionNumbers,
                 preferred_element_type: DTypeLike | None = None) -> jax.Array:
    """x [..., K] · fp8_e4m3 QTensor [K, N...] → [..., N...]: x quantized per token to e4m3, f32 accumulation."""
    return _run_w8a8(lhs, rhs, preferred_element_type, "fp8_e4m3", fp8_matmul)


# -- LUT (learned codebooks) ------------------------------------------------------------------------------------


def supports_lut(lhs: jax.Array | QTensor, rhs: jax.Array | QTensor,
                 dimension_numbers: DotDimensionNumbers) -> str | None:
    """None if `run_lut` takes x [..., K] · a 2-D codebook QTensor [K, N] (cb{b}, cb{b}x{d}), else why not."""
    mode, why = _common(lhs, rhs, dimension_numbers)
    if why:
        return why
    f = rhs.format
    if f.kind != "lut":  # e8p: a fixed table; additive (aq8x2): a sum of several tables per vector. XLA dequantizes
        return f"format {rhs.fmt} is not a learned single-table codebook (kind {f.kind})"
    if rhs.policy.act is not None:
        return f"activations quantized to {rhs.policy.act}"
    if rhs.ndim != 2:
        return f"a {rhs.ndim}-D codebook weight (the LUT kernel takes a 2-D kernel [K, N])"
    if mode.style == "tpu" and not mode.interpret and 2**f.bits * f.vec > LUT_TPU_MAX_VALUES:
        return (f"{rhs.fmt} on TPU: the lookup would select among {2**f.bits * f.vec} table values per index "
                f"(more than {LUT_TPU_MAX_VALUES})")
    g = _group(rhs)
    if why := lut.unsupported(mode.style, g, f.vec):
        return why
    M, K, N = _mkn(lhs, rhs, rhs.layout.stored_shape[0])
    shared = rhs.codebook.shape[1] == 1 and N > 1
    return _probe(lambda: lut.select_blocks(M, K, N, fmt=rhs.fmt, group_size=g, shared=shared, dtype=lhs.dtype,
                                            mode=mode))


def run_lut(lhs: jax.Array, rhs: QTensor, dimension_numbers: DotDimensionNumbers,
            preferred_element_type: DTypeLike | None = None) -> jax.Array:
    """x [..., K] · codebook QTensor [K, N] → [..., N] by the LUT kernel (act-order and padding in `lut_matmul`)."""
    mode, _ = kernel_mode()
    out_dtype = preferred_element_type or lhs.dtype

    def k(x, w):
        y = lut.lut_matmul(x.reshape(-1, x.shape[-1]), w, out_dtype=out_dtype, mode=mode)
        return y.reshape(_out_shape(x, w))

    return _with_xla_grad(k, lhs, rhs)


# -- registration -------------------------------------------------------------------------------------------------

_TABLE = (
    ("pallas_w4a16", supports_w4a16, run_w4a16),
    ("pallas_w8a16", supports_w8a16, run_w8a16),
    ("pallas_w8a8_int8", supports_w8a8_int8, run_w8a8_int8),
    ("pallas_w8a8_fp8", supports_w8a8_fp8, run_w8a8_fp8),
    ("pallas_lut", supports_lut, run_lut),
)
KERNEL_NAMES = tuple(name for name, _, _ in _TABLE)


def register() -> None:
    """Add the kernels to `jq.ops.KERNELS` if they are not there (cheap and idempotent; `jq.ops` calls it before
    each dispatch on GPU/TPU). They go *behind* the kernels registered with `jq.ops.register_kernel`, so a
    user's own kernel is asked first whenever these were loaded."""
    have = {k.name for k in KERNELS}
    for name, supports, fn in _TABLE:
        if name not in have:
            KERNELS.append(Kernel(name, supports, fn))


@contextlib.contextmanager
def force_interpret(style: str = "gpu") -> Iterator[Mode]:
    """Within the block, `jq.ops` dispatch uses the kernels in interpret mode, on any backend.

    `style` picks which kernel structure is interpreted: "gpu" (Triton-shaped) or "tpu" (Mosaic-shaped).
    Functions jitted outside the block keep what they were traced with.
    """
    register()
    m = Mode(style, interpret=True)
    with forced(m):
        yield m
