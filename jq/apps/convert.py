"""Streaming conversion: a GGUF file, a Hugging Face directory, a float Orbax checkpoint, a jq checkpoint or a
known model name → a jq checkpoint, one leaf at a time (read, quantize, write, free), so peak host memory is about
twice the largest tensor plus a fixed overhead, not the model. Recipes that need calibration data load the whole
model, calibrate, then write, unless they calibrate block by block only (GPTQ, AWQ, ...): then blocks are streamed
from the file (`jq.apps.convert_sequential`). The `jq convert` command."""

from __future__ import annotations

import ctypes
import functools
import os
import sys
import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint.experimental.v1 as ocp
from jax.sharding import SingleDeviceSharding

from jq.checkpoint.format import (META_FILE, CheckpointError, abstract_leaf, as_recipe, header, logical_shape,
                                  orbax_metadata)
from jq.checkpoint.reader import check_dir, load_leaf_host, read_checked
from jq.checkpoint.writer import Writer, check_destination, save
from jq.models.family import config_dict
from jq.models.io.gguf import open_gguf
from jq.models.io.hub import KNOWN_MODELS, resolve_model
from jq.models.io.lazy import LazyParam
from jq.models.io.safetensors import open_hf, read_config
from jq.numbers.qtensor import QTensor
from jq.tree.paths import path_str
from jq.tree.quantize import quantize_leaf
from jq.tree.recipe import QuantConfig

__all__ = ["convert"]


def _orbax_source(d: Path) -> tuple[str, list[LazyParam], dict[str, Any]]:
    """Leaves of a jq checkpoint (QTensors rebuilt) or of any plain Orbax PyTree checkpoint."""
    if (d / META_FILE).is_file():
        d, jqm = read_checked(d)
        leaves = []
        for p in jqm["paths"]:
            e = jqm["leaves"][p]
            dtype = e["dtype"] if e["kind"] == "qtensor" else e["arrays"]["value"]["dtype"]
            leaves.append(LazyParam(p, logical_shape(e), functools.partial(load_leaf_host, d, p, e), dtype))
        return "jq", leaves, {"source_meta": jqm.get("meta", {}), "source_recipe": jqm.get("recipe")}
    m = orbax_metadata(d)
    flat, _ = jax.tree_util.tree_flatten_with_path(m.metadata)
    placeholders = jax.tree.map(lambda _: ocp.PLACEHOLDER, m.metadata)

    def load_one(i: int):
        leaves_ = jax.tree_util.tree_leaves(placeholders, is_leaf=lambda x: x is ocp.PLACEHOLDER)
        v = flat[i][1]
        if type(v).__name__ != "NumpyMetadata" and hasattr(v, "shape") and hasattr(v, "dtype"):
            # a saved jax.Array: restore onto one local device, whatever sharding it was saved with
            v = jax.ShapeDtypeStruct(tuple(v.shape), v.dtype, sharding=SingleDeviceSharding(jax.devices()[0]))
        leaves_[i] = v
        abstract = jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(placeholders,
                                                                             is_leaf=lambda x: x is ocp.PLACEHOLDER),
                                                leaves_)
        try:
            got = ocp.load(d, abstract)
        except Exception as e:
            raise CheckpointError(f"{d}: leaf {path_str(flat[i][0])!r} cannot be read ({type(e).__name__}: "
                                  f"{str(e)[:300]})") from None
        return np.asarray(jax.tree_util.tree_leaves(got, is_leaf=lambda x: x is ocp.PLACEHOLDER)[i])

    leaves = [LazyParam(path_str(kp), tuple(v.shape), lambda i=i: load_one(i), np.dtype(v.dtype).name)
              for i, (kp, v) in enumerate(flat)]
    return "orbax", leaves, {}


