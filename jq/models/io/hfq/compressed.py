"""compressed-tensors checkpoints (llm-compressor, `quant_method: compressed-tensors`, format `pack-quantized`) ↔
jq QTensors, exactly (docs/HF_QUANT.md).

One linear layer, PyTorch weight (N, K), b ∈ {4, 8} bits, pack factor p = 32 / b, groups of g input columns
(G = K / g) or one scale per output row (strategy "channel", G = 1):

    weight_packed      int32 [N, ceil(K/p)]    q + 2^(b−1) packed along K, value j of a word at bits j·b
    weight_scale       float [N, G]            any float dtype (usually the model's)
    weight_zero_point  int32 [ceil(N/p), G]    asymmetric only: zp + 2^(b−1) packed along N (older: int8 [N, G])
    weight_g_idx       int32 [K]               actorder "group" only: the group of each input column
    weight_shape       int [2]                 (N, K)

with q and zp signed (−2^(b−1) .. 2^(b−1) − 1) and W[n, k] = (q[n, k] − zp[n, g_idx[k]]) · weight_scale[n, g_idx[k]].
The stored unsigned value q + 2^(b−1) is exactly jq's unsigned code, and zp + 2^(b−1) its zero point.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from jq.models.io.hfq.common import (Unsigned, is_float, need, pack_words, perm_from_g_idx, to_qtensor as _qtensor,
                                     unpack_words, unsigned_view)
from jq.numbers.qtensor import QTensor

__all__ = ["BITS", "TENSORS", "to_qtensor", "from_qtensor", "quantization_config", "read_config", "Targets"]

BITS = (4, 8)
TENSORS = ("weight_packed", "weight_scale", "weight_zero_point", "weight_g_idx", "weight_shape")
FORMAT = "pack-quantized"


def to_qtensor(weight_packed: np.ndarray, weight_scale: np.ndarray, weight_shape: np.ndarray,
               weight_zero_point: np.ndarray | None = None, weight_g_idx: np.ndarray | None = None, *,
               num_bits: int, group_size: int | None, symmetric: bool, name: str = "<linear>",
               dtype: str = "float32") -> QTensor:
    """One pack-quantized linear layer → a jq QTensor of the kernel (K, N), exactly: symmetric → int8 codes q,
    asymmetric → uint8 codes q + 2^(b−1) with uint8 zeros zp + 2^(b−1); `group_size` None: strategy "channel";
    a group-consistent weight_g_idx becomes `perm`. Errors name `name` (the layer's prefix), the value and the fix."""
    need(num_bits in BITS, name, f"num_bits {num_bits}", f"jq reads pack-quantized int weights of {BITS} bits")
    packed, scale, shape = np.asarray(weight_packed), np.asarray(weight_scale), np.asarray(weight_shape)
    need(shape.shape == (2,) and shape.dtype.kind in "iu", f"{name}.weight_shape", f"{shape!r}",
         "it holds the layer's (out, in) shape")
    n, k = (int(d) for d in shape)
    p = 32 // num_bits
    need(packed.dtype == np.int32 and packed.shape == (n, -(-k // p)), f"{name}.weight_packed",
         f"shape {packed.shape} dtype {packed.dtype}, expected int32 {(n, -(-k // p))} for weight_shape {(n, k)} at "
         f"{num_bits} bits", "fix num_bits in quantization_config to match the tensors")
    need(group_size is None or (group_size > 0 and k % group_size == 0), name,
         f"group_size {group_size} does not divide the {k} input features", "fix group_size in quantization_config")
    n_groups = 1 if group_size is None else k // group_size
    need(scale.shape == (n, n_groups) and is_float(scale), f"{name}.weight_scale",
         f"shape {scale.shape} dtype {scale.dtype}, expected float {(n, n_groups)}",
         "fix strategy / group_size in quantization_config to match the tensors")
    half = 1 << (num_bits - 1)
    zero = np.full((n, n_groups), half, np.uint8)
    if weight_zero_point is not None:
        zp = np.asarray(weight_zero_point)
        if zp.dtype == np.int32 and zp.shape == (-(-n // p), n_groups):
            zero = unpack_words(zp, num_bits, n, axis=0)
        else:
            need(zp.shape == (n, n_groups) and zp.dtype.kind == "i", f"{name}.weight_zero_point",
                 f"shape {zp.shape} dtype {zp.dtype}", f"expected int32 {(-(-n // p), n_groups)} (packed) or int8 "
                 f"{(n, n_groups)}; fix strategy / group_size in quantization_config")
            zero = (zp.astype(np.int16) + half).astype(np.uint8)
        need(not symmetric or bool(np.all(zero == half)), f"{name}.weight_zero_point", "has non-zero zero points "
             "in a symmetric scheme", "set symmetric: false in the layer's config group")
    else:
        need(symmetric, f"{name}.weight_zero_point", "is missing for an asymmetric scheme",
             "the checkpoint is incomplete, or its config group should say symmetric: true")
    perm = None
    if weight_g_idx is not None:
        perm = perm_from_g_idx(np.asarray(weight_g_idx), k, group_size, f"{name}.weight_g_idx")
    u = np.ascontiguousarray(unpack_words(packed, num_bits, k, axis=1).T)
    v = Unsigned(u, np.ascontiguousarray(zero.T), np.ascontiguousarray(scale.T), perm, num_bits, group_size,
                 symmetric)
    return _qtensor(v, name, dtype)


def from_qtensor(q: QTensor, *, name: str = "<linear>") -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """A jq QTensor of a kernel (K, N) → (the layer's pack-quantized tensors, its weights scheme {num_bits,
    group_size, strategy, symmetric, actorder}), the exact inverse of `to_qtensor`; ValueError naming `name` for
    what the format cannot hold (`common.unsigned_view`, and bit widths other than 4 / 8)."""
    v = unsigned_view(q, name, "compressed-tensors pack-quantized", BITS)
    (k, n), b = v.u.shape, v.bits
    tensors = {"weight_packed": pack_words(v.u.T, b, axis=1), "weight_scale": np.ascontiguousarray(v.scale.T),
               "weight_shape": np.array([n, k], np.int64)}
    if not v.symmetric:
        tensors["weight_zero_point"] = pack_words(v.zero.T, b, axis=0)
    if v.perm is not None:
        tensors["weight_g_idx"] = v.g_idx
    scheme = {"num_bits": b, "type": "int", "symmetric": v.symmetric, "group_size": v.group_size,
              "strategy": "channel" if v.group_size is None else "group",
              "actorder": None if v.perm is None else "group"}
    return tensors, scheme


class Targets:
    """Which config group quantizes a module, from a `quantization_config`'s `config_groups` and `ignore`:
    targets are module names, `re:`-prefixed regular expressions (re.match on the name) or the class name
    "Linear"; an exact name wins over a regex, a regex over a class."""

    def __init__(self, groups: Sequence[tuple[Sequence[str], dict[str, Any]]], ignore: Sequence[str]):
        self.groups, self.ignore = list(groups), list(ignore)

    @staticmethod
    def _rank(target: str, module: str) -> int:
        if target == module:
            return 3
        if target.startswith("re:") and re.match(target[3:], module):
            return 2
        return 1 if target == "Linear" else 0

    def scheme_for(self, module: str) -> dict[str, Any] | None:
        """The weights scheme of linear `module` (e.g. "model.layers.0.mlp.up_proj"), None when it is ignored or
        no group targets it."""
        if any(self._rank(t, module) > 1 for t in self.ignore):
            return None
        best = max(((max((self._rank(t, module) for t in targets), default=0), s) for targets, s in self.groups),
                   key=lambda r: r[0], default=(0, None))
        return best[1] if best[0] else None


def read_config(qc: Mapping[str, Any], where: str) -> Targets:
    """The config groups of a compressed-tensors `quantization_config`; ValueError naming `where` and the group for
    what jq cannot read: other formats, activation or KV-cache quantization, transforms, sparsity, float or
    dynamic weights, strategies other than group / channel, and bit widths other than 4 / 8."""
    status = qc.get("quantization_status", "compressed")
    need(status == "compressed", where, f"quantization_status {status!r}", "jq reads compressed checkpoints "
         "(save the model with llm-compressor's save_compressed=True)")
    for key in ("transform_config", "kv_cache_scheme"):
        need(not qc.get(key), where, f"quantization_config has {key}", f"jq does not read {key}; export without it")
    sparsity = qc.get("sparsity_config") or {}
    need(sparsity.get("format", "dense") == "dense", where, f"sparsity format {sparsity.get('format')!r}",
         "jq reads dense (non-sparse) pack-quantized checkpoints")
    groups = []
    for gname, grp in (qc.get("config_groups") or {}).items():
        at = f"{where} config group {gname!r}"
        fmt = grp.get("format") or qc.get("format")
        need(fmt == FORMAT, at, f"format {fmt!r}", f"jq reads {FORMAT!r} compressed-tensors checkpoints")
        need(not grp.get("input_activations") and not grp.get("output_activations"), at,
             "quantizes activations", "jq imports weight-only schemes (W4A16 / W8A16)")
        w = grp.get("weights") or {}
        need(w.get("type", "int") == "int" and w.get("num_bits") in BITS and not w.get("dynamic"), at,
             f"weights {w}", f"jq reads static int weights of {BITS} bits")
        strategy = w.get("strategy")
        need(strategy in ("group", "channel"), at, f"strategy {strategy!r}", "jq reads group and channel scales")
        gs = w.get("group_size") if strategy == "group" else None
        need(strategy == "channel" or (isinstance(gs, int) and gs > 0), at, f"group_size {gs!r}",
             "a group strategy needs a positive group_size")
        scheme = {"num_bits": w["num_bits"], "type": "int", "symmetric": bool(w.get("symmetric", True)),
                  "group_size": gs, "strategy": strategy, "actorder": w.get("actorder")}
        groups.append((list(grp.get("targets") or []), scheme))
    need(bool(groups), where, "quantization_config has no config_groups", "the checkpoint is not quantized")
    return Targets(groups, qc.get("ignore") or [])


def quantization_config(schemes: Mapping[str, Mapping[str, Any]], ignore: Sequence[str]) -> dict[str, Any]:
    """The `quantization_config` transformers / vLLM read: one config group per distinct scheme of `schemes`
    ({module name: scheme from `from_qtensor`}), targeting "Linear" when every quantized layer shares one scheme
    (else the module names), and `ignore` (the linear modules left in float)."""
    kinds: dict[tuple, list[str]] = {}
    for module, s in schemes.items():
        kinds.setdefault(tuple(sorted(s.items(), key=lambda kv: kv[0])), []).append(module)
    need(bool(kinds), "compressed-tensors export", "no quantized linear layer", "quantize the model first")
    groups = {}
    for i, (key, modules) in enumerate(kinds.items()):
        weights = {**dict(key), "dynamic": False, "observer": "minmax", "observer_kwargs": {}, "block_structure": None}
        groups[f"group_{i}"] = {"targets": ["Linear"] if len(kinds) == 1 else sorted(modules), "weights": weights,
                                "input_activations": None, "output_activations": None, "format": FORMAT}
    return {"quant_method": "compressed-tensors", "format": FORMAT, "quantization_status": "compressed",
            "config_groups": groups, "ignore": list(ignore), "kv_cache_scheme": None}
