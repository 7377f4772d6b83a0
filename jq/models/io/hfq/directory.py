"""A Hugging Face directory of a pre-quantized checkpoint (config.json `quantization_config` with quant_method gptq,
awq or compressed-tensors) → lazy parameters whose quantized linear layers load as jq QTensors, as shipped.

Each quantized linear is a group of tensors sharing a prefix (`{prefix}.qweight / .qzeros / .scales / .g_idx`, or
`{prefix}.weight_packed / .weight_scale / .weight_zero_point / .weight_g_idx / .weight_shape`); its parameter is
where the family's name map (`ModelFamily.hf_tensor`) puts `{prefix}.weight`. Every other tensor (embeddings,
norms, an unquantized lm_head) loads as fp32 through the shared reader (`jq.models.io.lazy.lazy_params`).
`jq.models.io.safetensors.open_hf` dispatches here, so `load_model(dir)` returns params holding QTensors.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from jq.models.family import ModelFamily
from jq.models.io.hfq import awq, compressed, gptq
from jq.models.io.hfq.common import need
from jq.models.io.lazy import LazyParam, StoredTensor, lazy_params

__all__ = ["QUANT_METHODS", "quant_method", "quantized_params"]

QUANT_METHODS = ("gptq", "awq", "compressed-tensors")
_TENSORS = {"gptq": gptq.TENSORS, "awq": awq.TENSORS, "compressed-tensors": compressed.TENSORS}  # first: the codes
Reader = Callable[[Path, str], np.ndarray]


def quant_method(hf: Mapping[str, Any], where: str = "config.json") -> str | None:
    """The `quant_method` of a config.json dict (None without a quantization_config); ValueError naming `where`
    for a method jq does not read."""
    qc = hf.get("quantization_config")
    if not qc:
        return None
    m = qc.get("quant_method")
    need(m in QUANT_METHODS, where, f"quantization_config quant_method {m!r}",
         f"jq reads pre-quantized {', '.join(QUANT_METHODS)} checkpoints; load the float model and quantize it")
    return m


def _expected(method: str, s: Mapping[str, Any], k: int, n: int) -> dict[str, set[tuple[int, ...]]]:
    """The shapes each stored tensor of a (K, N) kernel may have under scheme `s` (as the file lists them)."""
    if method == "compressed-tensors":
        b, gs = s["num_bits"], s["group_size"]
        p, n_groups = 32 // b, (1 if gs is None else k // gs)
        return {"weight_packed": {(n, -(-k // p))}, "weight_scale": {(n, n_groups)}, "weight_shape": {(2,)},
                "weight_zero_point": {(-(-n // p), n_groups), (n, n_groups)}, "weight_g_idx": {(k,)}}
    b, gs = s["bits"], s["group_size"]
    n_groups = 1 if gs == -1 else k // gs
    if method == "awq":
        return {"qweight": {(k, n // 8)}, "qzeros": {(n_groups, n // 8)}, "scales": {(n_groups, n)}}
    return {"qweight": {(k * b // 32, n)}, "qzeros": {(n_groups, n * b // 32)}, "scales": {(n_groups, n)},
            "g_idx": {(k,)}}


def _required(method: str, s: Mapping[str, Any]) -> tuple[str, ...]:
    if method != "compressed-tensors":
        return ("qweight", "qzeros", "scales")
    return (("weight_packed", "weight_scale", "weight_shape") + (() if s["symmetric"] else ("weight_zero_point",))
            + (("weight_g_idx",) if s["actorder"] == "group" else ()))


def _load(method: str, s: Mapping[str, Any], prefix: str, arrays: dict[str, np.ndarray]) -> Any:
    """The QTensor of one layer from its arrays (by suffix)."""
    if method == "gptq":
        return gptq.to_qtensor(arrays["qweight"], arrays["qzeros"], arrays["scales"], arrays.get("g_idx"),
                               bits=s["bits"], group_size=s["group_size"], sym=s["sym"], desc_act=s["desc_act"],
                               checkpoint_format=s["checkpoint_format"], name=prefix)
    if method == "awq":
        return awq.to_qtensor(arrays["qweight"], arrays["qzeros"], arrays["scales"], group_size=s["group_size"],
                              name=prefix)
    return compressed.to_qtensor(arrays["weight_packed"], arrays["weight_scale"], arrays["weight_shape"],
                                 arrays.get("weight_zero_point"), arrays.get("weight_g_idx"), num_bits=s["num_bits"],
                                 group_size=s["group_size"], symmetric=s["symmetric"], name=prefix)


def _layer(family: ModelFamily, cfg: Any, method: str, s: Mapping[str, Any] | None, prefix: str,
           parts: dict[str, StoredTensor], want: Mapping[str, tuple[int, ...]], read: Reader) -> LazyParam | None:
    """The LazyParam of one quantized layer, its tensors' shapes checked against the parameter and the scheme."""
    main = parts.get(_TENSORS[method][0]) or next(iter(parts.values()))
    need(s is not None, f"{main.file}: tensor {main.name}", f"is quantized, but no quantization_config group "
         f"quantizes module {prefix!r} (or it is ignored)", "fix config_groups / ignore in config.json")
    m = family.hf_tensor(prefix + ".weight", cfg)
    if m is None:
        return None
    need(m.transpose and m.convert is None and len(want.get(m.path, ())) == 2, f"{main.file}: tensor {main.name}",
         f"is quantized, but parameter {m.path} is not a plain linear kernel",
         "jq imports quantized linear layers only; keep this tensor in float")
    k, n = want[m.path]
    gs = s.get("group_size")
    need(gs in (None, -1) or k % gs == 0, f"{main.file}: layer {prefix}", f"group_size {gs} does not divide its "
         f"{k} input features (parameter {m.path})", "fix group_size in config.json")
    missing = [f"{prefix}.{t}" for t in _required(method, s) if t not in parts]
    need(not missing, f"{main.file}: layer {prefix}", f"tensor {missing[0] if missing else ''} is missing (found "
         f"{sorted(parts)})", "the checkpoint is incomplete; download it again or re-export it")
    shapes = _expected(method, s, k, n)
    for suffix, t in parts.items():
        need(t.shape in shapes[suffix], f"{t.file}: tensor {t.name}", f"has shape {t.shape}, expected "
             f"{' or '.join(map(str, sorted(shapes[suffix])))} for parameter {m.path} (K={k}, N={n}) under "
             f"{dict(s)}", "quantization_config's bits / group_size disagree with the tensors; fix config.json")

    def load() -> Any:
        q = _load(method, s, prefix, {suffix: np.asarray(read(t.file, t.name)) for suffix, t in parts.items()})
        need(q.shape == (k, n), f"{main.file}: layer {prefix}", f"decodes to shape {q.shape}, expected {(k, n)}",
             f"its weight_shape must be {(n, k)}")
        return q

    return LazyParam(m.path, (k, n), load)