def _open_source(src: str | os.PathLike, native: bool = False) -> tuple[str, list[LazyParam], dict[str, Any]]:
    """(kind, lazy leaves, metadata incl. "path": the absolute source and "prequantized": whether it holds QTensors)
    of a GGUF file (its legacy blocks and K-quants as QTensors with `native`), a Hugging Face directory (a GPTQ / AWQ
    / compressed-tensors one holds QTensors), an Orbax checkpoint, or a known model name
    (`jq.models.io.hub.KNOWN_MODELS`, fetched once like `jq eval` does)."""
    p = Path(src).expanduser().absolute()  # Orbax reads only absolute paths
    if not p.exists():
        if str(src) not in KNOWN_MODELS:
            raise FileNotFoundError(f"{src}: no such file or directory; pass a .gguf file, a Hugging Face directory "
                                    "(config.json + *.safetensors), an Orbax checkpoint directory or a known model "
                                    f"name ({', '.join(KNOWN_MODELS)})")
        p = resolve_model(str(src))
    if p.is_file() and p.suffix == ".gguf":
        family, cfg, lazy, _ = open_gguf(p, native)
        return "gguf", list(lazy), {"path": str(p), "model_family": family.name, "model_config": config_dict(cfg),
                                    "prequantized": native}
    if p.is_dir() and (p / "config.json").is_file():
        family, cfg, lazy = open_hf(p)
        return "hf", list(lazy), {"path": str(p), "model_family": family.name, "model_config": config_dict(cfg),
                                  "prequantized": bool(read_config(p)[1].get("quantization_config"))}
    if p.is_dir():
        check_dir(p)
        kind, leaves, info = _orbax_source(p)
        return kind, leaves, {"path": str(p), **info, "prequantized": kind == "jq"}
    raise ValueError(f"{p}: not a .gguf file, a Hugging Face directory (config.json + *.safetensors) or an Orbax "
                     "checkpoint directory")


def _plan(cfg: QuantConfig | None, leaves: Sequence[LazyParam], src: Path) -> list:
    """The rule for each leaf; refuses a recipe that quantizes nothing and warns about rules that match nothing."""
    if cfg is None:
        return [None] * len(leaves)
    rules = [cfg.rule_for(leaf.path, len(leaf.shape)) for leaf in leaves]
    if not any(r is not None and r.scheme is not None for r in rules):
        sample = ", ".join(leaf.path for leaf in leaves[:6])
        raise ValueError(
            f"recipe {cfg.name!r}: no rule matches a quantizable leaf of {src} ({len(leaves)} leaves: {sample}, ...); "
            "fix the rule patterns (they must fully match a path; `jq inspect` lists a checkpoint's paths)"
        )
    for r in cfg.rules:
        if not any(r is x for x in rules):
            warnings.warn(f"recipe {cfg.name!r}: rule pattern {r.pattern!r} matched no parameter of {src}",
                          stacklevel=3)
    return rules


