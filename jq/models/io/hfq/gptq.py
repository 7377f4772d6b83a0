"""GPTQ checkpoints (AutoGPTQ / GPTQModel, `quant_method: gptq`) ↔ jq QTensors, exactly (docs/HF_QUANT.md).

One linear layer with K inputs and N outputs, b bits, groups of g input rows (G = K / g, or 1 when group_size is
-1):

    qweight  int32 [K·b/32, N]    codes packed along K as a little-endian bit stream (b = 3 straddles words)
    qzeros   int32 [G, N·b/32]    zero points packed the same way along N; v1 ("gptq") stores zero − 1
    scales   float16 [G, N]
    g_idx    int32 [K]            group of each input row (act order: not sorted)

W[k, n] = (code[k, n] − zero[g_idx[k], n]) · scales[g_idx[k], n].
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from jq.models.io.hfq.common import (Unsigned, is_float, need, pack_words, perm_from_g_idx, to_qtensor as _qtensor,
                                     unpack_words, unsigned_view)
from jq.numbers.qtensor import QTensor

__all__ = ["BITS", "CHECKPOINT_FORMATS", "TENSORS", "to_qtensor", "from_qtensor", "quantization_config",
           "read_config"]

BITS = (2, 3, 4, 8)
CHECKPOINT_FORMATS = ("gptq", "gptq_v2")  # v1: qzeros hold zero − 1; v2: the zero itself
TENSORS = ("qweight", "qzeros", "scales", "g_idx")


def _groups(k: int, group_size: int | None, where: str) -> int | None:
    """The jq group size of a GPTQ group_size (-1 / None: one group per output channel)."""
    if group_size in (None, -1):
        return None
    need(isinstance(group_size, int) and group_size > 0 and k % group_size == 0, where,
         f"group_size {group_size} does not divide the {k} input features",
         "fix group_size in quantization_config (the scales' row count is K / group_size)")
    return group_size


def to_qtensor(qweight: np.ndarray, qzeros: np.ndarray, scales: np.ndarray, g_idx: np.ndarray | None = None, *,
               bits: int, group_size: int | None, sym: bool = True, desc_act: bool = False,
               checkpoint_format: str = "gptq", name: str = "<linear>", dtype: str = "float32") -> QTensor:
    """One GPTQ linear layer → a jq QTensor of the kernel (K, N), exactly.

    qweight: int32 [K·b/32, N]; qzeros: int32 [G, N·b/32]; scales: float [G, N]; g_idx: int [K] or None (no act
    order). A `sym` layer whose zeros are all 2^(b−1) becomes a symmetric QTensor (int8 codes, no zeros); otherwise
    uint8 codes with uint8 zeros. An act-order g_idx (every group exactly g rows) becomes `perm`. Errors name `name`
    (the layer's tensor prefix), the value found and the fix.
    """
    need(bits in BITS, name, f"bits {bits}", f"GPTQ packs {BITS} bits; fix bits in quantization_config")
    need(checkpoint_format in CHECKPOINT_FORMATS, name, f"checkpoint_format {checkpoint_format!r}",
         f"jq reads {CHECKPOINT_FORMATS}; a Marlin / BitBLAS repack must be converted back to gptq by its tool")
    qweight, qzeros, scales = np.asarray(qweight), np.asarray(qzeros), np.asarray(scales)
    for t, a in (("qweight", qweight), ("qzeros", qzeros)):
        need(a.ndim == 2 and a.dtype.kind in "iu" and a.dtype.itemsize == 4, f"{name}.{t}",
             f"shape {a.shape} dtype {a.dtype}", "GPTQ stores it as a 2-D int32 tensor")
    need(qweight.shape[0] * 32 % bits == 0, f"{name}.qweight", f"{qweight.shape[0]} rows of {bits}-bit codes",
         f"{bits}-bit GPTQ packs 32 codes into {bits} words; fix bits in quantization_config")
    need(scales.ndim == 2 and is_float(scales), f"{name}.scales", f"shape {scales.shape} dtype "
         f"{scales.dtype}", "GPTQ stores float16 [K / group_size, N]")
    k, n = qweight.shape[0] * 32 // bits, qweight.shape[1]
    g = _groups(k, group_size, name)
    n_groups = 1 if g is None else k // g
    need(scales.shape == (n_groups, n), f"{name}.scales", f"shape {scales.shape}, expected {(n_groups, n)} for "
         f"K = {k} (from qweight {qweight.shape} at {bits} bits), group_size {group_size}",
         "fix bits / group_size in quantization_config to match the tensors")
    need(n * bits % 32 == 0 and qzeros.shape == (n_groups, n * bits // 32), f"{name}.qzeros",
         f"shape {qzeros.shape}, expected {(n_groups, n * bits // 32)}",
         "fix bits / group_size in quantization_config to match the tensors")
    u = unpack_words(qweight, bits, k, axis=0)
    zero = unpack_words(qzeros, bits, n, axis=1).astype(np.int16)
    if checkpoint_format == "gptq":
        full = np.argwhere(zero == (1 << bits) - 1)
        need(full.size == 0, f"{name}.qzeros", f"holds {(1 << bits) - 1} (all ones) at group, column "
             f"{full[:1].tolist()}: in the v1 format that is zero point {1 << bits}, outside the {bits}-bit range "
             "(AutoGPTQ's packer wrote it for zero 0, corrupting its neighbours)",
             "the layer is damaged; re-export it from its source as checkpoint_format gptq_v2")
        zero = zero + 1
    perm = None
    if g_idx is not None:
        perm = perm_from_g_idx(np.asarray(g_idx), k, g, f"{name}.g_idx")
        need(perm is None or desc_act, f"{name}.g_idx", "is an act-order permutation but desc_act is false "
             "(kernels would ignore it)", "set desc_act: true in quantization_config")
    half = 1 << (bits - 1)
    v = Unsigned(u, zero.astype(np.uint8), scales, perm, bits, g, bool(sym) and bool(np.all(zero == half)))
    return _qtensor(v, name, dtype)


def from_qtensor(q: QTensor, *, checkpoint_format: str = "gptq",
                 name: str = "<linear>") -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """A jq QTensor of a kernel (K, N) → ({"qweight", "qzeros", "scales", "g_idx"}, its scheme {bits, group_size,
    sym, desc_act}), the exact inverse of `to_qtensor`; ValueError naming `name` for what GPTQ cannot hold (see
    `common.unsigned_view`, plus: K·b or N·b not a multiple of 32, non-float16 scales, and a zero point 0 in the v1
    format, which stores zero − 1)."""
    need(checkpoint_format in CHECKPOINT_FORMATS, name, f"checkpoint_format {checkpoint_format!r}",
         f"choose one of {CHECKPOINT_FORMATS}")
    v = unsigned_view(q, name, "GPTQ", BITS)
    (k, n), b = v.u.shape, v.bits
    need(k * b % 32 == 0 and n * b % 32 == 0, name, f"shape {(k, n)} at {b} bits",
         f"GPTQ packs whole int32 words along both axes: K·{b} and N·{b} must be multiples of 32")
    need(v.scale.dtype == np.float16, name, f"scales are {v.scale.dtype}", "GPTQ kernels read float16 scales; "
         "quantize with scale_dtype: float16")
    zero = v.zero.astype(np.int16)
    if checkpoint_format == "gptq":
        need(not np.any(zero == 0), name, "has zero point 0 in some group, which the v1 format (zero − 1) cannot "
             "store", "export as checkpoint_format gptq_v2, or quantize symmetrically")
        zero = zero - 1
    tensors = {"qweight": pack_words(v.u, b, axis=0), "qzeros": pack_words(zero.astype(np.uint8), b, axis=1),
               "scales": v.scale, "g_idx": v.g_idx}
    scheme = {"bits": b, "group_size": v.group_size or -1, "sym": v.symmetric, "desc_act": v.perm is not None}
    return tensors, scheme


def read_config(qc: Mapping[str, Any], where: str) -> dict[str, Any]:
    """The scheme of a GPTQ `quantization_config` (one for every quantized layer): {bits, group_size, sym,
    desc_act, checkpoint_format}; ValueError naming `where` for what jq cannot read."""
    fmt = qc.get("checkpoint_format") or qc.get("format") or "gptq"
    need(fmt in CHECKPOINT_FORMATS and not qc.get("is_marlin_format"), where,
         f"quantization_config checkpoint_format {fmt!r}", f"jq reads {CHECKPOINT_FORMATS} (Marlin / BitBLAS "
         "repacks: convert back to gptq with the tool that wrote them)")
    need(not qc.get("dynamic"), where, f"quantization_config has per-module overrides (dynamic: {qc.get('dynamic')})",
         "jq reads one GPTQ scheme per checkpoint; export the model in compressed-tensors for mixed schemes")
    bits = qc.get("bits")
    need(bits in BITS, where, f"quantization_config bits {bits!r}", f"GPTQ packs {BITS} bits")
    gs = qc.get("group_size", -1)
    need(isinstance(gs, int) and (gs == -1 or gs > 0), where, f"quantization_config group_size {gs!r}",
         "use a positive group size, or -1 for one scale per output channel")
    return {"bits": bits, "group_size": gs, "sym": bool(qc.get("sym", True)), "desc_act": bool(qc.get("desc_act")),
            "checkpoint_format": fmt}


def quantization_config(schemes: Sequence[Mapping[str, Any]], checkpoint_format: str = "gptq",
                        **extra: Any) -> dict[str, Any]:
    """The `quantization_config` transformers / vLLM read for layers quantized by `schemes` (from `from_qtensor`):
    one bits / group_size for all (ValueError otherwise), sym only when every layer is symmetric, desc_act when
    any layer has act order; `extra` keys (e.g. lm_head, modules_in_block_to_quantize) are added."""
    need(bool(schemes), "GPTQ export", "no quantized linear layer", "quantize the model first")
    kinds = sorted({(s["bits"], s["group_size"]) for s in schemes})
    need(len(kinds) == 1, "GPTQ export", f"layers use different bits / group_size {kinds}",
         "GPTQ's quantization_config holds one scheme; quantize every linear alike, or export compressed-tensors")
    bits, gs = kinds[0]
    return {"quant_method": "gptq", "bits": bits, "group_size": gs, "desc_act": any(s["desc_act"] for s in schemes),
            "sym": all(s["sym"] for s in schemes), "checkpoint_format": checkpoint_format, **extra}
