"""Streaming sequential calibration: a calibrated recipe (GPTQ, AWQ, ...) over a model file whose leaves are read on
demand (`LazyParam`), so peak host memory is about one block, not the model.

    embed:   the leaves the family's `BlockSpec.embed` reads (Llama: the embedding) are loaded, the calibration
             tokens embedded, and those leaves dropped again;
    block i: its float leaves are loaded, calibrated and quantized by `jq.calibration.sequential.quantize_block` (the
             same code as the in-memory `quantize_sequential`, so the codes are identical), its quantized leaves
             written through the checkpoint `Writer` at once, and the float block freed;
    rest:    the leaves outside the blocks (embedding, final norm, LM head) are read, quantized without data and
             written one at a time.

Between blocks the hidden states of the calibration tokens are kept: samples × length × hidden × 4 bytes (8 × 128 ×
4096 × 4 B = 16 MiB; 128 × 2048 × 4096 × 4 B = 4 GiB). Above `act_bytes` they are offloaded to a NumPy memmap on
disk (next to the output) between blocks; inside a block, the stages' inputs for every batch are in memory (a few
times that size), as in `quantize_sequential`.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jq.calibration.sequential import BlockSpec, calibration_batches, quantize_block, rest_rule
from jq.checkpoint.format import header
from jq.checkpoint.writer import Writer
from jq.models.io.lazy import LazyParam
from jq.numbers.qtensor import QTensor
from jq.tree.paths import leaf_paths, set_path
from jq.tree.quantize import quantize_leaf
from jq.tree.recipe import QuantConfig

__all__ = ["convert_sequential", "streamable", "activation_bytes"]

ACT_BYTES = 1 << 30  # default bound on the hidden states kept in memory between blocks


def streamable(cfg: QuantConfig, family: Any) -> bool:
    """Whether `cfg` can run block by block over a float model of `family`: its calibrated rules need nothing but
    the blocks (no rotation, SmoothAttention or LoRC, which read the whole model) and the family describes its
    blocks."""
    return bool(cfg.rules_need_calibration and cfg.rotation is None and cfg.smooth_attention is None
                and cfg.lowrank is None and getattr(family, "block_spec", None) is not None)


def activation_bytes(tokens: np.ndarray, hidden: int) -> int:
    """Bytes of the hidden states kept between blocks: samples × length × hidden × 4 (float32)."""
    return int(np.prod(np.shape(tokens))) * hidden * 4


class _LazyTree(Mapping):
    """A read-only nested view of lazy leaves by path; a leaf is loaded (and kept in `loaded`) when first read."""

    def __init__(self, leaves: Mapping[str, LazyParam], prefix: str = "", loaded: dict | None = None):
        self._leaves, self._prefix = leaves, prefix
        self.loaded = {} if loaded is None else loaded

    def __getitem__(self, key: str) -> Any:
        path = f"{self._prefix}{key}"
        if path in self._leaves:
            if path not in self.loaded:
                self.loaded[path] = self._leaves[path].load()
            return self.loaded[path]
        if any(p.startswith(path + "/") for p in self._leaves):
            return _LazyTree(self._leaves, path + "/", self.loaded)
        raise KeyError(f"{path}: no such parameter in the source")

    def __iter__(self):
        seen = []
        for p in self._leaves:
            if p.startswith(self._prefix) and (k := p[len(self._prefix):].split("/")[0]) not in seen:
                seen.append(k)
        return iter(seen)

    def __len__(self) -> int:
        return sum(1 for _ in self)


def _offload(hs: list, where: Path, index: int) -> list[np.ndarray]:
    """The hidden states as read-only memmaps of .npy files under `where` (float32 round trip: exact)."""
    out = []
    for j, h in enumerate(hs):
        f = where / f"h{index % 2}_{j}.npy"  # two generations: the previous block's files may still be mapped
        mm = np.lib.format.open_memmap(f, mode="w+", dtype=np.asarray(h).dtype, shape=np.shape(h))
        mm[...] = np.asarray(h)
        mm.flush()
        del mm
        out.append(np.load(f, mmap_mode="r"))
    return out


def convert_sequential(spec: BlockSpec, leaves: Sequence[LazyParam], cfg: QuantConfig, tokens: np.ndarray,
                       out: str | Path, *, meta: Mapping[str, Any] | None = None, dequantize: bool = False,
                       progress: bool = True, overwrite: bool = False, batch_size: int = 8,
                       act_bytes: int = ACT_BYTES, trim: Callable[[], None] = lambda: None) -> Path:
    """Quantize lazy `leaves` by the calibrated recipe `cfg` block by block on `tokens` [S, L] and write the
    checkpoint `out` as the blocks finish (module docstring). Same codes as `quantize_sequential`.

    spec: the family's BlockSpec for the source's config; leaves under a block's name ("layers_3/...") form that
    block. act_bytes: above it, the hidden states between blocks live in a memmap on disk. trim: called after each
    block is freed (`jq.apps.convert` hands back freed heap to the OS). meta gets "quantize_seconds" and
    "peak_activation_bytes". Returns the checkpoint path.
    """
    t_all = time.perf_counter()
    by_path = {leaf.path: leaf for leaf in leaves}
    names = set(spec.names)
    blocks: dict[str, list[LazyParam]] = {n: [] for n in spec.names}
    rest: list[LazyParam] = []
    for leaf in leaves:
        (blocks[leaf.path.split("/")[0]] if leaf.path.split("/")[0] in names else rest).append(leaf)
    missing = [n for n, b in blocks.items() if not b]
    if missing:
        raise ValueError(f"the source has no leaves for blocks {missing[:3]} (leaves: {', '.join(list(by_path)[:4])}, "
                         "...); it does not match its family's block layout")
    rest_rules = [rest_rule(cfg, leaf.path, len(leaf.shape)) for leaf in rest]  # refuse before any work
    batches, extras = calibration_batches(spec, tokens, batch_size)
    view = _LazyTree(by_path)
    hs = [spec.embed(view, b) for b in batches]
    act = sum(int(np.prod(h.shape)) * h.dtype.itemsize for h in hs)
    view.loaded.clear()
    spill = Path(tempfile.mkdtemp(prefix=".jq-acts-", dir=Path(out).absolute().parent)) if act > act_bytes else None
    w = Writer(out, header(cfg, dict(meta or {}), [leaf.path for leaf in leaves]), overwrite=overwrite)
    compiled: dict = {}
    log: dict[str, Any] = {"blocks": [], "transforms": []}
    try:
        for i, name in enumerate(spec.names):
            t0 = time.perf_counter()
            block: dict = {}
            for leaf in blocks[name]:
                set_path(block, leaf.path[len(name) + 1:], leaf.load())
            block, hs = quantize_block(spec, i, block, cfg, hs, extras, compiled, log)
            hs = jax.block_until_ready(hs)
            for p, y in leaf_paths(block):
                w.add(f"{name}/{p}", y.dequantize() if dequantize and isinstance(y, QTensor) else y)
            del block
            if spill is not None:
                hs = _offload(hs, spill, i)
            trim()
            secs = time.perf_counter() - t0
            log["blocks"].append({"block": name, "seconds": secs})
            if progress:
                print(f"  calibrated and wrote {name} ({i + 1}/{len(spec.names)}) in {secs:.1f} s", file=sys.stderr,
                      flush=True)
        del hs
        for leaf, rule in zip(rest, rest_rules):
            x = leaf.load()
            if rule is not None and rule.scheme is not None:
                x = quantize_leaf(leaf.path, jnp.asarray(x), rule)
                x = x.dequantize() if dequantize else x
            w.add(leaf.path, x)
            del x
            trim()
        w.header["meta"] |= {"quantize_seconds": time.perf_counter() - t_all, "peak_activation_bytes": act,
                             "activations_offloaded": spill is not None, "streamed": True,
                             "transforms": log["transforms"]}
        path = w.commit()
    except BaseException:
        w.abort()
        raise
    finally:
        if spill is not None:
            shutil.rmtree(spill, ignore_errors=True)
    if progress:
        print(f"wrote {path} ({len(leaves)} leaves, block by block) in {time.perf_counter() - t_all:.1f} s",
              file=sys.stderr)
    return path