def convert(src: str | os.PathLike, recipe: QuantConfig | Mapping | str | os.PathLike | None,
            out: str | os.PathLike, *, dequantize: bool = False, progress: bool = True,
            calib: np.ndarray | Sequence[str | os.PathLike] | None = None, calib_samples: int = 128,
            calib_len: int = 512, calib_seed: int = 0, calib_sampling: str = "windows", overwrite: bool = False,
            meta: Mapping[str, Any] | None = None, native: bool = False) -> Path:
    """Convert `src` by `recipe` into a checkpoint at `out`, streaming one leaf at a time.

    Host memory holds one leaf at a time: about twice the largest tensor plus a fixed overhead. To keep it there,
    the process is limited to 2 glibc malloc arenas from here on (unless MALLOC_ARENA_MAX is set) and freed memory
    is handed back to the OS after each leaf.

    Args:
      src: a float Orbax checkpoint (any PyTree checkpoint, or a jq one), a Hugging Face directory or a GGUF file of
        a registered model family, or a known model name (`jq.models.io.hub.KNOWN_MODELS`); relative paths are fine.
      recipe: a QuantConfig, a recipe dict or a YAML path; None for a source that holds QTensors already (a jq
        checkpoint, a GPTQ / AWQ / compressed-tensors directory, a GGUF file read `native`ly: stored as they are, or
        dequantized). With a recipe, such QTensors are kept and only float leaves are quantized.
      out: the checkpoint directory to create; nothing appears there until the conversion is complete. It is
        checked before any work (`check_destination`).
      dequantize: write float weights instead of QTensors: a jq checkpoint is dequantized; with a recipe the
        weights are quantized and dequantized (fake quantization), for runtimes that take float weights.
      progress: one line per leaf on stderr.
      calib: for recipes that need data (GPTQ, AWQ, ...): calibration token ids int32 [S, L], or text files
        (default: `jq.apps.data.default_calib_files()`), windowed by calib_samples / calib_len / calib_seed /
        calib_sampling (`jq.apps.data.calibration_tokens`).
        Only a GGUF / HF source (whose family has calibration blocks) can be run to collect statistics; block-wise
        recipes stream one block at a time (`jq.apps.convert_sequential`), others load the whole model.
      overwrite: replace an existing `out` (the old one stays until the new one is complete).
      meta: extra JSON metadata to store.
      native: read a GGUF source's legacy blocks and K-quants as the QTensors they are (`jq.models.io.gguf_native`).

    Returns:
      The absolute path of the written checkpoint.
    """
    _limit_arenas()
    cfg = as_recipe(recipe)
    check_destination(out, overwrite)  # before minutes of work, not after
    kind, leaves, info = _open_source(src, native)
    src_path = Path(info.pop("path"))
    if cfg is None and not info["prequantized"]:
        raise ValueError(f"{src_path} holds float weights: converting it needs a recipe (a YAML path such as "
                         "configs/rtn_w4_g128.yaml)" + ("; --native reads only GGUF files" if native else ""))
    info = {"source": str(src_path.absolute()), "source_format": kind, "dequantized": dequantize, **info,
            **dict(meta or {})}
    if cfg is not None and (cfg.needs_calibration or cfg.lowrank is not None):  # LoRC needs every weight: not streamed
        return _convert_calibrated(src_path, kind, cfg, out, dequantize=dequantize, progress=progress, calib=calib,
                                   samples=calib_samples, length=calib_len, seed=calib_seed,
                                   sampling=calib_sampling, overwrite=overwrite, meta=info)
    rules = _plan(cfg, leaves, src_path)
    w = Writer(out, header(cfg, info, [leaf.path for leaf in leaves]), overwrite=overwrite)
    t_all = time.perf_counter()
    try:
        for i, (leaf, rule) in enumerate(zip(leaves, rules)):
            t0 = time.perf_counter()
            x = leaf.load()
            if isinstance(x, QTensor):
                y = x.dequantize() if dequantize else x
            elif rule is not None and rule.scheme is not None:
                x = jnp.asarray(x)  # the host copy goes; quantizing reads the device (on CPU: host) copy
                y = quantize_leaf(leaf.path, x, rule)
                y = y.dequantize() if dequantize else jax.block_until_ready(y)
            else:
                y = x
            del x
            entry = w.add(leaf.path, y)
            del y
            _trim_heap()
            if progress:
                what = _describe(entry)
                print(f"[{i + 1:>{len(str(len(leaves)))}}/{len(leaves)}] {leaf.path}  {'×'.join(map(str, leaf.shape))}"
                      f"  {what}  {time.perf_counter() - t0:.2f} s", file=sys.stderr, flush=True)
        path = w.commit()
    except BaseException:
        w.abort()
        raise
    if progress:
        print(f"wrote {path} ({len(leaves)} leaves) in {time.perf_counter() - t_all:.1f} s", file=sys.stderr)
    return path


@functools.lru_cache(maxsize=1)
def _libc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc
        return None


def _limit_arenas() -> None:
    """At most 2 glibc malloc arenas from now on (unless MALLOC_ARENA_MAX is set): the threads Orbax, tensorstore and
    XLA create would otherwise each get an arena that keeps fragments of every leaf, and the RSS of a long
    conversion creeps up by a few hundred MB (measured in benchmarks/convert_memory.py)."""
    libc = _libc()
    if libc is not None and hasattr(libc, "mallopt") and "MALLOC_ARENA_MAX" not in os.environ:
        libc.mallopt(-8, 2)  # M_ARENA_MAX


