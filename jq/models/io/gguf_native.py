"""GGUF's legacy block types read as the QTensors they are — codes, scales and offsets re-laid, never re-quantized.

Every block holds 32 weights along a row (the input axis of a linear, the feature axis of an embedding) and an f16
scale d (llama.cpp's ggml-common.h; docs/GGUF.md):

| type | block bytes | weight | jq QTensor |
|---|---|---|---|
| Q4_0 | d, 16 nibble bytes | d·(q − 8) | int4 sym g32: code q − 8 |
| Q4_1 | d, m, 16 nibble bytes | d·q + m | int4 asym g32 with `zero_min`: offset m |
| Q5_0 | d, 4 bytes of 5th bits, 16 nibble bytes | d·(q − 16) | int5 sym g32: code q − 16 |
| Q5_1 | d, m, 4 bytes of 5th bits, 16 nibble bytes | d·q + m | int5 asym g32 with `zero_min` |
| Q8_0 | d, 32 int8 | d·q | int8 sym g32 |

Nibble byte j holds weight j (low nibble) and weight j + 16 (high nibble); bit j of the little-endian uint32 `qh`
is weight j's fifth bit. jq stores groups along the contraction axis and packs codes along it, so a linear's (out,
in) rows become a (in, out) kernel with (in / 32, out) scales: a transpose of whole codes, exact. The K-quants
Q4_K, Q5_K and Q6_K (`gguf_kquants`) arrive the same way with float32 sub-block scales; other types are dequantized
by the caller, which says so.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from gguf import GGMLQuantizationType as T

from jq.models.family import TensorMap
from jq.models.io.gguf_kquants import KQUANT_TYPES, kquant_codes
from jq.numbers import formats
from jq.numbers.qtensor import Layout, QTensor

__all__ = ["NATIVE_TYPES", "READ_TYPES", "native_qtensor", "row_permutation", "blocks_to_codes"]

BLOCK = 32

# type -> (bits, has an offset m, has fifth bits qh, block bytes)
NATIVE_TYPES: dict[T, tuple[int, bool, bool, int]] = {
    T.Q4_0: (4, False, False, 18),
    T.Q4_1: (4, True, False, 20),
    T.Q5_0: (5, False, True, 22),
    T.Q5_1: (5, True, True, 24),
    T.Q8_0: (8, False, False, 34),
}


def blocks_to_codes(raw: np.ndarray, kind: T) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """One GGUF tensor's bytes → (codes [R, C] int8 (symmetric) / uint8 (with offsets), d [R, C/32] f16,
    m [R, C/32] f16 or None). raw: uint8 [R, C/32 · block bytes], the rows as the file stores them."""
    bits, has_min, has_qh, size = NATIVE_TYPES[kind]
    R = raw.shape[0]
    b = np.ascontiguousarray(raw).reshape(R, -1, size)
    d = b[..., 0:2].copy().view(np.float16)[..., 0]
    m = b[..., 2:4].copy().view(np.float16)[..., 0] if has_min else None
    at = 4 if has_min else 2
    if bits == 8:
        q = b[..., at:].view(np.int8).astype(np.int16)
        return q.reshape(R, -1).astype(np.int8), d, None
    if has_qh:
        qh = b[..., at:at + 4].copy().view("<u4")  # [R, nb, 1]
        at += 4
    qs = b[..., at:at + 16]
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=-1).astype(np.int16)  # [R, nb, 32]: weights 0..15, then 16..31
    if has_qh:
        q |= (((qh >> np.arange(BLOCK, dtype=np.uint32)) & 1) << 4).astype(np.int16)
    q = q.reshape(R, -1)
    if has_min:
        return q.astype(np.uint8), d, m
    return (q - (1 << (bits - 1))).astype(np.int8), d, None


READ_TYPES = (*NATIVE_TYPES, *KQUANT_TYPES)  # every type read as a QTensor


def _decode(raw: np.ndarray, kind: T) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, int, int]:
    """(codes [R, C], scales [R, C/g], offsets or None, bits, g) of a legacy or K-quant tensor."""
    if kind in NATIVE_TYPES:
        return (*blocks_to_codes(raw, kind), NATIVE_TYPES[kind][0], BLOCK)
    bits, g, _ = KQUANT_TYPES[kind]
    return (*kquant_codes(raw, kind), bits, g)


def row_permutation(m: TensorMap, rows: int) -> np.ndarray | None:
    """The row order a family's `convert` produces (e.g. llama.cpp's q/k interleave undone), as indices into the
    stored rows; None when there is no convert, or when it is not a pure row permutation (then the caller
    dequantizes)."""
    if m.convert is None:
        return None
    try:
        moved = np.asarray(m.convert(np.arange(rows, dtype=np.float32)[:, None]))
    except Exception:  # noqa: BLE001  (a convert that needs the real width: not a row shuffle we can reuse)
        return None
    idx = moved.reshape(-1).astype(np.int64) if moved.shape == (rows, 1) else None
    if idx is None or not np.array_equal(np.sort(idx), np.arange(rows)) or not np.array_equal(moved[:, 0], idx):
        return None
    return idx


def native_qtensor(raw: np.ndarray, kind: T, shape: tuple[int, int], m: TensorMap,
                   dtype: str = "float32") -> QTensor | None:
    """A GGUF 2-D tensor of a legacy block type or a K-quant as the QTensor of the parameter `m` places it at, or
    None when jq cannot hold it exactly (another type, not 2-D, or a convert that is not a row permutation).

    raw: the tensor's uint8 bytes [R, …]; shape: (R, C) in NumPy order (a linear is (out, in)). The result has the
    parameter's logical shape: (C, R) contracted over axis 0 when `m.transpose` (a linear kernel), else (R, C)
    contracted over axis 1 (an embedding, used by gather and `attend`).
    """
    if kind not in READ_TYPES or len(shape) != 2 or shape[1] % (BLOCK if kind in NATIVE_TYPES else 256):
        return None
    rows = row_permutation(m, shape[0])
    if m.convert is not None and rows is None:
        return None
    codes, d, mins, bits, group = _decode(raw, kind)
    arrays = [codes, d] + ([mins] if mins is not None else [])
    if rows is not None:
        arrays = [a[rows] for a in arrays]
    if m.transpose:
        arrays = [np.ascontiguousarray(a.T) for a in arrays]
        lay_shape, axis = (shape[1], shape[0]), 0
    else:
        lay_shape, axis = tuple(shape), 1
    codes, d, *mins = arrays
    packed = np.asarray(formats.pack(codes, bits, axis=axis)) if bits < 8 else codes
    q = QTensor(codes=packed, scale=d, zero=mins[0] if mins else None, fmt=f"int{bits}",
                layout=Layout(lay_shape, (axis,), "group", group), symmetric=not mins, zero_min=bool(mins),
                dtype=dtype)
    q.check(f"GGUF {kind.name} tensor for {m.path}")
    return q


def reader_for(raw: Callable[[], np.ndarray], kind: T, shape: tuple[int, int]) -> Callable[[TensorMap], QTensor | None]:
    """`StoredTensor.native` for one GGUF tensor: map → its QTensor (None if it has no exact jq layout)."""
    return lambda m: native_qtensor(raw(), kind, shape, m)
