"""What every kernel shares: where and how kernels run (mode), block sizes, padding, tile dequantization.

Modes. A kernel runs in one of two *styles*, each the natural shape of a matmul on its backend:

- "gpu" (Pallas on Triton): grid (M/bm, N/bn); each program owns one output tile and loops over K inside the
  kernel (`lax.fori_loop`), slicing its row block of x and column block of the weight per step. Triton needs
  every array a kernel *computes on* to have a power-of-two size and a dot needs each dim >= 16.
- "tpu" (Pallas on Mosaic): grid (M/bm, N/bn, K/bk) with K innermost and "arbitrary", an f32/int32 VMEM
  accumulator initialised at k == 0 and written out at the last k. A block's last two dims must be multiples
  of (8, 128) — we use (32, 128) so int8 tiles are native — or span the whole array dim.

`interpret=True` runs either style's kernel body unchanged through Pallas's interpreter (how CPU tests run it).

Where kernels are used by `jq.ops` dispatch (`kernel_mode`): on GPU and TPU by default; on CPU only when forced
with `force_interpret()` or the environment variable `JQ_KERNELS=interpret` (or `interpret-tpu` for the TPU
style); `JQ_KERNELS=off` disables them everywhere. The mode is read when a function is traced: a function
already jitted keeps the choice it was traced with.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import warnings
from typing import Any, Iterator

import jax
import jax.numpy as jnp

__all__ = [
    "Mode",
    "Blocks",
    "kernel_mode",
    "forced",
    "platform",
    "round_up",
    "pad_to",
    "fit_blocks",
    "dequant_rows",
    "compiler_params",
]

STYLES = ("gpu", "tpu")
ENV_KERNELS = "JQ_KERNELS"


@dataclasses.dataclass(frozen=True)
class Mode:
    """How a kernel runs: `style` "gpu" (Triton-shaped) or "tpu" (Mosaic-shaped), compiled or interpreted."""

    style: str
    interpret: bool = False

    def __post_init__(self):
        if self.style not in STYLES:
            raise ValueError(f"kernel style {self.style!r}; choose one of {STYLES}")


@dataclasses.dataclass(frozen=True)
class Blocks:
    """Tile sizes (rows of x, columns of the weight, contraction per step) and Triton launch parameters."""

    bm: int
    bn: int
    bk: int
    num_warps: int = 4
    num_stages: int = 3


_FORCED: list[Mode] = []


def platform() -> str:
    """'gpu', 'tpu' or 'cpu' for the default JAX backend."""
    b = jax.default_backend()
    if b in ("gpu", "cuda", "rocm"):
        return "gpu"
    return "tpu" if b == "tpu" else "cpu"


def kernel_mode() -> tuple[Mode | None, str | None]:
    """The mode dispatch uses now, or (None, reason) when kernels must not be used here."""
    if _FORCED:
        return _FORCED[-1], None
    env = os.environ.get(ENV_KERNELS, "auto").strip().lower()
    if env in ("0", "off", "false", "no", "xla", "none"):
        return None, f"disabled by {ENV_KERNELS}={env}"
    if env.startswith("interpret"):
        return Mode("tpu" if env.endswith("tpu") else "gpu", interpret=True), None
    p = platform()
    if p in STYLES:
        return Mode(p), None
    return None, (
        f"on {p} the Pallas kernels only run interpreted (slow); force with {ENV_KERNELS}=interpret or "
        "jq.pallas_kernels.force_interpret()"
    )


def default_mode() -> Mode:
    """The mode for a direct kernel call: compiled on GPU/TPU, interpreted (GPU style) elsewhere."""
    if _FORCED:
        return _FORCED[-1]
    p = platform()
    return Mode(p) if p in STYLES else Mode("gpu", interpret=True)


@contextlib.contextmanager
def forced(m: Mode) -> Iterator[Mode]:
    """Within the block, `kernel_mode` and `default_mode` answer `m` (see `dispatch.force_interpret`)."""
    _FORCED.append(m)
    try:
        yield m
    finally:
        _FORCED.remove(m)


# -- sizes ------------------------------------------------------------------------------------------------------


def round_up(n: int, m: int) -> int:
    """`n` rounded up to a multiple of `m`."""
    return -(-n // m) * m


def is_pow2(n: int) -> bool:
    """Whether `n` is a positive power of two."""
    return n > 0 and n & (n - 1) == 0


def next_pow2(n: int) -> int:
    """The smallest power of two >= `n` (1 for n <= 1)."""
    return 1 << max(0, (n - 1).bit_length())


def pad_to(x: jax.Array, shape: tuple[int, ...], value: float = 0) -> jax.Array:
    """Pad `x` at the end of each axis up to `shape` (a no-op when it already has it)."""
    if tuple(x.shape) == tuple(shape):
        return x
    return jnp.pad(x, [(0, t - s) for s, t in zip(x.shape, shape)], constant_values=value)


@dataclasses.dataclass(frozen=True)
class Fit:
    """Blocks fitted to a problem and the padded sizes they need: Mp % bm == Np % bn == Kp % bk == 0."""

    blocks: Blocks
    Mp: int
    Np: int
    Kp: int

    @property
    def nk(self) -> int:
        """The number of K steps (Kp / bk)."""
        return self.Kp // self.blocks.bk


def _fit_dim(want: int, n: int, align: int, pow2: bool) -> tuple[int, int]:
    """A block size near `want` (a multiple of `align`; a power of two if `pow2`) for a dim of size `n`, and
    the padded size. Prefers a block that divides n (no padding); a TPU-style block may also span all of n."""
    want = max(align, want - want % align)
    if pow2:
        want = 1 << (want.bit_length() - 1)
        c = want
        while c >= align:
            if n % c == 0:
                return c, n
            c //= 2
        b = min(want, max(align, next_pow2(n)))
        return b, round_up(n, b)
    if n <= want:  # the whole dim in one block (allowed on TPU whatever its size)
        return n, n
    c = want
    while c >= align:
        if n % c == 0:
            return c, n
        c -= align
    return want, round_up(n, want)


# Triton keeps num_stages copies of the x and weight tiles in shared memory (plus ~25% for layout conversions,
# measured on sm_90 compiles); H100 allows 227 KiB per block, A100 163 KiB.
GPU_SMEM_BUDGET = 128 * 1024


def gpu_smem_estimate(b: Blocks, x_bytes: float, w_bytes: float) -> float:
    """Bytes of the pipelined x and weight tiles of one GPU-style program."""
    return b.num_stages * b.bk * (b.bm * x_bytes + b.bn * w_bytes)


def fit_blocks(
    b: Blocks, style: str, M: int, K: int, N: int, k_align: int, x_bytes: float = 2, w_bytes: float = 1
) -> Fit:
    """Adjust requested blocks to a problem of (M, K) x (K, N) under the style's tiling rules.

    k_align: what bk must be a multiple of (group size, packing, lane width), already a power of two for "gpu".
    x_bytes, w_bytes: bytes per element of the x tile and of the stored weight tile; on GPU the blocks shrink
    (fewer pipeline stages, then narrower bn, then bm) until the tiles fit `GPU_SMEM_BUDGET`.
    """
    if style == "gpu":
        bm = max(16, min(next_pow2(b.bm), next_pow2(M)))
        bn, Np = _fit_dim(b.bn, N, 16, True)
        bk, Kp = _fit_dim(max(b.bk, k_align), K, k_align, True)
        b = dataclasses.replace(b, bm=bm, bn=bn, bk=bk)
        while gpu_smem_estimate(b, x_bytes, w_bytes) > GPU_SMEM_BUDGET:
            if b.num_stages > 2:
                b = dataclasses.replace(b, num_stages=b.num_stages - 1)
            elif b.bn > 32:
                b = dataclasses.replace(b, bn=b.bn // 2)
            elif b.bm > 16:
                b = dataclasses.replace(b, bm=b.bm // 2)
            else:
                break
        return Fit(b, round_up(M, b.bm), round_up(N, b.bn), Kp)
    else:
        bm = max(32, min(round_up(b.bm, 32), round_up(M, 32)))
        bn, Np = _fit_dim(b.bn, N, 128, False)
        bk, Kp = _fit_dim(max(b.bk, k_align), K, k_align, False)
    return Fit(dataclasses.replace(b, bm=bm, bn=bn, bk=bk), round_up(M, bm), Np, Kp)


def tpu_k_align(lane_cols_per_k: int, group: int | None) -> int:
    """bk multiple for the TPU style: x's block (bm, bk * lane_cols_per_k) needs 128 lanes; groups must tile."""
    base = int(128 / lane_cols_per_k)
    return math.lcm(base, group or 1)


