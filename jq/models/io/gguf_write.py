"""A jq parameter tree written as a GGUF file llama.cpp serves: QTensors whose grid *is* a legacy block type go
in exactly (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1: codes and f16 scales re-laid, the inverse of `gguf_native`), every other
grid as the nearest block type llama.cpp reads (re-quantized from the dequantized weight, said per tensor), float
leaves as F32. The metadata (config, tokenizer) and the tensor names come from the source GGUF the model was read
from, so the written file is that model with jq's weights.

Refused, naming the leaf: an online rotation or activation quantization (`ExecPolicy`), which no GGUF type
expresses; a parameter the source file has no tensor for; a config that differs from the source's.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
from gguf import GGMLQuantizationType as T
from gguf import GGUFValueType, GGUFWriter, LlamaFileType
from gguf.quants import quantize

from jq.models.family import ModelFamily
from jq.models.io.gguf import open_reader, read_metadata
from jq.models.io.gguf_native import BLOCK, NATIVE_TYPES, row_permutation
from jq.numbers.lowrank import LowRank
from jq.numbers.qtensor import ExecPolicy, QTensor
from jq.tree.paths import leaf_paths

__all__ = ["export_gguf", "exact_type", "codes_to_blocks"]

_FILE_TYPES = {T.Q4_0: LlamaFileType.MOSTLY_Q4_0, T.Q4_1: LlamaFileType.MOSTLY_Q4_1, T.Q5_0: LlamaFileType.MOSTLY_Q5_0,
               T.Q5_1: LlamaFileType.MOSTLY_Q5_1, T.Q8_0: LlamaFileType.MOSTLY_Q8_0}
_SKIP_KEYS = ("GGUF.", "general.architecture", "general.file_type")


def codes_to_blocks(codes: np.ndarray, d: np.ndarray, m: np.ndarray | None, kind: T) -> np.ndarray:
    """The inverse of `gguf_native.blocks_to_codes`: codes [R, C] (int8 signed for Q4_0 / Q5_0 / Q8_0, uint8 with
    offsets for Q4_1 / Q5_1), d [R, C/32] f16, m [R, C/32] f16 or None → the tensor's bytes uint8 [R, C/32·size]."""
    bits, has_min, has_qh, size = NATIVE_TYPES[kind]
    R = codes.shape[0]
    q = codes.reshape(R, -1, BLOCK).astype(np.int16)
    parts = [d.astype(np.float16).reshape(R, -1, 1).view(np.uint8)]
    if has_min:
        parts.append(m.astype(np.float16).reshape(R, -1, 1).view(np.uint8))
    if bits == 8:
        parts.append(q.astype(np.int8).view(np.uint8))
    else:
        u = (q if has_min else q + (1 << (bits - 1))).astype(np.uint32)  # the unsigned nibble (+ fifth bit)
        if has_qh:
            qh = np.sum(((u >> 4) & 1) << np.arange(BLOCK, dtype=np.uint32), axis=-1, dtype=np.uint32)
            parts.append(qh.astype("<u4").reshape(R, -1, 1).view(np.uint8))
        lo = (u & 15).astype(np.uint8)
        parts.append(lo[..., :16] | (lo[..., 16:] << 4))
    out = np.concatenate(parts, axis=-1)
    assert out.shape[-1] == size
    return out.reshape(R, -1)


def exact_type(q: QTensor, group_axis: int) -> tuple[T | None, str]:
    """The legacy block type that holds `q` exactly when its groups run along `group_axis` (the GGUF row), or
    (None, why not)."""
    lay = q.layout
    if lay.granularity != "group" or lay.group_size != BLOCK or lay.flat or lay.group_axis != group_axis:
        return None, f"grid {q.describe()} is not groups of {BLOCK} along the rows GGUF blocks run along"
    if (lay.padded or lay.shape[group_axis]) != lay.shape[group_axis] or q.perm is not None:
        return None, "padded or act-order (permuted) groups"
    if q.outer_scale is not None or jnp.dtype(q.scale.dtype) != jnp.float16:
        return None, f"scales stored as {jnp.dtype(q.scale.dtype).name}, not one f16 per block"
    kinds = {("int8", True, False): T.Q8_0, ("int4", True, False): T.Q4_0, ("int4", False, True): T.Q4_1,
             ("int5", True, False): T.Q5_0, ("int5", False, True): T.Q5_1}
    kind = kinds.get((q.fmt, q.symmetric, q.zero_min))
    if kind is None:
        why = "zero points in code units (GGUF stores d·q + m)" if q.fmt in ("int4", "int5") else f"format {q.fmt}"
        return None, why
    if q.zero is not None and jnp.dtype(q.zero.dtype) != jnp.float16:
        return None, f"offsets stored as {jnp.dtype(q.zero.dtype).name}, not f16"
    return kind, ""


def _nearest(q: QTensor) -> T:
    """The block type llama.cpp reads nearest to `q`'s grid: Q8_0 from 6 bits up, else the 4- / 5-bit type with
    an offset when `q` has zero points, without when it is symmetric."""
    bits = q.format.bits_per_weight
    if bits >= 6 or q.format.kind == "float":
        return T.Q8_0
    if bits == 5:
        return T.Q5_0 if q.symmetric else T.Q5_1
    return T.Q4_0 if q.symmetric else T.Q4_1


