"""GGUF files (llama.cpp's format), for any model family: the checked reader, metadata, dequantization to fp32 with
`gguf.quants.dequantize`, and the lazy parameters a family's name map (`ModelFamily.gguf_tensor`) places. What a
tensor name means, and layout fixes such as llama.cpp's q/k row order, belong to the family.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader
from gguf.quants import dequantize

from jq.models.family import LoadedModel, ModelFamily, family_for_gguf
from jq.models.io.gguf_native import NATIVE_TYPES, READ_TYPES, reader_for
from jq.models.io.lazy import LazyParam, StoredTensor, lazy_params, materialize
from jq.models.io.tokenizer import Tokenizer



@functools.cache
def supported_types() -> tuple[GGMLQuantizationType, ...]:
    """Every tensor type the installed `gguf` package dequantizes (F32/F16/BF16, legacy Q4_0…Q8_0, the K-quants
    Q2_K…Q6_K, i-quants, ...), found by dequantizing one all-zero block of each."""
    ok = []
    for t in GGMLQuantizationType:
        if t not in GGML_QUANT_SIZES:
            continue
        block, type_size = GGML_QUANT_SIZES[t]
        try:
            out = dequantize(np.zeros(type_size, np.uint8), t)
        except Exception:  # noqa: BLE001  (not implemented, or needs what one zero block cannot give)
            continue
        if np.asarray(out).size == block:
            ok.append(t)
    return tuple(ok)

class _Truncated(Exception):
    def __init__(self, need: int, tensor: str):
        self.need, self.tensor = need, tensor


class _CheckedReader(GGUFReader):
    """GGUFReader that checks the tensor table against the file size before it maps any tensor (the plain reader
    fails a truncated file with a reshape error naming neither the file nor the truncation)."""

    def _build_tensors(self, start_offs: int, fields: list) -> None:
        need, last = 0, ""
        for field in fields:
            _, name, _, dims, raw_type, offset = field.parts
            block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(int(raw_type[0]))]
            end = int(start_offs + offset[0]) + int(np.prod(dims)) * type_size // block
            if end > need:
                need, last = end, bytes(name).decode("utf-8", "replace")
        if need > len(self.data):
            raise _Truncated(need, last)
        super()._build_tensors(start_offs, fields)


def open_reader(path: str | Path) -> GGUFReader:
    """A GGUFReader of `path`, or a ValueError naming the file and what is wrong with it: truncated (expected N
    bytes, found M), or a header that cannot be parsed."""
    path = Path(path)
    size = path.stat().st_size
    try:
        return _CheckedReader(str(path))
    except _Truncated as e:
        raise ValueError(f"{path}: truncated GGUF file: its tensor table needs {e.need:,} bytes (to the end of "
                         f"{e.tensor!r}), found {size:,}; an interrupted download or copy — fetch it again") from None
    except (IndexError, ValueError, KeyError, TypeError, OverflowError, UnicodeDecodeError) as e:
        with open(path, "rb") as f:
            magic = f.read(4)
        if magic != b"GGUF":
            raise ValueError(f"{path}: not a GGUF file (it starts with {magic!r}, not b'GGUF')") from None
        raise ValueError(f"{path}: damaged or truncated GGUF file: its header (metadata and tensor table) does not "
                         f"parse within its {size:,} bytes ({type(e).__name__}: {str(e)[:120]}); fetch it "
                         "again") from None


def read_metadata(reader: GGUFReader) -> dict[str, Any]:
    """All GGUF key/values decoded to Python scalars, strings and lists."""
    return {name: field.contents() for name, field in reader.fields.items()}


def _check_types(reader: GGUFReader) -> None:
    supported = supported_types()
    bad = [t for t in reader.tensors if t.tensor_type not in supported]
    if bad:
        t = bad[0]
        more = f" (and {len(bad) - 1} more tensors)" if len(bad) > 1 else ""
        raise ValueError(
            f"GGUF tensor {t.name!r} has type {t.tensor_type.name}{more}, which jq cannot dequantize; supported types: "
            f"{', '.join(s.name for s in supported)}. Re-export the model with llama.cpp as Q8_0, F16 or F32 "
            "(e.g. `llama-quantize --allow-requantize in.gguf out.gguf Q8_0`), or load the Hugging Face safetensors."
        )


def _tensor_fp32(t: Any) -> np.ndarray:
    """Dequantize one ReaderTensor to fp32 with NumPy shape (reversed GGUF shape; a linear is [out, in])."""
    arr = dequantize(np.asarray(t.data), t.tensor_type)
    return np.ascontiguousarray(arr, dtype=np.float32).reshape(tuple(int(d) for d in reversed(t.shape)))


def _stored(t: Any, path: Path, native: bool) -> StoredTensor:
    shape = tuple(int(d) for d in reversed(t.shape))
    nat = None
    if native and t.tensor_type in READ_TYPES and len(shape) == 2:
        nat = reader_for(lambda: np.asarray(t.data), t.tensor_type, shape)
    return StoredTensor(t.name, shape, path, functools.partial(_tensor_fp32, t), nat)


def native_summary(reader: GGUFReader) -> dict[str, Any]:
    """How each tensor type of a natively read file arrives: {type: {"tensors": n, "as": "QTensor" | "float" | ...}}
    (F32 / F16 stay float; the K-quants are QTensors with float32 sub-block scales; other types are dequantized)."""
    out: dict[str, Any] = {}
    for t in reader.tensors:
        e = out.setdefault(t.tensor_type.name, {"tensors": 0, "as": "float"})
        e["tensors"] += 1
        if t.tensor_type in NATIVE_TYPES and len(t.shape) == 2:
            e["as"] = "QTensor"
        elif t.tensor_type in READ_TYPES and len(t.shape) == 2:
            e["as"] = "QTensor, float32 sub-block scales (the file's integer sub-scales expanded)"
        elif t.tensor_type.name not in ("F32", "F16", "BF16"):
            e["as"] = "dequantized to float32 (no exact jq layout for this type)"
    return out


def open_gguf(path: str | Path, native: bool = False) -> tuple[ModelFamily, Any, list[LazyParam], dict[str, Any]]:
    """Open a GGUF file lazily -> (its family, config, one `LazyParam` per parameter, GGUF metadata).

    The family comes from `general.architecture`; only the header is read and checked (tensor types, every
    parameter present with its shape); the file is memory-mapped and each `LazyParam.load()` dequantizes one tensor
    to fp32 in the family's layout (kernels (in, out), plus whatever the family's `gguf_tensor` map converts).
    With `native`, a 2-D tensor of a legacy block type (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0) loads as the QTensor it is
    (`jq.models.io.gguf_native`), and a K-quant (Q4_K, Q5_K, Q6_K) as one with float32 sub-block scales, both
    exactly; other types are dequantized as before.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no GGUF file at {path}")
    reader = open_reader(path)
    meta = read_metadata(reader)
    family = family_for_gguf(meta.get("general.architecture"))
    if family.config_from_gguf is None or family.gguf_tensor is None:
        raise ValueError(f"{path}: model family {family.name!r} has no GGUF reader")
    cfg = family.config_from_gguf(meta, {t.name for t in reader.tensors})
    _check_types(reader)
    tensors = [_stored(t, path, native) for t in reader.tensors]
    lazy = lazy_params(family, cfg, tensors, family.gguf_tensor, path)
    if native:
        meta = {**meta, "jq.native": native_summary(reader)}
    return family, cfg, lazy, meta


def load_gguf(path: str | Path, native: bool = False) -> LoadedModel:
    """Read a GGUF file -> its family, config, params (nested dict of fp32 np.ndarray; with `native`, QTensors for
    the legacy block types, see `open_gguf`) and tokenizer."""
    family, cfg, lazy, meta = open_gguf(path, native)
    return LoadedModel(family, cfg, materialize(lazy), Tokenizer.from_gguf_metadata(meta), str(path),
                       meta.get("jq.native"))
