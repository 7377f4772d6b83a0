"""Load a Hugging Face Llama directory (config.json + safetensors, single or sharded) into fp32 NumPy params."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import safe_open

from jq.models.llama.config import LlamaConfig
from jq.models.llama.weights import LazyParam, check_shapes, set_path
from jq.models.io.tokenizer import Tokenizer

# HF per-layer name (after "model.layers.N.") -> (path under layers_N, is a linear weight to transpose)
_LAYER_TENSORS = {
    "input_layernorm.weight": ("input_norm/scale", False),
    "self_attn.q_proj.weight": ("attn/q_proj/kernel", True),
    "self_attn.k_proj.weight": ("attn/k_proj/kernel", True),
    "self_attn.v_proj.weight": ("attn/v_proj/kernel", True),
    "self_attn.o_proj.weight": ("attn/o_proj/kernel", True),
    "post_attention_layernorm.weight": ("post_attn_norm/scale", False),
    "mlp.gate_proj.weight": ("mlp/gate_proj/kernel", True),
    "mlp.up_proj.weight": ("mlp/up_proj/kernel", True),
    "mlp.down_proj.weight": ("mlp/down_proj/kernel", True),
}
_GLOBAL_TENSORS = {
    "model.embed_tokens.weight": ("embed/embedding", False),
    "model.norm.weight": ("final_norm/scale", False),
    "lm_head.weight": ("lm_head/kernel", True),
}
# Buffers some exports carry that hold no weights.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def weight_files(directory: Path) -> list[Path]:
    """The safetensors files of a checkpoint: model.safetensors, or the shards listed in the index."""
    single = directory / "model.safetensors"
    if single.is_file():
        return [single]
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing = [s for s in shards if not (directory / s).is_file()]
        if missing:
            raise FileNotFoundError(f"{index} lists shards that are not in {directory}: {missing}")
        return [directory / s for s in shards]
    raise FileNotFoundError(
        f"no weights in {directory}: expected model.safetensors or model.safetensors.index.json with its shards"
    )


def _header(file: Path) -> dict[str, Any]:
    """The JSON header of a safetensors file (name -> {"dtype", "shape", "data_offsets"}, plus "__metadata__")."""
    with open(file, "rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        try:
            return json.loads(fh.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{file}: not a safetensors file (unreadable header: {e})") from None


def _read_tensor(file: Path, name: str) -> np.ndarray:
    """One tensor; bf16 arrives as ml_dtypes.bfloat16 (read by hand if safetensors can't)."""
    with safe_open(str(file), framework="np") as f:
        try:
            return f.get_tensor(name)
        except TypeError:  # older safetensors: no NumPy bfloat16
            return _read_raw(file, name)


def _read_raw(file: Path, name: str) -> np.ndarray:
    """Read one tensor from the safetensors header offsets; handles BF16 through ml_dtypes."""
    import ml_dtypes

    dtypes = {"BF16": ml_dtypes.bfloat16, "F16": np.float16, "F32": np.float32, "F64": np.float64}
    info = _header(file)[name]
    if info["dtype"] not in dtypes:
        raise ValueError(f"{file}: tensor {name!r} has dtype {info['dtype']}, expected a float type")
    with open(file, "rb") as fh:
        header_len = int.from_bytes(fh.read(8), "little")
        start, end = info["data_offsets"]
        fh.seek(8 + header_len + start)
        raw = fh.read(end - start)
    return np.frombuffer(raw, dtype=dtypes[info["dtype"]]).reshape(info["shape"])


def _load_param(file: Path, name: str, linear: bool) -> np.ndarray:
    w = np.asarray(_read_tensor(file, name), dtype=np.float32)
    return np.ascontiguousarray(w.T) if linear else w


def _target(name: str, n_layers: int) -> tuple[str, bool] | None:
    """HF tensor name -> (parameter path, transpose?), None for ignorable buffers."""
    if name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[name]
    if name.endswith(_IGNORED_SUFFIXES):
        return None
    parts = name.split(".", 3)
    if len(parts) == 4 and parts[:2] == ["model", "layers"] and parts[2].isdigit() and int(parts[2]) < n_layers \
            and parts[3] in _LAYER_TENSORS:
        path, linear = _LAYER_TENSORS[parts[3]]
        return f"layers_{parts[2]}/{path}", linear
    raise ValueError(f"unexpected tensor {name!r} for a LlamaForCausalLM checkpoint")


def open_hf(directory: str | Path) -> tuple[LlamaConfig, list[LazyParam]]:
    """Open a Hugging Face Llama directory lazily -> (config, one `LazyParam` per parameter).

    Only config.json and the safetensors headers are read and checked; each `LazyParam.load()` reads one tensor
    as fp32 in the layout of `jq.models.llama.model.Llama` (kernels transposed to (in, out)). A tied checkpoint that
    still ships `lm_head.weight` drops it (the model reads `embed/embedding`).
    """
    directory = Path(directory)
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"no config.json in {directory}: not a Hugging Face model directory")
    cfg = LlamaConfig.from_hf_config(json.loads(config_path.read_text()))
    lazy = []
    for file in weight_files(directory):
        for name, info in _header(file).items():
            if name == "__metadata__":
                continue
            target = _target(name, cfg.n_layers)
            if target is None or (cfg.tie_embeddings and name == "lm_head.weight"):
                continue
            path, linear = target
            shape = tuple(int(d) for d in info["shape"])
            lazy.append(LazyParam(path, shape[::-1] if linear else shape, functools.partial(_load_param, file, name, linear)))
    check_shapes({p.path: p.shape for p in lazy}, cfg, directory)
    return cfg, lazy


def load_hf(directory: str | Path) -> tuple[LlamaConfig, dict[str, Any], Tokenizer | None]:
    """Read a Hugging Face Llama directory -> (config, params as a nested dict of fp32 np.ndarray, tokenizer).

    The tokenizer comes from `tokenizer.json` and is None when the directory has none. A tied checkpoint that
    still ships `lm_head.weight` drops it (the model reads `embed/embedding`).
    """
    cfg, lazy = open_hf(directory)
    params: dict[str, Any] = {}
    for p in lazy:
        set_path(params, p.path, p.load())
    tok_path = Path(directory) / "tokenizer.json"
    tokenizer = Tokenizer.from_file(tok_path) if tok_path.is_file() else None
    return cfg, params, tokenizer
