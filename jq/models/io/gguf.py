"""Load a llama-architecture GGUF file (llama.cpp's format) into `LlamaConfig`, fp32 NumPy params and a `Tokenizer`.

Weights are dequantized to fp32 with `gguf.quants.dequantize`. llama.cpp's converter interleaves the rows of
attn_q / attn_k for its RoPE kernel; they are un-permuted here back to the Hugging Face rotate-half layout used by
`jq.models.llama.model`, so a GGUF and the safetensors it came from give the same logits.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader
from gguf.quants import dequantize

from jq.models.llama.config import LlamaConfig
from jq.models.llama.weights import LazyParam, check_shapes, set_path
from jq.models.io.tokenizer import Tokenizer

_T = GGMLQuantizationType
SUPPORTED_TYPES = (_T.F32, _T.F16, _T.BF16, _T.Q8_0, _T.Q4_0, _T.Q4_1)

# GGUF per-layer tensor -> (path under layers_{i}, is a linear weight to transpose to a Flax (in, out) kernel)
_LAYER_TENSORS = {
    "attn_norm": ("input_norm/scale", False),
    "attn_q": ("attn/q_proj/kernel", True),
    "attn_k": ("attn/k_proj/kernel", True),
    "attn_v": ("attn/v_proj/kernel", True),
    "attn_output": ("attn/o_proj/kernel", True),
    "ffn_norm": ("post_attn_norm/scale", False),
    "ffn_gate": ("mlp/gate_proj/kernel", True),
    "ffn_up": ("mlp/up_proj/kernel", True),
    "ffn_down": ("mlp/down_proj/kernel", True),
}
_GLOBAL_TENSORS = {
    "token_embd": ("embed/embedding", False),
    "output_norm": ("final_norm/scale", False),
    "output": ("lm_head/kernel", True),
}


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


def unpermute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation. w: [n_heads*head_dim, in] (GGUF order) -> same shape, HF order.

    llama.cpp stores, within each head, rows (0, D/2, 1, D/2+1, ...) so that RoPE pairs are adjacent;
    HF keeps the halves apart (rotate-half). Inverse of `reshape(H, 2, D/2, in).swapaxes(1, 2)`.
    """
    out, cols = w.shape
    return w.reshape(n_heads, out // n_heads // 2, 2, cols).swapaxes(1, 2).reshape(out, cols)


def permute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's converter permutation (HF order -> GGUF order). w: [n_heads*head_dim, in]."""
    out, cols = w.shape
    return w.reshape(n_heads, 2, out // n_heads // 2, cols).swapaxes(1, 2).reshape(out, cols)


def _check_types(reader: GGUFReader) -> None:
    bad = [t for t in reader.tensors if t.tensor_type not in SUPPORTED_TYPES]
    if bad:
        t = bad[0]
        more = f" (and {len(bad) - 1} more tensors)" if len(bad) > 1 else ""
        raise ValueError(
            f"GGUF tensor {t.name!r} has type {t.tensor_type.name}{more}, which jq cannot dequantize; supported types: "
            f"{', '.join(s.name for s in SUPPORTED_TYPES)}. Re-export the model with llama.cpp as Q8_0, F16 or F32 "
            "(e.g. `llama-quantize --allow-requantize in.gguf out.gguf Q8_0`), or load the Hugging Face safetensors."
        )


def _tensor_fp32(t: Any) -> np.ndarray:
    """Dequantize one ReaderTensor to fp32 with NumPy shape (reversed GGUF shape; a linear is [out, in])."""
    arr = dequantize(np.asarray(t.data), t.tensor_type)
    return np.ascontiguousarray(arr, dtype=np.float32).reshape(tuple(int(d) for d in reversed(t.shape)))


def _target(name: str, n_layers: int) -> tuple[str, bool]:
    """GGUF tensor name -> (parameter path, whether it is a linear weight to transpose)."""
    parts = name.split(".")
    if len(parts) == 2 and parts[1] == "weight" and parts[0] in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[parts[0]]
    if (len(parts) == 4 and parts[0] == "blk" and parts[1].isdigit() and int(parts[1]) < n_layers
            and parts[2] in _LAYER_TENSORS and parts[3] == "weight"):
        path, linear = _LAYER_TENSORS[parts[2]]
        return f"layers_{parts[1]}/{path}", linear
    raise ValueError(
        f"unexpected GGUF tensor {name!r} for a plain llama model (RoPE scaling via rope_freqs, biases and "
        "MoE experts are not supported)"
    )


def open_gguf(path: str | Path) -> tuple[LlamaConfig, list[LazyParam], dict[str, Any]]:
    """Open a llama GGUF file lazily -> (config, one `LazyParam` per parameter, GGUF metadata).

    Only the header is read and checked (architecture, tensor types, every parameter present with its shape);
    the file is memory-mapped and each `LazyParam.load()` dequantizes one tensor to fp32 in the layout of
    `jq.models.llama.model.Llama` (kernels (in, out), q/k rows un-permuted).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no GGUF file at {path}")
    reader = open_reader(path)
    meta = read_metadata(reader)
    names = {t.name for t in reader.tensors}
    tokens = meta.get("tokenizer.ggml.tokens")
    cfg = LlamaConfig.from_gguf_metadata(
        meta, vocab_size=len(tokens) if tokens is not None else None, has_output="output.weight" in names
    )
    _check_types(reader)
    lazy = []
    for t in reader.tensors:
        target, linear = _target(t.name, cfg.n_layers)
        heads = cfg.n_heads if t.name.endswith("attn_q.weight") else \
            cfg.n_kv_heads if t.name.endswith("attn_k.weight") else None
        shape = tuple(int(d) for d in t.shape)  # GGUF order is reversed NumPy order: already (in, out) for a linear
        lazy.append(LazyParam(target, shape if linear else shape[::-1], functools.partial(_load_tensor, t, heads, linear)))
    check_shapes({p.path: p.shape for p in lazy}, cfg, path)
    return cfg, lazy, meta


def _load_tensor(t: Any, heads: int | None, linear: bool) -> np.ndarray:
    """One ReaderTensor -> fp32 parameter: dequantized, q/k rows un-permuted (`heads`), linears transposed."""
    w = _tensor_fp32(t)
    if heads is not None:
        w = unpermute_qk(w, heads)
    return np.ascontiguousarray(w.T) if linear else w


def load_gguf(path: str | Path) -> tuple[LlamaConfig, dict[str, Any], Tokenizer]:
    """Read a llama GGUF file -> (config, params as a nested dict of fp32 np.ndarray, tokenizer).

    Parameter paths and kernel layouts are those of `jq.models.llama.model.Llama` (kernels are (in, out)).
    """
    cfg, lazy, meta = open_gguf(path)
    params: dict[str, Any] = {}
    for p in lazy:
        set_path(params, p.path, p.load())
    return cfg, params, Tokenizer.from_gguf_metadata(meta)