def _trim_heap() -> None:
    """Give the memory the last leaf freed back to the OS. glibc keeps freed blocks in per-thread arenas (Orbax
    and XLA free from many threads), so without this a long conversion's RSS creeps up leaf by leaf."""
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def _describe(entry: Mapping[str, Any]) -> str:
    if entry["kind"] == "array":
        return f"{entry['arrays']['value']['dtype']} (kept)"
    return abstract_leaf(entry).describe()


def _open_lazy(src: Path, kind: str) -> tuple[Any, Any, list[LazyParam], Any]:
    """(family, config, lazy leaves, tokenizer or None) of a GGUF file or a Hugging Face directory."""
    from jq.models.io.tokenizer import Tokenizer

    if kind == "gguf":
        family, mcfg, lazy, gmeta = open_gguf(src)
        return family, mcfg, list(lazy), Tokenizer.from_gguf_metadata(gmeta)
    family, mcfg, lazy = open_hf(src)
    tok = src / "tokenizer.json"
    return family, mcfg, list(lazy), Tokenizer.from_file(tok) if tok.is_file() else None


def _convert_calibrated(src: Path, kind: str, cfg: QuantConfig, out, *, dequantize: bool, progress: bool, calib,
                        samples: int, length: int, seed: int, sampling: str, overwrite: bool,
                        meta: dict[str, Any]) -> Path:
    """Data-aware recipes. When the recipe's calibration needs only the blocks and the family describes them,
    block by block from the file (`jq.apps.convert_sequential`: about one block in memory); else (rotation,
    SmoothAttention, LoRC, a pre-quantized source) load the whole model, calibrate, quantize, then write."""
    methods = sorted({r.method for r in cfg.rules if r.scheme is not None and r.needs_calibration})
    methods += ["lowrank (LoRC)"] if cfg.lowrank is not None else []
    if kind not in ("gguf", "hf"):
        raise ValueError(
            f"recipe {cfg.name!r} needs calibration data (methods/transforms {methods}): jq collects it by running the "
            f"model, which it can load from a GGUF file or a Hugging Face directory, but {src} is an Orbax "
            "checkpoint. Convert from the original GGUF / Hugging Face model, or use a data-free recipe (rtn, hqq)"
        )
    from jq.apps import data, pipeline
    from jq.apps.convert_sequential import convert_sequential, streamable
    from jq.tree.quantize import dequantize_params

    m = None
    family, mcfg, lazy, tokenizer = _open_lazy(src, kind)
    if meta.get("prequantized") or not streamable(cfg, family):
        m = pipeline.load(str(src))
        tokenizer = m.tokenizer
    if calib is not None and not isinstance(calib, (str, os.PathLike)) and np.asarray(calib).dtype.kind in "iu":
        tokens = np.asarray(calib, np.int32)
        record = {"samples": int(tokens.shape[0]), "length": int(tokens.shape[1]), "files": None}  # given as ids
    else:
        files = [Path(calib)] if isinstance(calib, (str, os.PathLike)) else \
            [Path(f) for f in calib] if calib is not None else data.default_calib_files()
        if not files:
            raise ValueError(f"recipe {cfg.name!r} needs calibration text: pass calib=[FILE, ...] (--calib FILE ...)")
        for f in files:
            if not f.exists():
                raise FileNotFoundError(f"calibration file {f}: no such file")
        if tokenizer is None:
            raise ValueError(f"{src}: no tokenizer found (tokenizer.json in the directory, or a GGUF vocabulary); "
                             "pass calibration token ids instead of text")
        tokens, record = data.calibration_draw(tokenizer, files, samples, length, seed, sampling)
    if m is None:  # block by block from the file: about one block in memory (jq.apps.convert_sequential)
        return convert_sequential(family.block_spec(mcfg), lazy, cfg, tokens, out, meta={**meta, "calibration": record},
                                  dequantize=dequantize, progress=progress, overwrite=overwrite, trim=_trim_heap)
    t0 = time.perf_counter()
    q, _ = pipeline.quantize(m, cfg, tokens, progress=progress)
    if dequantize:
        q = dequantize_params(q)
    meta = {**meta, "calibration": record, "quantize_seconds": time.perf_counter() - t0}
    return save(out, q, recipe=cfg, meta=meta, overwrite=overwrite)
