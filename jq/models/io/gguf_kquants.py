"""GGUF's K-quants decoded to integer codes with one float32 scale (and offset) per sub-block, exactly.

A K-quant super-block holds 256 weights of a row and one f16 scale d (and dmin); its sub-blocks' own scales (and
mins) are small integers against them (llama.cpp's `block_q4_K` / `block_q5_K` / `block_q6_K`):

| type | bytes | sub-blocks | weight |
|---|---|---|---|
| Q4_K | 144: d, dmin f16; 12 B of 6-bit (sc, m) × 8; 128 B nibbles | 8 × 32 | d·sc · q − dmin·m, q ∈ 0..15 |
| Q5_K | 176: as Q4_K + 32 B of fifth bits | 8 × 32 | d·sc · q − dmin·m, q ∈ 0..31 |
| Q6_K | 210: 128 B low nibbles, 64 B high 2-bit pairs, 16 × int8 sc, d f16 | 16 × 16 | d·sc · (q − 32), q ∈ 0..63 |

d·sc (an f16 times a 6- or 8-bit integer) and dmin·m are exact in float32, so jq holds a K-quant tensor as an
int4 / int5 (offsets as `zero_min`) or int6 QTensor with float32 sub-block scales: the same values llama.cpp
computes, bit for bit, at more stored bits than the file (the nested integer scales are expanded: 6.0 / 7.0 / 8.0
bits per weight against the file's 4.5 / 5.5 / 6.56) but without dequantizing to float.
"""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType as T

__all__ = ["KQUANT_TYPES", "kquant_codes"]

QK = 256
# type -> (bits, sub-block length, block bytes)
KQUANT_TYPES: dict[T, tuple[int, int, int]] = {T.Q4_K: (4, 32, 144), T.Q5_K: (5, 32, 176), T.Q6_K: (6, 16, 210)}


def _scale_min(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The 12 bytes of 6-bit (scale, min) pairs of Q4_K / Q5_K → (sc, m) uint8 [..., 8]: bytes 0-3 hold scales 0-3
    (low 6 bits) and the top 2 bits of scales 4-7, bytes 4-7 the same for the mins, bytes 8-11 the low 4 bits of
    scales 4-7 (low nibble) and mins 4-7 (high nibble)."""
    a, b, c = packed[..., 0:4], packed[..., 4:8], packed[..., 8:12]
    sc = np.concatenate([a & 0x3F, (c & 0x0F) | ((a >> 2) & 0x30)], axis=-1)
    m = np.concatenate([b & 0x3F, (c >> 4) | ((b >> 2) & 0x30)], axis=-1)
    return sc, m


def kquant_codes(raw: np.ndarray, kind: T) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """One K-quant tensor's bytes uint8 [R, C/256 · block bytes] → (codes [R, C] (uint8 0..2^b−1 with offsets,
    int8 −32..31 for Q6_K), scales float32 [R, C/g], offsets float32 [R, C/g] or None), g the sub-block length."""
    bits, g, size = KQUANT_TYPES[kind]
    R = raw.shape[0]
    b = np.ascontiguousarray(raw).reshape(R, -1, size)
    if kind == T.Q6_K:
        ql, qh, sc = b[..., :128], b[..., 128:192], b[..., 192:208].view(np.int8)
        d = b[..., 208:210].copy().view(np.float16).astype(np.float32)  # [R, nb, 1]
        lo = (ql.reshape(R, -1, 2, 1, 64) >> np.array([0, 4], np.uint8)[:, None]) & 0x0F  # [R, nb, 2, 2, 64]
        hi = (qh.reshape(R, -1, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8)[:, None]) & 0x03  # [R, nb, 2, 4, 32]
        q = (lo.reshape(R, -1, 8, 32) | (hi.reshape(R, -1, 8, 32) << 4)).astype(np.int16) - 32
        return q.reshape(R, -1).astype(np.int8), (d * sc.astype(np.float32)).reshape(R, -1), None
    d = b[..., 0:2].copy().view(np.float16).astype(np.float32)
    dmin = b[..., 2:4].copy().view(np.float16).astype(np.float32)
    sc, m = _scale_min(b[..., 4:16])
    qs = b[..., -128:]
    q = ((qs.reshape(R, -1, 4, 1, 32) >> np.array([0, 4], np.uint8)[:, None]) & 0x0F).reshape(R, -1, 8, 32)
    if kind == T.Q5_K:
        qh = b[..., 16:48]
        q = q | (((qh.reshape(R, -1, 1, 32) >> np.arange(8, dtype=np.uint8)[:, None]) & 1) << 4)
    scale = (d * sc.astype(np.float32)).reshape(R, -1)
    offset = -(dmin * m.astype(np.float32)).reshape(R, -1)
    return q.reshape(R, -1).astype(np.uint8), scale, offset
