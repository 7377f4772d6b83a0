"""LUT: learned-codebook weights (format kind "lut": `cb{b}`, `cb{b}x{d}`), float activations, f32 accumulation; the
table lookup and the scale are fused into the matmul tile.

Weight (jq's stored layout, `jq.numbers.codebook`): for W [K, N], indices idx [K/d, N] (one b-bit index per vector
of d consecutive rows), scales [G, N] (groups of g rows) or [1, N], tables [Gt, Nt, E, d] (E = 2^b) with Gt, Nt
equal to or dividing the scale dims: W[i·d + j, n] = table[t(i, n)][idx[i, n], j] · scale[(i·d + j) // g, n].
Tables per scale position ([G, N]) and tables shared by all columns ([G, 1], GPTVQ; [1, 1]) are read as they are;
other divisors are repeated up to G or N in XLA.

x is split into d planes x_j = x[:, j::d] (as W4A16 splits even / odd columns), so x @ W = Σ_j x_j @ W_j with
W_j[i, n] = W[i·d + j, n]: an index row gives one row of every plane, nothing is interleaved in the kernel.

Tile (one K step of bk rows, h = bk/d index rows): planes (bm, h); indices (h, bn); scales (bk/g, bn) or (1, bn).
The lookup gives (h, bn) f32 entries per plane, times the scales (`dequant_rows`), cast to x's dtype, d dots
accumulate in f32 — the dequantized tile is `QTensor.dequantize(x.dtype)` exactly. The lookup differs by style:

- "gpu": a gather load (one per weight) from the float16 tables in global memory (small: L1/L2-resident); the
  table block spans all K steps and the column block (or the one shared column).
- "tpu": Mosaic has no general gather: a select over the E entries, E compares and E·d selects per index, O(2^b)
  VPU work per weight (fine for b <= 4, slow for cb8). Tables come as f32 blocks (bk/g or 1, d·E, bn or 1).

Bandwidth cost: the wrapper unpacks the bit-packed indices to one byte each in XLA before the call (an extra pass
over the weight, and the kernel reads 8 bits per index instead of b). Act-order (`perm`): x's columns are permuted
in XLA; padded groups: x is zero-padded to the stored length.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.typing import DTypeLike

from jq.numbers import formats
from jq.numbers.codebook import stored_codebook_qtensor
from jq.numbers.qtensor import Layout, QTensor
from jq.pallas_kernels import autotune
from jq.pallas_kernels.common import (Blocks, Fit, Mode, compiler_params, default_mode, dequant_rows, fit_blocks,
                                      is_pow2, pad_to, tpu_k_align)

__all__ = ["lut_matmul", "select_blocks", "fit", "k_align", "unsupported"]

_SQUEEZED = getattr(pl, "squeezed", None)


def k_align(style: str, group_size: int | None, vec: int) -> int:
    """bk multiple: whole groups, and each plane's K step (bk/vec) a legal dot (GPU) / 128 lanes (TPU)."""
    if style == "gpu":
        return max(16 * vec, group_size or 1)
    return tpu_k_align(1 / vec, group_size)


def unsupported(style: str, group_size: int | None, vec: int) -> str | None:
    """Why this kernel cannot take groups of `group_size` rows with vectors of `vec` in this style, or None."""
    g = group_size
    if g is None:
        return None
    if g % vec:
        return f"vectors of {vec} do not tile groups of {g}"
    if style == "gpu" and not is_pow2(g):
        return f"group size {g} is not a power of two (Triton tiles)"
    if style == "tpu" and g % (8 * vec):
        return f"group size {g} is not a multiple of {8 * vec} (Mosaic sublane tiles of {vec}-vectors)"
    return None


def _gather(t_ref, q: jax.Array, t0, *, d: int, E: int, rows_per_table: int | None, shared_n: bool) -> list:
    """GPU lookup. t_ref: (Gt·d·E, bn or 1) f16 tables, row (t·d + j)·E + e; q: (h, bn) int32 indices of tables
    t0 + row // rows_per_table (one table for all rows if None). → d arrays (h, bn) f32."""
    rows = lax.broadcasted_iota(jnp.int32, q.shape, 0)
    t = t0 + rows // rows_per_table if rows_per_table else t0
    col = jnp.zeros_like(q) if shared_n else lax.broadcasted_iota(jnp.int32, q.shape, 1)
    return [t_ref[(t * d + j) * E + q, col].astype(jnp.float32) for j in range(d)]


