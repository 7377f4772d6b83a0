"""`export_hf`: a jq-quantized parameter tree of a Llama-family model → a Hugging Face directory that transformers,
vLLM and GPTQModel load as shipped: config.json (LlamaForCausalLM + `quantization_config`) and model.safetensors in
GPTQ (v1 or v2 zero points), AWQ GEMM or compressed-tensors `pack-quantized` layout (docs/HF_QUANT.md). Quantized
layers are re-laid bit for bit (`jq.models.io.hfq`), never re-quantized; whatever the target cannot hold is refused
with the leaf's path and the reason before anything is written, and the directory appears only when complete.
`command` runs `jq export` (GGUF through `jq.models.io.gguf_write`, the Hugging Face formats through `export_hf`)."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
from safetensors.numpy import save_file

from jq.models.family import ModelFamily
from jq.models.io.gguf_write import export_gguf
from jq.models.io.hfq import awq, compressed, gptq
from jq.models.llama.config import hf_config as llama_hf_config
from jq.models.llama.weights import hf_name as llama_hf_name
from jq.numbers.lowrank import is_weight_leaf
from jq.tree.paths import leaf_paths

__all__ = ["TARGETS", "export_hf", "command"]

TARGETS = ("gptq", "gptq_v2", "awq", "compressed-tensors")
FLOAT_DTYPES = {"float16": np.float16, "bfloat16": ml_dtypes.bfloat16, "float32": np.float32}
# family name -> (parameter path -> HF tensor name, config -> config.json dict)
_HF_WRITERS: dict[str, tuple[Callable[[str, Any], str], Callable[[Any], dict[str, Any]]]] = {
    "llama": (llama_hf_name, llama_hf_config),
}


def _layer(q: Any, to: str, where: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """One quantized kernel → its tensors (by suffix) and scheme in format `to`."""
    if to in ("gptq", "gptq_v2"):
        return gptq.from_qtensor(q, checkpoint_format=to, name=where)
    if to == "awq":
        return awq.from_qtensor(q, name=where)
    return compressed.from_qtensor(q, name=where)


def _block_modules(modules: Sequence[str], n_layers: int) -> dict[int, set[str]]:
    """{layer index: names inside `model.layers.{i}.`} of `modules`."""
    out: dict[int, set[str]] = {i: set() for i in range(n_layers)}
    for m in modules:
        parts = m.split(".", 3)
        if parts[:2] == ["model", "layers"] and len(parts) == 4:
            out[int(parts[2])].add(parts[3])
    return out


def _quantization_config(to: str, schemes: dict[str, dict[str, Any]], floats: list[str], n_layers: int
                         ) -> dict[str, Any]:
    """The target's `quantization_config` for quantized modules `schemes` ({HF module: scheme}) and float linear
    modules `floats`."""
    if to == "compressed-tensors":
        return compressed.quantization_config(schemes, ignore=sorted(floats))
    if to == "awq":
        return awq.quantization_config(list(schemes.values()), modules_to_not_convert=sorted(floats) or None)
    per_layer = _block_modules(list(schemes), n_layers)
    kinds = {frozenset(v) for v in per_layer.values()}
    if len(kinds) != 1:
        raise ValueError(f"GPTQ export: the quantized linears differ between layers ({sorted(map(sorted, kinds))}); "
                         "GPTQ's modules_in_block_to_quantize is one list for every block: quantize the same "
                         "projections in every layer, or export compressed-tensors")
    extra: dict[str, Any] = {}
    if any(f.startswith("model.layers.") for f in floats):
        extra["modules_in_block_to_quantize"] = [sorted(kinds.pop())]
    if "lm_head" in schemes:
        extra["lm_head"] = True
    return gptq.quantization_config(list(schemes.values()), checkpoint_format=to, **extra)


def _tensors(params: Mapping[str, Any], cfg: Any, family: ModelFamily, to: str, float_dtype: str,
             hf_name: Callable[[str, Any], str]) -> tuple[dict[str, np.ndarray], dict[str, Any], list[str]]:
    """(HF tensors by name, {quantized module: scheme}, float linear modules) of `params`; ValueError naming the leaf
    for what the target cannot hold."""
    want = family.expected_shapes(cfg)
    leaves = dict(leaf_paths(params))
    missing = sorted(set(want) - set(leaves))
    if missing:
        raise ValueError(f"export: params lack {missing[:3]} ({len(missing)} of the {len(want)} parameters of this "
                         f"{family.name} config); pass the whole parameter tree of the model")
    tensors: dict[str, np.ndarray] = {}
    schemes: dict[str, dict[str, Any]] = {}
    floats: list[str] = []
    for path, leaf in leaves.items():
        name = hf_name(path, cfg)
        linear = path.endswith("kernel") and len(want.get(path, ())) == 2
        if is_weight_leaf(leaf):
            if not linear:
                raise ValueError(f"{path}: a quantized {type(leaf).__name__} that is not a linear kernel cannot be "
                                 f"stored in {to} (it quantizes linear layers only); keep {path} in float")
            module = name.removesuffix(".weight")
            layer, schemes[module] = _layer(leaf, to, f"{path} ({module})")
            tensors |= {f"{module}.{suffix}": np.ascontiguousarray(a) for suffix, a in layer.items()}
            continue
        w = np.asarray(leaf, np.float32)
        if tuple(w.shape) != tuple(want.get(path, w.shape)):
            raise ValueError(f"{path}: shape {w.shape}, expected {want[path]} for this {family.name} config")
        if linear:
            floats.append(name.removesuffix(".weight"))
            w = w.T
        tensors[name] = np.ascontiguousarray(w.astype(FLOAT_DTYPES[float_dtype]))
    return tensors, schemes, floats


def _replace(tmp: Path, out: Path) -> None:
    """Rename the complete `tmp` to `out`; an existing `out` is moved aside first and put back if that fails."""
    old = out.with_name(f"{tmp.name}.old") if out.exists() else None
    if old is not None:
        out.rename(old)
    try:
        tmp.rename(out)
    except BaseException:
        if old is not None:
            old.rename(out)
        raise
    if old is not None:
        shutil.rmtree(old)


def export_hf(params: Mapping[str, Any], cfg: Any, family: ModelFamily, out_dir: str | os.PathLike, to: str = "gptq",
              *, float_dtype: str = "float16", extra_files: Sequence[str | os.PathLike] = (),
              config_extra: Mapping[str, Any] | None = None, overwrite: bool = False) -> Path:
    """Write `params` (a jq-quantized tree of `family(cfg)`) as a Hugging Face directory in format `to`.

    Args:
      params: the model's parameter tree; QTensors at linear kernels ((in, out), contracted over axis 0, int codes
        the target holds), float arrays elsewhere.
      cfg, family: the model's config and family (families with a Hugging Face writer: llama).
      out_dir: the directory to create; written in a temporary sibling and renamed when complete.
      to: "gptq" (AutoGPTQ v1: zero points stored minus one), "gptq_v2" (zero points as is), "awq" (AutoAWQ GEMM,
        4-bit) or "compressed-tensors" (pack-quantized, 4 / 8 bits, one config group per distinct scheme).
      float_dtype: dtype of the float tensors (embeddings, norms, unquantized linears) and config.json torch_dtype.
      extra_files: files copied into the directory as they are (tokenizer.json, generation_config.json, ...).
      config_extra: keys added to config.json (e.g. bos_token_id / eos_token_id from the source config).
      overwrite: replace an existing `out_dir` (the old one stays until the new one is complete).

    Returns:
      The absolute path of the directory. Nothing is written when a leaf cannot be stored: the ValueError names its
      path, the reason and the fix (rotation / activation policies, LowRank corrections, non-int formats, bit widths,
      act order in AWQ, float zero points, ...).
    """
    if to not in TARGETS:
        raise ValueError(f"export target {to!r}; choose one of {TARGETS}")
    if float_dtype not in FLOAT_DTYPES:
        raise ValueError(f"float_dtype {float_dtype!r}; choose one of {list(FLOAT_DTYPES)}")
    if family.name not in _HF_WRITERS:
        raise ValueError(f"model family {family.name!r} has no Hugging Face writer; export_hf writes "
                         f"{sorted(_HF_WRITERS)} models")
    out = Path(out_dir).absolute()
    for f in map(Path, extra_files):
        if not f.is_file():
            raise FileNotFoundError(f"extra file {f}: no such file")
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; choose another directory or pass overwrite=True")
    hf_name, to_config = _HF_WRITERS[family.name]
    tensors, schemes, floats = _tensors(params, cfg, family, to, float_dtype, hf_name)
    config = {**to_config(cfg), "torch_dtype": float_dtype,
              "quantization_config": _quantization_config(to, schemes, floats, cfg.n_layers), **(config_extra or {})}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        for f in map(Path, extra_files):
            shutil.copyfile(f, tmp / f.name)
        _replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def command(args: argparse.Namespace, weights: tuple) -> int:
    """`jq export` (arguments as `jq.apps.cli` parses them; `weights` = its (model, params, config, KV cache,
    recipe)): GGUF for llama.cpp, or a Hugging Face directory in GPTQ / AWQ / compressed-tensors format, and what each
    tensor became."""
    out = Path(args.out)
    m, params, cfg, _, recipe = weights
    if args.to == "gguf":
        if not str(m.source).endswith(".gguf"):
            raise ValueError(f"--to gguf copies the tokenizer and metadata of the GGUF file the model was read from; "
                             f"{m.source} is not one (export it with --to gptq or compressed-tensors)")
        rows = export_gguf(params, cfg, m.family, m.source, out)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            extra = []
            if hasattr(getattr(m.tokenizer, "backend", None), "save"):
                m.tokenizer.backend.save(str(Path(tmp) / "tokenizer.json"))
                extra.append(Path(tmp) / "tokenizer.json")
            export_hf(params, cfg, m.family, out, to=args.to, float_dtype=args.float_dtype, extra_files=extra,
                      overwrite=args.overwrite)
        rows = []
        if args.float_dtype != "float32":
            print(f"float leaves (embeddings, norms, unquantized layers) written as {args.float_dtype}, rounded; "
                  "--float-dtype float32 keeps them exact", file=sys.stderr)
    exact = sum(r["exact"] for r in rows)
    info = {"out": str(out), "to": args.to, "recipe": recipe.name if recipe else args.quantized or
            ("native" if args.native else "float"), "bytes": sum(f.stat().st_size for f in
                                                                 ([out] if out.is_file() else out.rglob("*"))),
            "tensors": rows, "exact": exact}
    if args.json:
        print(json.dumps(info))
        return 0
    changed = [r for r in rows if not r["exact"]]
    for r in changed[:10]:
        print(f"  {r['path']}: {r['jq']} -> {r['gguf']} ({r['note']})")
    more = f" ({len(changed) - 10} more changed)" if len(changed) > 10 else ""
    summary = f"{exact}/{len(rows)} tensors exact{more}, " if rows else ""
    print(f"wrote {out} ({args.to}): {summary}{info['bytes'] / 1e6:.1f} MB")
    return 0
