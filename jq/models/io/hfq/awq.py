"""AWQ checkpoints (AutoAWQ GEMM, `quant_method: awq`, `version: gemm`) ↔ jq QTensors, exactly (docs/HF_QUANT.md).

One linear layer with K inputs and N outputs, 4 bits, groups of g input rows (G = K / g):

    qweight  int32 [K, N/8]   8 codes per word along N, nibble i (bits 4i .. 4i+3) holding column 8c + ORDER[i]
    qzeros   int32 [G, N/8]   zero points, packed the same way (stored as is, no − 1)
    scales   float16 [G, N]

with ORDER = [0, 2, 4, 6, 1, 3, 5, 7], and W[k, n] = (code[k, n] − zero[k // g, n]) · scales[k // g, n]. AWQ is
always asymmetric and has no g_idx (no act order).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from jq.models.io.hfq.common import (Unsigned, is_float, need, pack_words, to_qtensor as _qtensor, unpack_words,
                                     unsigned_view)
from jq.numbers.qtensor import QTensor

__all__ = ["ORDER", "VERSIONS", "TENSORS", "to_qtensor", "from_qtensor", "quantization_config", "read_config"]

ORDER = np.array([0, 2, 4, 6, 1, 3, 5, 7])  # nibble i of a word holds column 8c + ORDER[i]
VERSIONS = ("gemm",)
TENSORS = ("qweight", "qzeros", "scales")


def _unpack_cols(words: np.ndarray, n: int) -> np.ndarray:
    """int32 [R, N/8] in AWQ order → uint8 codes [R, N]."""
    nib = unpack_words(words, 4, n, axis=1)
    return nib.reshape(nib.shape[0], -1, 8)[:, :, np.argsort(ORDER)].reshape(nib.shape)


def _pack_cols(codes: np.ndarray) -> np.ndarray:
    """uint8 codes [R, N] → int32 [R, N/8] in AWQ order."""
    return pack_words(codes.reshape(codes.shape[0], -1, 8)[:, :, ORDER].reshape(codes.shape), 4, axis=1)


def to_qtensor(qweight: np.ndarray, qzeros: np.ndarray, scales: np.ndarray, *, group_size: int | None,
               bits: int = 4, name: str = "<linear>", dtype: str = "float32") -> QTensor:
    """One AWQ GEMM linear layer → an asymmetric jq QTensor of the kernel (K, N) (uint8 codes and zeros), exactly.

    qweight: int32 [K, N/8]; qzeros: int32 [G, N/8]; scales: float [G, N]; group_size -1 / None: one group per
    output channel. Errors name `name` (the layer's tensor prefix), the value found and the fix."""
    need(bits == 4, name, f"bits {bits}", "AWQ GEMM packs 4-bit codes only; fix bits in quantization_config")
    qweight, qzeros, scales = np.asarray(qweight), np.asarray(qzeros), np.asarray(scales)
    for t, a in (("qweight", qweight), ("qzeros", qzeros)):
        need(a.ndim == 2 and a.dtype.kind in "iu" and a.dtype.itemsize == 4, f"{name}.{t}",
             f"shape {a.shape} dtype {a.dtype}", "AWQ stores it as a 2-D int32 tensor")
    need(scales.ndim == 2 and is_float(scales), f"{name}.scales",
         f"shape {scales.shape} dtype {scales.dtype}", "AWQ stores float16 [K / group_size, N]")
    k, n = qweight.shape[0], qweight.shape[1] * 8
    g = None if group_size in (None, -1) else group_size
    need(g is None or k % g == 0, name, f"group_size {group_size} does not divide the {k} input features",
         "fix group_size in quantization_config")
    n_groups = 1 if g is None else k // g
    need(scales.shape == (n_groups, n), f"{name}.scales", f"shape {scales.shape}, expected {(n_groups, n)} for "
         f"qweight {qweight.shape} and group_size {group_size}", "fix group_size in quantization_config")
    need(qzeros.shape == (n_groups, n // 8), f"{name}.qzeros", f"shape {qzeros.shape}, expected "
         f"{(n_groups, n // 8)}", "fix group_size in quantization_config")
    v = Unsigned(_unpack_cols(qweight, n), _unpack_cols(qzeros, n), scales, None, 4, g, False)
    return _qtensor(v, name, dtype)


def from_qtensor(q: QTensor, *, name: str = "<linear>") -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """A 4-bit jq QTensor of a kernel (K, N) → ({"qweight", "qzeros", "scales"}, its scheme {bits, group_size}),
    the exact inverse of `to_qtensor`. A symmetric QTensor is written with zero points 8 (the same values; it reads
    back asymmetric). ValueError naming `name` for what AWQ cannot hold: act order (AWQ has no g_idx), N not a
    multiple of 8, non-float16 scales, and everything `common.unsigned_view` refuses."""
    v = unsigned_view(q, name, "AWQ", (4,))
    need(v.perm is None, name, "has an act-order permutation, and AWQ has no g_idx to store it",
         "quantize without act order, or export GPTQ / compressed-tensors")
    need(v.u.shape[1] % 8 == 0, name, f"{v.u.shape[1]} output features", "AWQ packs 8 output columns per int32")
    need(v.scale.dtype == np.float16, name, f"scales are {v.scale.dtype}", "AWQ kernels read float16 scales; "
         "quantize with scale_dtype: float16")
    tensors = {"qweight": _pack_cols(v.u), "qzeros": _pack_cols(v.zero), "scales": v.scale}
    return tensors, {"bits": 4, "group_size": v.group_size or -1}


def read_config(qc: Mapping[str, Any], where: str) -> dict[str, Any]:
    """The scheme of an AWQ `quantization_config` (transformers' bits / group_size or AutoAWQ's w_bit /
    q_group_size): {bits, group_size}; ValueError naming `where` for an unknown version, zero_point false or
    another bit width."""
    version = str(qc.get("version", "gemm")).lower()
    need(version in VERSIONS, where, f"unknown AWQ version {qc.get('version')!r}",
         f"jq reads the {VERSIONS} layout (GEMV / Marlin / ExLlama repacks: re-export as GEMM with AutoAWQ)")
    need(qc.get("zero_point", True), where, "quantization_config zero_point false",
         "AWQ GEMM checkpoints carry zero points; a checkpoint without them is not one jq reads")
    bits = qc.get("bits", qc.get("w_bit"))
    need(bits == 4, where, f"quantization_config bits {bits!r}", "AWQ GEMM packs 4-bit codes only")
    gs = qc.get("group_size", qc.get("q_group_size", 128))
    need(isinstance(gs, int) and (gs == -1 or gs > 0), where, f"quantization_config group_size {gs!r}",
         "use a positive group size")
    return {"bits": 4, "group_size": gs}


def quantization_config(schemes: Sequence[Mapping[str, Any]], **extra: Any) -> dict[str, Any]:
    """The `quantization_config` transformers / vLLM read for layers quantized by `schemes` (one group size)."""
    sizes = sorted({s["group_size"] for s in schemes})
    need(len(sizes) == 1, "AWQ export", f"layers use different group sizes {sizes}",
         "AWQ's quantization_config holds one scheme; quantize every linear alike")
    return {"quant_method": "awq", "bits": 4, "group_size": sizes[0], "zero_point": True, "version": "gemm", **extra}