# -- tile maths (shared by both styles and by interpret mode) -------------------------------------------------


def dequant_rows(q: jax.Array, scale: jax.Array, zero: jax.Array | None, zero_min: bool = False) -> jax.Array:
    """(q − zero) · scale in f32 for a weight tile (q · scale + zero when `zero_min`: offsets in weight units).

    q: (R, bn) codes (any int or float dtype). scale, zero: (r, bn) with r dividing R — row block i of R / r
    consecutive rows uses scale row i (group scales inside a K step); r == 1 is one row for the whole tile.
    Returns f32 (R, bn), bit-identical to `QTensor.dequantize`'s f32 values.
    """
    f = q.astype(jnp.float32)
    s = scale.astype(jnp.float32)
    z = None if zero is None else zero.astype(jnp.float32)
    r, bn = s.shape
    R = f.shape[0]
    if r != 1:
        f = f.reshape(r, R // r, bn)
        s = s.reshape(r, 1, bn)
        z = None if z is None else z.reshape(r, 1, bn)
    if z is None:
        out = f * s
    elif zero_min:
        out = f * s + z
    else:
        out = (f - z) * s
    return out.reshape(R, bn)


# -- compiler parameters across jax releases --------------------------------------------------------------------


def compiler_params(style: str, blocks: Blocks) -> Any:
    """Backend compiler parameters: Triton's (num_warps, num_stages) or Mosaic's dimension semantics.

    The classes were renamed between releases (TritonCompilerParams → triton.CompilerParams in jax 0.7,
    TPUCompilerParams → tpu.CompilerParams); the Triton module may warn that it is deprecated (jax 0.11).
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        if style == "gpu":
            from jax.experimental.pallas import triton as plgpu

            cls = getattr(plgpu, "CompilerParams", None) or getattr(plgpu, "TritonCompilerParams")
            return cls(num_warps=blocks.num_warps, num_stages=blocks.num_stages)
        from jax.experimental.pallas import tpu as pltpu

        cls = getattr(pltpu, "CompilerParams", None) or getattr(pltpu, "TPUCompilerParams")
        return cls(dimension_semantics=("parallel", "parallel", "arbitrary"))
