"""Load a Hugging Face Llama directory (config.json + safetensors, single or sharded) into fp32 NumPy params."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import safe_open

from jq.models.config import LlamaConfig
from jq.models.params import check_params, set_path
from jq.models.tokenizer import Tokenizer

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


def _iter_tensors(files: list[Path]) -> Iterator[tuple[str, np.ndarray]]:
    """(name, array) for every tensor; bf16 arrives as ml_dtypes.bfloat16 (read by hand if safetensors can't)."""
    for file in files:
        with safe_open(str(file), framework="np") as f:
            for name in f.keys():
                try:
                    yield name, f.get_tensor(name)
                except TypeError:  # older safetensors: no NumPy bfloat16
                    yield name, _read_raw(file, name)


def _read_raw(file: Path, name: str) -> np.ndarray:
    """Read one tensor from the safetensors header offsets; handles BF16 through ml_dtypes."""
    import ml_dtypes

    dtypes = {"BF16": ml_dtypes.bfloat16, "F16": np.float16, "F32": np.float32, "F64": np.float64}
    with open(file, "rb") as fh:
        header_len = int.from_bytes(fh.read(8), "little")
        info = json.loads(fh.read(header_len))[name]
        if info["dtype"] not in dtypes:
            raise ValueError(f"{file}: tensor {name!r} has dtype {info['dtype']}, expected a float type")
        start, end = info["data_offsets"]
        fh.seek(8 + header_len + start)
        raw = fh.read(end - start)
    return np.frombuffer(raw, dtype=dtypes[info["dtype"]]).reshape(info["shape"])


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


def load_hf(directory: str | Path) -> tuple[LlamaConfig, dict[str, Any], Tokenizer | None]:
    """Read a Hugging Face Llama directory -> (config, params as a nested dict of fp32 np.ndarray, tokenizer).

    The tokenizer comes from `tokenizer.json` and is None when the directory has none. A tied checkpoint that
    still ships `lm_head.weight` drops it (the model reads `embed/embedding`).
    """
    directory = Path(directory)
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"no config.json in {directory}: not a Hugging Face model directory")
    cfg = LlamaConfig.from_hf_config(json.loads(config_path.read_text()))

    params: dict[str, Any] = {}
    for name, w in _iter_tensors(weight_files(directory)):
        target = _target(name, cfg.n_layers)
        if target is None or (cfg.tie_embeddings and name == "lm_head.weight"):
            continue
        path, linear = target
        w = np.asarray(w, dtype=np.float32)
        set_path(params, path, np.ascontiguousarray(w.T) if linear else w)
    check_params(params, cfg, directory)

    tok_path = directory / "tokenizer.json"
    tokenizer = Tokenizer.from_file(tok_path) if tok_path.is_file() else None
    return cfg, params, tokenizer