def _scheme_of(method: str, qc: Mapping[str, Any], where: str) -> Callable[[str], dict[str, Any] | None]:
    """prefix -> the scheme that quantizes it (GPTQ / AWQ: one for all)."""
    if method == "compressed-tensors":
        return compressed.read_config(qc, where).scheme_for
    s = gptq.read_config(qc, where) if method == "gptq" else awq.read_config(qc, where)
    return lambda prefix: s


def quantized_params(family: ModelFamily, cfg: Any, hf: Mapping[str, Any], tensors: Iterable[StoredTensor],
                     read: Reader, source: str | Path) -> list[LazyParam]:
    """One LazyParam per parameter of a pre-quantized directory: quantized linears load as QTensors of the kernel
    (in, out), exactly as stored (`gptq` / `awq` / `compressed.to_qtensor`), everything else as fp32.

    hf: the config.json dict; tensors: the directory's `StoredTensor`s; read(file, name): one tensor in its stored
    dtype (`jq.models.io.safetensors.read_tensor`). Only headers (and config.json) are read here: a config whose
    bits / group_size disagree with the tensors' shapes, a missing tensor, a tensor that provides a parameter twice
    or a parameter nobody provides raise ValueError naming the file and the tensor; a damaged g_idx or zero point
    is named when its layer loads."""
    where = f"{source}/config.json"
    method = quant_method(hf, where)
    need(method is not None, where, "has no quantization_config", "open a float directory with open_hf")
    scheme_for = _scheme_of(method, hf["quantization_config"], where)
    layers: dict[str, dict[str, StoredTensor]] = {}
    plain: list[StoredTensor] = []
    for t in tensors:
        prefix, _, suffix = t.name.rpartition(".")
        if prefix and suffix in _TENSORS[method]:
            layers.setdefault(prefix, {})[suffix] = t
        else:
            plain.append(t)
    want = family.expected_shapes(cfg)
    quantized = [p for prefix, parts in layers.items()
                 if (p := _layer(family, cfg, method, scheme_for(prefix), prefix, parts, want, read)) is not None]
    taken = {p.path for p in quantized}
    rest = dataclasses.replace(family, expected_shapes=lambda c: {k: v for k, v in want.items() if k not in taken})
    floats = lazy_params(rest, cfg, plain, family.hf_tensor, source)
    twice = sorted(taken & {p.path for p in floats})
    need(not twice, str(source), f"parameter {twice[:1]} is stored both quantized and as a float .weight",
         "keep one of them")
    order = {p: i for i, p in enumerate(want)}
    return sorted(floats + quantized, key=lambda p: order.get(p.path, len(order)))