def _select(t_ref, q: jax.Array, *, d: int, E: int) -> list:
    """TPU lookup. t_ref: (rt, d·E, bn or 1) f32 tables of this step (rt = 1, or one per row block of q), entry e
    of plane j at [:, j·E + e]; q: (h, bn) int32. → d arrays (h, bn) f32 by compares and selects over the entries
    (each entry a static (rt, 1, ·) load, broadcast)."""
    rt = t_ref.shape[0]
    h, bn = q.shape
    q3 = q.reshape(rt, h // rt, bn)
    vals = [jnp.broadcast_to(t_ref[:, j * E:j * E + 1, :], q3.shape) for j in range(d)]  # entry 0
    for e in range(1, E):
        hit = q3 == e
        for j in range(d):
            vals[j] = jnp.where(hit, t_ref[:, j * E + e:j * E + e + 1, :], vals[j])
    return [v.reshape(h, bn) for v in vals]


def _tile(xs: list, q: jax.Array, scale: jax.Array, lookup) -> jax.Array:
    """One K step: planes xs (bm, h) each, q (h, bn) int8 codes, scale (r, bn). → (bm, bn) f32."""
    dots = [jnp.dot(x, dequant_rows(v, scale, None).astype(x.dtype), preferred_element_type=jnp.float32)
            for x, v in zip(xs, lookup(q.astype(jnp.int32) & 255))]
    return functools.reduce(jnp.add, dots)


def _tables(q: QTensor, N: int) -> tuple[jax.Array, bool, bool]:
    """The codebook as (Gt, d·E, Nt) [t, j·E + e, n] with Gt in {1, G} and Nt in {1, N}; whether tables vary along K
    (per group) and are shared by all columns."""
    cb = q.codebook
    G, E, d = q.layout.scale_shape[0], cb.shape[-2], cb.shape[-1]
    gt, nt = cb.shape[0], cb.shape[1]
    if gt not in (1, G):
        cb, gt = jnp.repeat(cb, G // gt, axis=0), G
    if nt not in (1, N):
        cb, nt = jnp.repeat(cb, N // nt, axis=1), N
    return jnp.transpose(cb, (0, 3, 2, 1)).reshape(gt, d * E, nt), gt > 1, nt == 1 and N > 1


def lut_matmul(x: jax.Array, q: QTensor, *, out_dtype: DTypeLike | None = None, blocks: Blocks | None = None,
               mode: Mode | None = None) -> jax.Array:
    """x @ q.dequantize() for x (M, K) float and q a 2-D codebook QTensor [K, N] contracting axis 0 (per-axis groups,
    channel or tensor scales; `perm` and padded groups allowed). Returns (M, N) in out_dtype (default x.dtype)."""
    mode = mode or default_mode()
    lay, f = q.layout, q.format
    d, E = f.vec, 2**f.bits
    M, K = x.shape
    Kq, N = lay.stored_shape
    g = lay.group_size if lay.granularity == "group" else None
    if f.kind != "lut" or len(lay.shape) != 2 or lay.axes != (0,) or lay.flat or K != lay.shape[0]:
        raise ValueError(f"lut_matmul takes x (M, K) and a 2-D codebook QTensor over axis 0; got x {x.shape}, {q!r}")
    if why := unsupported(mode.style, g, d):
        raise ValueError(f"lut_matmul ({mode.style} style): {why}")
    table, per_k, shared_n = _tables(q, N)
    blocks = blocks or select_blocks(M, Kq, N, fmt=q.fmt, group_size=g, shared=shared_n, dtype=x.dtype, mode=mode)
    plan = fit(blocks, mode.style, M, Kq, N, g, d, x.dtype)
    Mp, Kp, Np = plan.Mp, plan.Kp, plan.Np
    if q.perm is not None:
        x = jnp.take(x, q.perm, axis=1)
    xp = pad_to(x, (Mp, Kp)).reshape(Mp, Kp // d, d)
    planes = [xp[:, :, j] for j in range(d)]
    idx = q.unpacked_codes() if f.packs else q.codes
    idx = pad_to(lax.bitcast_convert_type(idx.astype(jnp.uint8), jnp.int8), (Kp // d, Np))
    tpu = mode.style == "tpu"
    rows = Kp // g if g else 1
    scale = jnp.broadcast_to(q.scale.astype(jnp.float32 if tpu else q.scale.dtype), (q.scale.shape[0], N))
    scale = pad_to(scale, (rows, Np), 1)
    table = pad_to(table.astype(jnp.float32 if tpu else jnp.float16),
                   (rows if per_k else 1, d * E, 1 if shared_n else Np))
    call = _tpu_call if tpu else _gpu_call
    out = call(planes, idx, scale, table, plan=plan, d=d, E=E, g=g, per_k=per_k, shared_n=shared_n,
               out_dtype=jnp.dtype(out_dtype or x.dtype), mode=mode, name=_name(q.fmt, g, shared_n))
    return out[:M, :N]


def _gpu_call(planes, idx, scale, table, *, plan: Fit, d, E, g, per_k, shared_n, out_dtype, mode: Mode, name):
    """Grid (Mp/bm, Np/bn); each program walks K with `fori_loop`, gathering from the whole table column block."""
    b, nk = plan.blocks, plan.nk
    bm, bn, h, r = b.bm, b.bn, b.bk // d, b.bk // g if g else 1
    table = table.reshape(-1, table.shape[-1])
    in_specs = [pl.BlockSpec((bm, p.shape[1]), lambda i, j: (i, 0)) for p in planes] + [
        pl.BlockSpec((idx.shape[0], bn), lambda i, j: (0, j)), pl.BlockSpec((scale.shape[0], bn), lambda i, j: (0, j)),
        pl.BlockSpec((table.shape[0], 1), lambda i, j: (0, 0)) if shared_n else
        pl.BlockSpec((table.shape[0], bn), lambda i, j: (0, j))]

    def kernel(*refs):
        x_refs, (i_ref, s_ref, t_ref, o_ref) = refs[:d], refs[d:]

        def step(k, acc):
            ks = pl.multiple_of(k * h, h)
            xs = [x_ref[:, pl.ds(ks, h)] for x_ref in x_refs]
            s = s_ref[pl.ds(pl.multiple_of(k * r, r), r), :] if g else s_ref[...]
            look = functools.partial(_gather, t_ref, t0=k * r if per_k else 0, d=d, E=E,
                                     rows_per_table=g // d if per_k else None, shared_n=shared_n)
            return acc + _tile(xs, i_ref[pl.ds(ks, h), :], s, look)

        o_ref[...] = lax.fori_loop(0, nk, step, jnp.zeros((bm, bn), jnp.float32)).astype(o_ref.dtype)

    return pl.pallas_call(
        kernel, out_shape=jax.ShapeDtypeStruct((plan.Mp, plan.Np), out_dtype), grid=(plan.Mp // bm, plan.Np // bn),
        in_specs=in_specs, out_specs=pl.BlockSpec((bm, bn), lambda i, j: (i, j)),
        compiler_params=compiler_params("gpu", b), interpret=mode.interpret, name=name,
    )(*planes, idx, scale, table)


def _tpu_call(planes, idx, scale, table, *, plan: Fit, d, E, g, per_k, shared_n, out_dtype, mode: Mode, name):
    """Grid (Mp/bm, Np/bn, nk), K innermost; scales and (per-group) tables blocked per K step; VMEM accumulator."""
    from jax.experimental.pallas import tpu as pltpu

    b, nk = plan.blocks, plan.nk
    bm, bn, h, r = b.bm, b.bn, b.bk // d, b.bk // g if g else 1
    tn, dE = 1 if shared_n else bn, d * E
    tcol = (lambda j: 0) if shared_n else (lambda j: j)
    if g:
        scale = scale.reshape(nk, r, scale.shape[-1])
        s_spec = pl.BlockSpec((_SQUEEZED, r, bn), lambda i, j, k: (k, 0, j))
    else:
        s_spec = pl.BlockSpec((1, bn), lambda i, j, k: (0, j))
    if per_k:
        table = table.reshape(nk, r, dE, table.shape[-1])
        t_spec = pl.BlockSpec((_SQUEEZED, r, dE, tn), lambda i, j, k: (k, 0, 0, tcol(j)))
    else:
        t_spec = pl.BlockSpec((1, dE, tn), lambda i, j, k: (0, 0, tcol(j)))
    in_specs = [pl.BlockSpec((bm, h), lambda i, j, k: (i, k)) for _ in planes] + [
        pl.BlockSpec((h, bn), lambda i, j, k: (k, j)), s_spec, t_spec]

    def kernel(*refs):
        x_refs, (i_ref, s_ref, t_ref, o_ref, acc_ref) = refs[:d], refs[d:]
        k = pl.program_id(2)

        @pl.when(k == 0)
        def _init():
            acc_ref[...] = jnp.zeros(acc_ref.shape, acc_ref.dtype)

        look = functools.partial(_select, t_ref, d=d, E=E)
        acc_ref[...] += _tile([x_ref[...] for x_ref in x_refs], i_ref[...], s_ref[...], look)

        @pl.when(k == nk - 1)
        def _done():
            o_ref[...] = acc_ref[...].astype(o_ref.dtype)

    return pl.pallas_call(
        kernel, out_shape=jax.ShapeDtypeStruct((plan.Mp, plan.Np), out_dtype),
        grid=(plan.Mp // bm, plan.Np // bn, nk), in_specs=in_specs,
        out_specs=pl.BlockSpec((bm, bn), lambda i, j, k: (i, j)),
        scratch_shapes=[pltpu.VMEM((bm, bn), jnp.float32)], compiler_params=compiler_params("tpu", b),
        interpret=mode.interpret, name=name,
    )(*planes, idx, scale, table)


def _name(fmt: str, group_size: int | None, shared: bool) -> str:
    return f"lut_{fmt}_{f'g{group_size}' if group_size else 'ch'}{'_shared' if shared else ''}"


def fit(blocks: Blocks, style: str, M: int, K: int, N: int, group_size: int | None, vec: int,
        dtype: DTypeLike) -> Fit:
    """Blocks adapted to this kernel and problem: whole groups per K step, one index byte per `vec` weights."""
    return fit_blocks(blocks, style, M, K, N, k_align(style, group_size, vec), jnp.dtype(dtype).itemsize, 1 / vec)


def select_blocks(M: int, K: int, N: int, *, fmt: str, group_size: int | None, shared: bool, dtype: DTypeLike,
                  mode: Mode) -> Blocks:
    """Blocks for x (M, K) @ W (K, N) (K: stored rows): the defaults, the tuning cache, or tuning now."""
    vec = formats.get_format(fmt).vec
    return autotune.choose(
        _name(fmt, group_size, shared), mode, M, K, N, dtype,
        functools.partial(fit, style=mode.style, M=M, K=K, N=N, group_size=group_size, vec=vec, dtype=dtype),
        functools.partial(_runner, K=K, N=N, fmt=fmt, group_size=group_size, shared=shared, dtype=dtype, mode=mode),
    )


def _runner(*, K: int, N: int, fmt: str, group_size, shared: bool, dtype, mode: Mode, M: int):
    """For the autotuner: a synthetic codebook QTensor and x of the real shapes; blocks → thunk."""
    f, key = formats.get_format(fmt), jax.random.key(0)
    lay = Layout((K, N), (0,), "group" if group_size else "channel", group_size)
    G = lay.scale_shape[0]
    idx = jax.random.randint(key, (K // f.vec, N), 0, 2**f.bits, jnp.int32)
    cb = jax.random.uniform(key, (G, 1 if shared else N, 2**f.bits, f.vec), jnp.float32, -1, 1)
    q = stored_codebook_qtensor(idx, cb, jnp.full((G, N), 0.01), lay, fmt, dtype)
    x = jax.random.normal(key, (M, K), dtype)

    def run(blocks: Blocks):
        fn = jax.jit(functools.partial(lut_matmul, blocks=blocks, mode=mode))
        return lambda: fn(x, q)

    return run