def _stored_rows(a: np.ndarray, transpose: bool, rows: np.ndarray | None) -> np.ndarray:
    """A parameter-layout array back in the file's row order: transposed back, q/k rows re-interleaved."""
    a = a.T if transpose else a
    return np.ascontiguousarray(a if rows is None else a[np.argsort(rows)])


def _tensor(path: str, leaf: Any, m: Any) -> tuple[np.ndarray, T | None, dict[str, Any]]:
    """(data, GGUF type (None: float32 array), report row) for one parameter."""
    if isinstance(leaf, LowRank):
        raise ValueError(f"{path}: a LowRank leaf (base + adapter) has no GGUF type; merge it first "
                         "(jq.adapters.merge, or jq.adapters.qalora for an exact integer merge)")
    rows = row_permutation(m, np.shape(leaf)[1] if m.transpose else np.shape(leaf)[0])
    if m.convert is not None and rows is None:
        raise ValueError(f"{path}: the family's GGUF map converts this tensor by more than a row order, which the "
                         "exporter cannot invert")
    if not isinstance(leaf, QTensor):
        a = _stored_rows(np.asarray(leaf, np.float32), m.transpose, rows)
        return a, None, {"path": path, "jq": "float", "gguf": "F32", "exact": True}
    if leaf.sparse_index is not None:
        raise ValueError(f"{path}: {leaf!r} carries float16 outliers beside its codes (dense-and-sparse), which no "
                         "GGUF type expresses; quantize without `outliers`, or dequantize the leaf first")
    if leaf.policy != ExecPolicy():
        raise ValueError(f"{path}: {leaf!r} runs with an online rotation or activation quantization "
                         f"({leaf.policy}), which no GGUF type expresses; export a weight-only recipe without "
                         "`rotate:` / `act:` (a model-level `rotation:` section is fine)")
    group_axis = 0 if m.transpose else 1
    kind, why = exact_type(leaf, group_axis) if leaf.ndim == 2 else (None, "not 2-D")
    if kind is not None:
        codes = np.asarray(leaf.unpacked_codes())
        codes, d = _stored_rows(codes, m.transpose, rows), _stored_rows(np.asarray(leaf.scale), m.transpose, rows)
        mins = None if leaf.zero is None else _stored_rows(np.asarray(leaf.zero), m.transpose, rows)
        return codes_to_blocks(codes, d, mins, kind), kind, {"path": path, "jq": leaf.describe(), "gguf": kind.name,
                                                              "exact": True}
    w = _stored_rows(np.asarray(leaf.dequantize(jnp.float32)), m.transpose, rows)
    if w.ndim != 2 or w.shape[1] % BLOCK:
        return w, None, {"path": path, "jq": leaf.describe(), "gguf": "F32", "exact": False,
                         "note": f"{why}; rows of {w.shape[-1]} do not split into blocks of {BLOCK}: stored as F32"}
    kind = _nearest(leaf)
    data = quantize(w, kind)
    return data, kind, {"path": path, "jq": leaf.describe(), "gguf": kind.name, "exact": False,
                        "note": f"{why}: re-quantized to {kind.name} from the dequantized weight"}


def export_gguf(params: Any, cfg: Any, family: ModelFamily, source: str | os.PathLike, out: str | os.PathLike
                ) -> list[dict[str, Any]]:
    """Write `params` (arrays, QTensors) of a model read from the GGUF file `source` as a GGUF file `out`, in the
    source's tensor order with its metadata; returns one report row per tensor ({"path", "jq", "gguf", "exact"[,
    "note"]}). The file appears whole or not at all (written beside `out`, then renamed)."""
    source, out = Path(source), Path(out)
    reader = open_reader(source)
    meta = read_metadata(reader)
    src_cfg = family.config_from_gguf(meta, {t.name for t in reader.tensors})
    if src_cfg != cfg:
        raise ValueError(f"{out}: the model's config differs from the one of {source} ({cfg} vs {src_cfg}); a "
                         "rotation that unties the LM head, or another model — export from the model it was read from")
    leaves = dict(leaf_paths(params))
    writer_rows, report = [], []
    for t in reader.tensors:
        m = family.gguf_tensor(t.name, cfg)
        if m is None:
            continue
        if m.path not in leaves:
            raise ValueError(f"{out}: parameter {m.path} (GGUF tensor {t.name!r}) is missing from the tree")
        data, kind, row = _tensor(m.path, leaves.pop(m.path), m)
        writer_rows.append((t.name, data, kind))
        report.append(row)
    if leaves:
        raise ValueError(f"{out}: parameters {sorted(leaves)[:3]} have no tensor in {source}; export a model with "
                         "the source file's parameters")
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    try:
        w = GGUFWriter(tmp, meta["general.architecture"])
        for field in reader.fields.values():
            if field.name.startswith(_SKIP_KEYS):
                continue
            vtype = field.types[0]
            w.add_key_value(field.name, field.contents(), vtype,
                            sub_type=field.types[-1] if vtype == GGUFValueType.ARRAY else None)
        kinds = [k for _, _, k in writer_rows if k is not None]
        main = max(set(kinds), key=kinds.count) if kinds else None
        w.add_file_type(_FILE_TYPES.get(main, LlamaFileType.ALL_F32))
        for name, data, kind in writer_rows:
            w.add_tensor(name, data, raw_dtype=kind)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp made it private; the result is an ordinary file
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return report
