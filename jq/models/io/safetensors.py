"""Hugging Face model directories (config.json + safetensors, single or sharded), for any model family: the
safetensors headers and tensors (bf16 included, without torch), and the lazy parameters a family's name map
(`ModelFamily.hf_tensor`) places."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import safe_open

from jq.models.family import LoadedModel, ModelFamily, family_for_hf
from jq.models.io.hfq.directory import quant_method, quantized_params
from jq.models.io.lazy import LazyParam, StoredTensor, lazy_params, materialize
from jq.models.io.tokenizer import Tokenizer
from jq.numbers.qtensor import QTensor
from jq.tree.paths import leaf_paths

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


def read_tensor(file: Path, name: str) -> np.ndarray:
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


def _fp32(file: Path, name: str) -> np.ndarray:
    return np.asarray(read_tensor(file, name), dtype=np.float32)


def read_config(directory: str | Path) -> tuple[Path, dict[str, Any]]:
    """(the directory, its config.json) of a Hugging Face model directory; FileNotFoundError without one."""
    directory = Path(directory)
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"no config.json in {directory}: not a Hugging Face model directory")
    try:
        return directory, json.loads(config_path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{config_path}: not valid JSON ({e})") from None


def stored_tensors(directory: Path) -> list[StoredTensor]:
    """Every tensor of the directory's safetensors files (headers only)."""
    out = []
    for file in weight_files(directory):
        for name, info in _header(file).items():
            if name != "__metadata__":
                out.append(StoredTensor(name, tuple(int(d) for d in info["shape"]), file,
                                        functools.partial(_fp32, file, name)))
    return out


def open_hf(directory: str | Path) -> tuple[ModelFamily, Any, list[LazyParam]]:
    """Open a Hugging Face model directory lazily -> (its family, config, one `LazyParam` per parameter).

    The family comes from config.json's `model_type`; only config.json and the safetensors headers are read and
    checked; each `LazyParam.load()` reads one tensor as fp32 in the family's layout (linear weights transposed to
    (in, out)). A pre-quantized directory (config.json `quantization_config`: GPTQ, AWQ, compressed-tensors) loads
    its quantized linear layers as jq QTensors of the (in, out) kernel, exactly as stored (`jq.models.io.hfq`).
    """
    directory, hf = read_config(directory)
    family = family_for_hf(hf.get("model_type"), str(directory / "config.json"))
    if family.config_from_hf is None or family.hf_tensor is None:
        raise ValueError(f"{directory}: model family {family.name!r} has no Hugging Face reader")
    cfg = family.config_from_hf(hf, str(directory / "config.json"))
    if hf.get("quantization_config"):
        return family, cfg, quantized_params(family, cfg, hf, stored_tensors(directory), read_tensor, directory)
    return family, cfg, lazy_params(family, cfg, stored_tensors(directory), family.hf_tensor, directory)


def load_hf(directory: str | Path) -> LoadedModel:
    """Read a Hugging Face model directory -> its family, config, params (nested dict of fp32 np.ndarray; QTensors
    for the quantized layers of a pre-quantized directory, summed up in `native` as {quant_method: {"tensors": n,
    "as": "QTensor int4 sym g128"}}) and the tokenizer of its `tokenizer.json` (None when it has none)."""
    family, cfg, lazy = open_hf(directory)
    tok_path = Path(directory) / "tokenizer.json"
    tokenizer = Tokenizer.from_file(tok_path) if tok_path.is_file() else None
    params = materialize(lazy)
    method = quant_method(read_config(directory)[1])
    native = None
    if method is not None:
        grids = [leaf.describe() for _, leaf in leaf_paths(params) if isinstance(leaf, QTensor)]
        native = {method: {"tensors": len(grids), "as": "QTensor " + ", ".join(sorted(set(grids)))}}
    return LoadedModel(family, cfg, params, tokenizer, str(directory), native)
