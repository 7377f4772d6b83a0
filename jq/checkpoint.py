"""Orbax checkpoints of (quantized) parameter trees: the documented on-disk format, sharded restore, integrity
checks and streaming conversion. The format is specified in docs/FORMAT.md; in short:

    NAME/jq_checkpoint.json    {"format": "jq-quantized-pytree", "format_version": "1.0", "jq_version", "recipe" (the
                               recipe dict), "meta", "paths" (every leaf, in order), "leaves": {path: per-leaf
                               metadata: kind, fmt, layout, dtype, ..., array specs with CRC-32, "item"}}
    NAME/arrays/ITEM/          one Orbax checkpoint per leaf: {"value": array} for a float leaf, {"codes", "scale"
                               [, "zero"][, "perm"]} for a QTensor

Writing streams: each leaf is saved (an ordinary Orbax save, committed by Orbax) into a hidden staging directory
`.NAME.jq-tmp/` as soon as it is converted and then freed; `jq_checkpoint.json` is written last and the staging
directory renamed to NAME. So a directory at NAME is always complete; an interrupted write leaves only the staging
directory, which the next write to NAME removes. (One Orbax checkpoint per leaf rather than one Orbax *partial
save* session: Orbax 0.12's partial saves re-read and merge every earlier save's metadata on each save, which is
cubic in the number of leaves — minutes for a few hundred.) `convert` reads its source one leaf at a time too
(safetensors headers, a memory-mapped GGUF, Orbax partial restores), so peak host memory is about twice the
largest tensor plus a fixed overhead, not the model.

Layering: this module is layer 6 (it imports layers 1-4 and Orbax). Reading GGUF / Hugging Face files needs the
Llama name mapping of layer 7 (`jq.models`); `convert` imports it inside the function, only for those sources,
the one place this module reaches up (see the checkpoint issue note).
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import errno
import functools
import gc
import json
import logging
import os
import re
import shutil
import sys
import time
import warnings
import zlib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint.experimental.v1 as ocp
from jax.sharding import NamedSharding, PartitionSpec, Sharding, SingleDeviceSharding

from jq._version import __version__
from jq.tree.recipe import QuantConfig, load_recipe, recipe_from_dict, recipe_to_dict
from jq.numbers.qtensor import Layout, QTensor
from jq.tree.quantize import leaf_paths, path_str, quantize_leaf

__all__ = ["FORMAT", "FORMAT_VERSION", "META_FILE", "CheckpointError", "SourceLeaf", "save", "load", "read_meta",
           "abstract_tree", "verify", "convert", "check_destination"]

FORMAT = "jq-quantized-pytree"
FORMAT_VERSION = "1.1"  # major.minor: a reader refuses a newer major; a newer minor only adds fields it may ignore
# 1.1 adds "header_crc32": the CRC-32 of the metadata itself (a 1.0 checkpoint, without it, still reads)
_READS_MAJOR = 1
_FIELDS = tuple(f.name for f in dataclasses.fields(QTensor) if not f.metadata.get("static"))  # codes, scale, zero, perm
# QTensor's static fields but the layout (fmt, symmetric, restricted, dtype, rotation, act, act_clip, ...): stored
# under their own names, so a field QTensor gains is stored without a format change (a reader fills absent ones in
# with their defaults and ignores unknown ones)
_STATIC = tuple(f.name for f in dataclasses.fields(QTensor) if f.metadata.get("static") and f.name != "layout")
_TMP, _OLD, _LOCK = ".jq-tmp", ".jq-old", ".jq-lock"
META_FILE = "jq_checkpoint.json"
_ARRAYS = "arrays"
_CHUNK_BYTES = 64 << 20  # storage chunks: partial and sharded reads touch only the chunks they need
_HEADER_CRC = "header_crc32"


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, is damaged, or does not match what was asked. The message names the
    directory (and leaf), what was found, and what to do."""


# ------------------------------------------------------------------------------------------------ metadata


def _spec(a: np.ndarray) -> dict[str, Any]:
    """{"shape", "dtype", "crc32"} of one stored array (crc32 of its C-order bytes)."""
    return {"shape": list(a.shape), "dtype": a.dtype.name, "crc32": _crc32(a)}


def _crc32(a: np.ndarray) -> int:
    return zlib.crc32(np.ascontiguousarray(a).reshape(-1).view(np.uint8))


def _layout_dict(lay: Layout) -> dict[str, Any]:
    """Every Layout field (shape, axes, granularity, group_size, padded, flat, ...) under its own name."""
    return {f.name: _jsonable(getattr(lay, f.name)) for f in dataclasses.fields(Layout)}


def _layout(d: Mapping[str, Any]) -> Layout:
    names = {f.name for f in dataclasses.fields(Layout)}
    return Layout(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in names})


def _to_numpy(path: str, x: Any) -> np.ndarray:
    """A leaf value as a host array (gathers a sharded jax.Array); errors name the path."""
    if isinstance(x, (str, bytes)) or x is None:
        raise ValueError(f"{path}: leaf {x!r} is not an array; checkpoints hold arrays (and QTensors) only")
    a = np.asarray(jax.device_get(x))
    if a.dtype == object:
        raise ValueError(f"{path}: leaf of type {type(x).__name__} is not an array; checkpoints hold arrays only")
    return a


def _leaf_record(path: str, x: Any) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(per-leaf metadata, the leaf's stored arrays by field: {"value": a} for an array, codes/scale/... for a
    QTensor)."""
    if isinstance(x, QTensor):
        arrays = {f: _to_numpy(f"{path}/{f}", getattr(x, f)) for f in _FIELDS if getattr(x, f) is not None}
        entry = {"kind": "qtensor", **{k: _jsonable(getattr(x, k)) for k in _STATIC}, "layout": _layout_dict(x.layout),
                 "arrays": {f: _spec(a) for f, a in arrays.items()}}
        return entry, arrays
    a = _to_numpy(path, x)
    return {"kind": "array", "arrays": {"value": _spec(a)}}, {"value": a}


def _stored(entry: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The arrays a leaf's metadata describes: {field: {"shape", "dtype", "crc32"}}."""
    return entry["arrays"]


def _logical_shape(entry: Mapping[str, Any]) -> tuple[int, ...]:
    return tuple(entry["layout"]["shape"] if entry["kind"] == "qtensor" else entry["arrays"]["value"]["shape"])


def _value(entry: Mapping[str, Any], arrays: Mapping[str, Any]):
    """A leaf from its stored arrays: the QTensor, or the array."""
    return _qtensor(entry, arrays) if entry["kind"] == "qtensor" else arrays["value"]


def _jsonable(v: Any) -> Any:
    if isinstance(v, tuple):
        return [_jsonable(x) for x in v]
    if isinstance(v, (np.generic,)):
        return v.item()
    return v


def _qtensor(entry: Mapping[str, Any], arrays: Mapping[str, Any]) -> QTensor:
    static = {k: tuple(entry[k]) if isinstance(entry[k], list) else entry[k] for k in _STATIC if k in entry}
    return QTensor(codes=arrays["codes"], scale=arrays["scale"], zero=arrays.get("zero"), perm=arrays.get("perm"),
                   layout=_layout(entry["layout"]), **static)


def _abstract_leaf(entry: Mapping[str, Any], shardings: Mapping[str, Sharding | None] | None = None):
    """The leaf as jax.ShapeDtypeStructs (a QTensor of them for a quantized leaf), optionally with shardings."""
    shardings = shardings or {}
    return _value(entry, {f: jax.ShapeDtypeStruct(tuple(s["shape"]), jnp.dtype(s["dtype"]), sharding=shardings.get(f))
                          for f, s in _stored(entry).items()})


def _nest(items: Sequence[tuple[str, Any]]) -> dict[str, Any]:
    """[("a/b", x), ...] -> {"a": {"b": x}}; errors on a path that is both a leaf and a prefix."""
    tree: dict[str, Any] = {}
    for path, v in items:
        *heads, last = path.split("/")
        node = tree
        for h in heads:
            node = node.setdefault(h, {})
            if not isinstance(node, dict):
                raise ValueError(f"{path}: {h!r} is both a leaf and a subtree; leaf paths must be unique")
        node[last] = v
    return tree


def _check_paths(items: Sequence[tuple[str, Any]], keypaths: Sequence[tuple]) -> None:
    for (path, _), kp in zip(items, keypaths):
        if not path:
            raise ValueError("a checkpoint holds a tree of named leaves (e.g. {'params': ...}), not a bare array")
        bad = [k for k in kp if "/" in str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", ""))))]
        if bad:
            raise ValueError(f"{path}: key {bad[0]} contains '/', which the checkpoint uses to join paths; rename it")


def _header_crc(m: Mapping[str, Any]) -> int:
    """CRC-32 of the metadata without its own CRC field, over canonical JSON (sorted keys, no spaces), so that a
    damaged byte anywhere in jq_checkpoint.json — a shape, a layout field, the recipe — is caught on load."""
    body = {k: v for k, v in m.items() if k != _HEADER_CRC}
    return zlib.crc32(json.dumps(body, sort_keys=True, separators=(",", ":")).encode())


def _sealed(m: dict[str, Any]) -> dict[str, Any]:
    """`m` with its header CRC (computed on the JSON round trip of `m`, which is what a reader sees)."""
    m = json.loads(json.dumps(m))
    m[_HEADER_CRC] = _header_crc(m)
    return m


def _header(recipe: QuantConfig | None, meta: Mapping[str, Any] | None, paths: list[str]) -> dict[str, Any]:
    """The checkpoint-level metadata (everything of jq_checkpoint.json but the leaves)."""
    h = {"format": FORMAT, "format_version": FORMAT_VERSION, "jq_version": __version__,
         "recipe": recipe_to_dict(recipe) if recipe is not None else None, "meta": dict(meta or {}), "paths": paths}
    try:
        json.dumps(h)
    except (TypeError, ValueError) as e:
        raise ValueError(f"checkpoint meta must be JSON-serializable ({e}); pass strings, numbers, lists and dicts") from None
    return h


def _as_recipe(recipe: QuantConfig | Mapping | str | os.PathLike | None) -> QuantConfig | None:
    if recipe is None or isinstance(recipe, QuantConfig):
        return recipe
    if isinstance(recipe, Mapping):
        return recipe_from_dict(dict(recipe))
    return load_recipe(recipe)


# -------------------------------------------------------------------------------------------------- writing


@contextlib.contextmanager
def _quiet_storage():
    """Silence the records Orbax and asyncio log (whole tracebacks, from worker threads and from failed tasks
    when they are collected) for a failure that jq reports itself, as one message naming the leaf and the fix.
    Yields a callable to mark the block as failed when the failure is a returned None rather than an exception."""
    logs = [logging.getLogger(n) for n in ("absl", "asyncio")]
    levels = [log.level for log in logs]
    failed = []
    for log in logs:
        log.setLevel(logging.CRITICAL)
    try:
        yield lambda: failed.append(True)
    except BaseException:
        failed.append(True)
        raise
    finally:
        if failed:
            gc.collect()  # failed asyncio tasks log when collected: collect them while silenced
        for log, level in zip(logs, levels):
            log.setLevel(level)


def _write_leaf(item: Path, arrays: dict[str, np.ndarray]) -> None:
    """One leaf's arrays as an Orbax checkpoint at `item` (Orbax commits it atomically). Tests replace this to
    interrupt or fail a write."""
    ctx = ocp.Context()
    ctx.array.saving.storage_options.chunk_byte_size = _CHUNK_BYTES
    ctx.memory.deepcopy_host_arrays = False  # the arrays are ours and never mutated: no second host copy
    with ctx, _quiet_storage():
        ocp.save(item, arrays)


def _no_space(e: BaseException) -> bool:
    return (isinstance(e, OSError) and e.errno == errno.ENOSPC) or any(
        s in str(e) for s in ("No space left on device", "RESOURCE_EXHAUSTED"))


def _item_name(i: int, path: str) -> str:
    """The directory name of leaf `i`: its index and a readable, file-name-safe form of its path."""
    return f"{i:05d}-" + re.sub(r"[^A-Za-z0-9_.-]+", "_", path.replace("/", "."))[:96]


def _write_json(path: Path, obj: Any) -> None:
    """Write JSON durably: to a sibling temporary file, fsync, rename."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_dir(d: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(d, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _is_checkpoint_dir(d: Path) -> bool:
    """A directory jq wrote: its metadata file names the jq format (it need not be intact to be replaced)."""
    try:
        return d.is_dir() and json.loads((d / META_FILE).read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def check_destination(out: str | os.PathLike, overwrite: bool = False) -> Path:
    """Refuse, before any work, an output path a write would fail on or must not replace; returns it absolute.

    Free: a path that does not exist, or an empty directory. Existing: refused unless `overwrite`, and then only a
    jq checkpoint is replaced — never a file or another directory (whose contents would be lost). Raises
    FileExistsError naming the path, what is there, and the fix.
    """
    out = Path(out).absolute()
    if not out.exists() and not out.is_symlink():
        if out.parent.exists() and not out.parent.is_dir():
            raise NotADirectoryError(f"{out}: its parent {out.parent} is a file; choose an output directory "
                                     "whose parent is a directory")
        return out
    if out.is_dir() and not out.is_symlink() and not any(out.iterdir()):
        return out
    if not out.is_dir() or out.is_symlink():
        raise FileExistsError(f"{out} is a {'symbolic link' if out.is_symlink() else 'file'}, not a jq checkpoint; "
                              "--overwrite (overwrite=True) replaces only a checkpoint directory. Choose another "
                              "output path, or move it away yourself")
    if not _is_checkpoint_dir(out):
        held = sorted(p.name for p in out.iterdir())
        raise FileExistsError(f"{out} is a directory that is not a jq checkpoint (it holds {', '.join(held[:3])}"
                              f"{', ...' if len(held) > 3 else ''}); jq replaces only a checkpoint it wrote. Choose "
                              "another output directory")
    if not overwrite:
        raise FileExistsError(f"{out} already exists (a jq checkpoint); choose another output directory or pass "
                              "overwrite=True (--overwrite) to replace it")
    return out


class _Writer:
    """Streams leaves into `out`: one Orbax checkpoint per leaf in the hidden staging directory `.NAME.jq-tmp`,
    then `jq_checkpoint.json`, then a rename to `out`.

    Nothing appears at `out` before `commit()`; `abort()` (or a killed process, cleaned by the next writer)
    leaves `out` as it was. One writer per `out` at a time (an flock on `.NAME.jq-lock`).
    """

    def __init__(self, out: str | os.PathLike, header: dict[str, Any], *, overwrite: bool = False):
        self.out = Path(out).absolute()
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.staging = self.out.parent / f".{self.out.name}{_TMP}"
        self.old = self.out.parent / f".{self.out.name}{_OLD}"
        self._lock = self._acquire_lock()
        try:
            self._clean_stale()
            check_destination(self.out, overwrite)
            (self.staging / _ARRAYS).mkdir(parents=True)
        except BaseException:
            self._release_lock()
            raise
        self.header = header
        self.leaves: dict[str, dict[str, Any]] = {}

    def _acquire_lock(self):
        lock_path = self.out.parent / f".{self.out.name}{_LOCK}"
        fh = open(lock_path, "w")
        try:
            import fcntl

            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except ImportError:  # no flock (Windows): single writer assumed
            pass
        except OSError:
            fh.close()
            raise RuntimeError(f"another process is writing {self.out} (it holds {lock_path}); wait for it to "
                               "finish or stop it, then run again") from None
        return fh

    def _release_lock(self) -> None:
        if self._lock is not None:
            Path(self._lock.name).unlink(missing_ok=True)
            self._lock.close()
            self._lock = None

    def _clean_stale(self) -> None:
        """Undo what an interrupted earlier write to `out` left: its staging directory goes; an old checkpoint set
        aside (`.NAME.jq-old`) is put back if the process died between the two renames of a commit, else goes."""
        if self.old.is_dir() and not self.out.exists():
            os.rename(self.old, self.out)
            warnings.warn(f"{self.out}: an earlier write was interrupted while replacing this checkpoint; the old "
                          "checkpoint was put back", stacklevel=4)
        for p in (self.staging, self.old):
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()

    def _left(self) -> str:
        """What a failed write leaves at `out`, for messages."""
        if self.out.exists():
            return f"the existing checkpoint at {self.out} is unchanged"
        return f"nothing was written at {self.out}"

    def add(self, path: str, value: Any) -> dict[str, Any]:
        """Write one leaf (an array or a QTensor); returns its metadata entry."""
        if path in self.leaves:
            raise ValueError(f"{path}: written twice to {self.out}")
        entry, arrays = _leaf_record(path, value)
        entry["item"] = _item_name(len(self.leaves), path)
        try:
            _write_leaf(self.staging / _ARRAYS / entry["item"], arrays)
        except Exception as e:
            if _no_space(e):
                nbytes = sum(a.nbytes for a in arrays.values())
                raise OSError(errno.ENOSPC, f"no space left on device while writing leaf {path!r} "
                              f"({nbytes / 1e6:.1f} MB) of {self.out}; {self._left()}. Free space on "
                              f"{self.out.parent} and run again") from None
            raise
        self.leaves[path] = entry
        return entry

    def commit(self) -> Path:
        """Write jq_checkpoint.json and rename the staging directory to `out` (replacing an old checkpoint, which is
        kept aside until the new one is in place)."""
        missing = [p for p in self.header["paths"] if p not in self.leaves]
        if missing or not self.leaves:
            raise ValueError(f"{self.out}: {len(missing)} planned leaves were not written (first: {missing[:1]}); "
                             "nothing was committed" if missing else f"nothing to write to {self.out}: no leaves")
        try:
            _write_json(self.staging / META_FILE, _sealed({**self.header, "leaves": self.leaves}))
        except OSError as e:
            if _no_space(e):
                raise OSError(errno.ENOSPC, f"no space left on device while committing {self.out}; {self._left()}. "
                              f"Free space on {self.out.parent} and run again") from None
            raise
        _fsync_dir(self.staging)
        replaced = self.out.exists()
        if replaced:
            os.rename(self.out, self.old)
        os.rename(self.staging, self.out)
        _fsync_dir(self.out.parent)
        self._release_lock()
        if replaced:
            try:
                shutil.rmtree(self.old)
            except OSError as e:  # the new checkpoint is in place: say what is left, do not fail the write
                warnings.warn(f"wrote {self.out}, but the checkpoint it replaced could not be removed from "
                              f"{self.old} ({e}); delete that directory yourself", stacklevel=3)
        return self.out

    def abort(self) -> None:
        """Remove everything this write created; `out` (if it existed before) is left as it was."""
        try:
            if self.old.is_dir() and not self.out.exists():  # failed between a commit's two renames
                os.rename(self.old, self.out)
            if self.staging.is_dir():
                shutil.rmtree(self.staging)
        finally:
            self._release_lock()


def save(directory: str | os.PathLike, qparams: Any, *, recipe: QuantConfig | Mapping | str | None = None,
         meta: Mapping[str, Any] | None = None, overwrite: bool = False) -> Path:
    """Write a parameter tree (arrays and QTensors) to `directory` in the documented format (docs/FORMAT.md).

    Args:
      directory: the checkpoint directory to create: a new path or an empty directory; with `overwrite`, also an
        existing jq checkpoint (never a file or another directory: `check_destination`).
      qparams: a pytree (nested dicts, an NNX State, ...) of arrays / QTensors; sharded jax.Arrays are gathered
        to the host one leaf at a time.
      recipe: the recipe that produced it (a QuantConfig, a recipe dict or a YAML path), stored as a dict.
      meta: JSON-serializable extra metadata (model, source, timings, ...).
      overwrite: replace an existing checkpoint at `directory` (the old one stays until the new one is complete).

    Returns:
      The absolute path of the checkpoint.
    """
    flat, _ = jax.tree_util.tree_flatten_with_path(qparams, is_leaf=lambda x: isinstance(x, QTensor))
    items = leaf_paths(qparams)
    _check_paths(items, [kp for kp, _ in flat])
    _nest([(p, None) for p, _ in items])  # fail on ambiguous paths before anything is written
    w = _Writer(directory, _header(_as_recipe(recipe), meta, [p for p, _ in items]), overwrite=overwrite)
    try:
        for path, x in items:
            w.add(path, x)
        return w.commit()
    except BaseException:
        w.abort()
        raise


# -------------------------------------------------------------------------------------------------- reading


def _orbax_metadata(d: Path, what: str = ""):
    try:
        with _quiet_storage() as failed:
            m = ocp.metadata(d)
            if getattr(m, "metadata", None) is None:  # Orbax logs the error and returns None
                failed()
            return m
    except Exception as e:  # Orbax / tensorstore raise many types for a damaged or foreign directory
        raise CheckpointError(
            f"{d}{what} is not a readable Orbax checkpoint ({type(e).__name__}: {str(e)[:300]}); it is damaged, "
            "unfinished or not a checkpoint. Write it again (jq convert / jq quantize --out)"
        ) from None


def _check_dir(d: Path) -> None:
    if not d.exists():
        raise FileNotFoundError(f"{d}: no such checkpoint directory; pass a directory written by `jq convert`, "
                                "`jq quantize --out` or jq.checkpoint.save")
    if not d.is_dir():
        raise CheckpointError(f"{d} is a file, not a checkpoint directory")
    if any(part.endswith((_TMP, _OLD)) for part in d.absolute().parts):
        raise CheckpointError(f"{d} is (inside) the temporary directory of an unfinished write, not a checkpoint; "
                              "run the write again (it removes this directory)")


def _version_ok(d: Path, v: Any) -> None:
    try:
        major, _minor = (int(x) for x in str(v).split("."))
    except ValueError:
        raise CheckpointError(f"{d}: format_version {v!r} is not of the form 'major.minor'; the metadata is damaged") from None
    if major > _READS_MAJOR:
        raise CheckpointError(
            f"{d}: format version {v} is newer than this jq reads ({_READS_MAJOR}.x, jq {__version__}); upgrade jq "
            "to read this checkpoint"
        )


def _read(directory: str | os.PathLike) -> tuple[Path, dict[str, Any]]:
    """(absolute dir, validated jq metadata): format, version, the metadata's own CRC-32 (format 1.1 on), and a
    complete, consistent leaf table. Absolute, because Orbax reads only absolute paths."""
    d = Path(directory).absolute()
    _check_dir(d)
    mf = d / META_FILE
    if not mf.is_file():
        if (d / "_CHECKPOINT_METADATA").exists():
            raise CheckpointError(f"{d} is an Orbax checkpoint without jq metadata (a plain float checkpoint?); "
                                  f"convert it first: `jq convert --in {d} --recipe R.yaml --out OUT`")
        raise CheckpointError(f"{d} is not a jq checkpoint: {META_FILE} is missing (a foreign directory, or one "
                              "damaged); write it with jq convert / jq quantize --out")
    try:
        jqm = json.loads(mf.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{mf} is not valid JSON ({e}); the checkpoint is damaged, write it again") from None
    if not isinstance(jqm, dict) or jqm.get("format") != FORMAT:
        got = jqm.get("format") if isinstance(jqm, dict) else type(jqm).__name__
        raise CheckpointError(f"{mf}: format {got!r} is not {FORMAT!r}; not a jq checkpoint")
    _version_ok(d, jqm.get("format_version"))
    if _HEADER_CRC in jqm and _header_crc(jqm) != jqm[_HEADER_CRC]:
        rec = jqm[_HEADER_CRC]
        raise CheckpointError(f"{mf}: CRC-32 {_header_crc(jqm):#010x} of the metadata differs from the recorded "
                              f"{rec:#010x}" if isinstance(rec, int) else f"{rec!r}"
                              "; the metadata is damaged (or was edited), write the checkpoint again")
    paths, leaves = jqm.get("paths"), jqm.get("leaves")
    if not isinstance(paths, list) or not isinstance(leaves, dict):
        raise CheckpointError(f"{mf} lacks 'paths' or 'leaves'; the checkpoint is damaged, write it again")
    missing = [p for p in paths if p not in leaves]
    if missing:
        raise CheckpointError(f"{d}: {len(missing)} of {len(paths)} leaves have no metadata (first: {missing[0]!r}); "
                              "the checkpoint is incomplete, write it again")
    return d, jqm


def read_meta(directory: str | os.PathLike) -> dict[str, Any]:
    """The jq metadata of a checkpoint, validated: {"format", "format_version", "jq_version", "recipe", "meta",
    "paths", "leaves"} (see docs/FORMAT.md). Refuses a newer major format version."""
    return _read(directory)[1]


def _item(d: Path, path: str, entry: Mapping[str, Any]) -> Path:
    item = d / _ARRAYS / str(entry.get("item", ""))
    if not entry.get("item") or not item.is_dir():
        raise CheckpointError(f"{d}: leaf {path!r}: its arrays directory {item} is missing; the checkpoint is "
                              "truncated or damaged, write it again")
    return item


def _check_leaf(d: Path, path: str, entry: Mapping[str, Any]) -> Path:
    """The leaf's Orbax checkpoint holds exactly the arrays its metadata describes, with their shapes and dtypes,
    and a QTensor's arrays fit its layout. Returns the leaf's directory."""
    item = _item(d, path, entry)
    stored = _orbax_metadata(item, f" (leaf {path!r})").metadata
    specs = _stored(entry)
    if stored is None:
        raise CheckpointError(f"{d}: leaf {path!r}: Orbax cannot read the index of its arrays (files under {item} "
                              "are damaged or missing); the checkpoint is damaged, write it again")
    if not isinstance(stored, Mapping) or set(stored) != set(specs):
        got = sorted(stored) if isinstance(stored, Mapping) else type(stored).__name__
        raise CheckpointError(f"{d}: leaf {path!r} stores {got} but its metadata describes {sorted(specs)}; a "
                              "foreign or damaged checkpoint")
    for f, spec in specs.items():
        got = stored[f]
        if tuple(got.shape) != tuple(spec["shape"]) or np.dtype(got.dtype).name != spec["dtype"]:
            what = f"leaf {path!r}" + (f" array {f!r}" if entry["kind"] == "qtensor" else "")
            raise CheckpointError(f"{d}: {what} is stored as {np.dtype(got.dtype).name}{list(got.shape)} but the "
                                  f"metadata says {spec['dtype']}{spec['shape']}; the checkpoint is damaged")
    if entry["kind"] == "qtensor":
        try:
            _abstract_leaf(entry).check(f"{d}: {path}")
        except Exception as e:
            raise CheckpointError(str(e)) from None
    return item


def abstract_tree(directory: str | os.PathLike) -> dict[str, Any]:
    """The checkpoint's tree without reading arrays (metadata only): nested dicts of jax.ShapeDtypeStruct leaves and
    QTensors of them (what `jax.eval_shape` of the quantized tree gives). Feed it to `jq.report`, or use it as a
    `target`."""
    d, jqm = _read(directory)
    return _nest([(p, _abstract_leaf(jqm["leaves"][p])) for p in jqm["paths"]])


# -- shardings --------------------------------------------------------------------------------------------


def _is_spec(x: Any) -> bool:
    """A leaf of a shardings tree: a spec, None, a target QTensor, or a per-field dict {"codes": ..., ...}."""
    return x is None or isinstance(x, (PartitionSpec, Sharding, QTensor)) or (
        isinstance(x, Mapping) and "codes" in x and set(x) <= set(_FIELDS))


def _fit(spec: PartitionSpec, shape: tuple[int, ...], mesh) -> PartitionSpec:
    """`spec` for an array of `shape`: entries for dims the mesh axes do not divide (or that it lacks) dropped."""
    out = []
    for i, dim in enumerate(shape):
        e = spec[i] if i < len(spec) else None
        if e is not None:
            names = e if isinstance(e, tuple) else (e,)
            size = int(np.prod([mesh.shape[n] for n in names]))
            if dim % size:
                e = None
        out.append(e)
    return PartitionSpec(*out)


def _leaf_shardings(path: str, entry: Mapping[str, Any], spec: Any, mesh) -> dict[str, Sharding]:
    """Per stored array of one leaf: the sharding to restore it with.

    `spec` is for the logical weight: a PartitionSpec (needs `mesh`) or a Sharding; for a QTensor a
    NamedSharding applies to codes / scale / zero (same rank as the weight; dims its mesh axes do not divide are
    replicated), while `perm` and flat layouts are replicated; another Sharding is used as is. A dict
    {field: spec} (or a target QTensor) sets a QTensor's arrays one by one. None: replicated over `mesh`, else
    the first device.
    """
    default = NamedSharding(mesh, PartitionSpec()) if mesh is not None else SingleDeviceSharding(jax.devices()[0])
    if isinstance(spec, QTensor):  # a target QTensor whose arrays carry shardings
        spec = {f: getattr(getattr(spec, f), "sharding", None) for f in _FIELDS if getattr(spec, f) is not None}
    per_field = isinstance(spec, Mapping)
    flat = entry["kind"] == "qtensor" and bool(entry["layout"].get("flat", False))
    out = {}
    for field, s in _stored(entry).items():
        sp = spec.get(field) if per_field else spec
        if sp is None:
            out[field] = default
            continue
        if isinstance(sp, PartitionSpec):
            if mesh is None:
                raise ValueError(f"{path}: a PartitionSpec ({sp}) needs a mesh; pass load(..., mesh=Mesh(...))")
            sp = NamedSharding(mesh, sp)
        if not isinstance(sp, Sharding):
            raise ValueError(f"{path}: sharding {sp!r} is not a jax Sharding, a PartitionSpec or None")
        if not isinstance(sp, NamedSharding):
            out[field] = sp
        elif not per_field and (field == "perm" or flat):
            out[field] = NamedSharding(sp.mesh, PartitionSpec())
        else:
            out[field] = NamedSharding(sp.mesh, _fit(sp.spec, tuple(s["shape"]), sp.mesh))
    return out


def _spec_lookup(shardings: Any, target_leaves: Mapping[str, Any] | None) -> Callable[[str, Any], Any]:
    """path, abstract leaf -> the spec `load` was given for it (from a callable, a tree / flat dict, or the
    target's own shardings)."""
    if callable(shardings) and not isinstance(shardings, (Sharding, PartitionSpec)):
        return shardings
    table: dict[str, Any] = {}
    if shardings is not None:
        flat, _ = jax.tree_util.tree_flatten_with_path(shardings, is_leaf=_is_spec)
        table = {path_str(kp): v for kp, v in flat}
    elif target_leaves:
        table = {p: (x if isinstance(x, QTensor) else getattr(x, "sharding", None)) for p, x in target_leaves.items()}
    return lambda path, _abstract: table.get(path)


def _check_target(d: Path, jqm: dict[str, Any], target_leaves: Mapping[str, Any]) -> None:
    """The checkpoint has exactly the target's leaves, each of the same kind, shapes and dtypes."""
    paths = jqm["paths"]
    missing = [p for p in target_leaves if p not in jqm["leaves"]]
    extra = [p for p in paths if p not in target_leaves]
    if missing or extra:
        raise CheckpointError(f"{d}: the checkpoint does not match the target tree: "
                              + (f"missing leaves {missing[:5]}" if missing else "")
                              + ("; " if missing and extra else "") + (f"unexpected leaves {extra[:5]}" if extra else ""))
    for p, t in target_leaves.items():
        entry = jqm["leaves"][p]
        got = _abstract_leaf(entry)
        if isinstance(t, QTensor) != isinstance(got, QTensor):
            raise CheckpointError(f"{d}: leaf {p!r} is {'a QTensor' if isinstance(got, QTensor) else 'a float array'} "
                                  f"in the checkpoint but {'a QTensor' if isinstance(t, QTensor) else 'an array'} in "
                                  "the target; quantize the target with the checkpoint's recipe (read_meta()['recipe'])")
        pairs = ([(f, getattr(got, f), getattr(t, f)) for f in _FIELDS] if isinstance(t, QTensor) else [("", got, t)])
        if isinstance(t, QTensor) and (t.fmt, t.layout) != (got.fmt, got.layout):
            raise CheckpointError(f"{d}: leaf {p!r} is {got!r} in the checkpoint but {t!r} in the target")
        for f, a, b in pairs:
            if (a is None) != (b is None):
                raise CheckpointError(f"{d}: leaf {p!r}: {f} is {'absent' if a is None else 'present'} in the "
                                      "checkpoint but not in the target")
            if a is None:
                continue
            ashape, adt = tuple(a.shape), jnp.dtype(a.dtype)
            bshape = tuple(b.shape) if hasattr(b, "shape") else np.shape(b)
            bdt = jnp.dtype(b.dtype if hasattr(b, "dtype") else np.asarray(b).dtype)
            if (ashape, adt) != (bshape, bdt):
                what = f"leaf {p!r}" + (f" {f}" if f else "")
                raise CheckpointError(f"{d}: {what} is {adt.name}{list(ashape)} in the checkpoint but {bdt.name}"
                                      f"{list(bshape)} in the target; the checkpoint was written for another model or "
                                      "dtype")


def load(directory: str | os.PathLike, *, mesh: jax.sharding.Mesh | None = None, shardings: Any = None,
         target: Any = None, verify: bool = True) -> tuple[Any, dict[str, Any]]:
    """Read a checkpoint -> (tree, jq metadata). Arrays are restored by Orbax straight onto their devices and, by
    default, checked against the CRC-32 the writer recorded as each leaf is read: a damaged checkpoint raises a
    CheckpointError naming the leaf, never returns different numbers.

    Args:
      directory: a checkpoint written by `save` / `convert`.
      mesh: the device mesh for PartitionSpecs; leaves without a spec are replicated over it. Without a mesh
        and a spec, arrays land on the first device.
      shardings: per leaf path, the sharding of the *logical* weight: a nested tree mirroring the params, a flat
        {path: spec} dict, or a callable (path, abstract_leaf) -> spec. A spec is a PartitionSpec, a Sharding,
        None, or for a QTensor a dict {"codes": ..., "scale": ..., ...}. A QTensor's codes / scale / zero take the
        weight's spec (same rank; any dim the mesh axes do not divide — packing, group counts — is replicated).
      target: optional tree (arrays, jax.ShapeDtypeStructs, QTensors of either — e.g. `jax.eval_shape` of the
        quantized params) the checkpoint must match leaf for leaf in kind, shape and dtype; the result takes its
        structure, and its leaves' shardings when `shardings` is None.
      verify: compare every array's CRC-32 with the recorded one (default). The check reads each restored array
        back to the host once (a device-to-host copy; free on CPU); arrays this process holds only part of are
        checked from a host read of the stored leaf. `verify=False` skips it (shapes, dtypes and layouts are
        always checked).

    Returns:
      The tree (nested dicts keyed by path component, or `target`'s structure) with QTensors at quantized leaves,
      and the metadata dict of `read_meta`.
    """
    d, jqm = _read(directory)
    target_leaves = dict(leaf_paths(target)) if target is not None else None
    if target_leaves is not None:
        _check_target(d, jqm, target_leaves)
    lookup = _spec_lookup(shardings, target_leaves)
    values = []
    for path in jqm["paths"]:
        entry = jqm["leaves"][path]
        item = _check_leaf(d, path, entry)
        sh = _leaf_shardings(path, entry, lookup(path, _abstract_leaf(entry)), mesh)
        abstract = {f: jax.ShapeDtypeStruct(tuple(s["shape"]), jnp.dtype(s["dtype"]), sharding=sh[f])
                    for f, s in _stored(entry).items()}
        arrays = _restore(d, path, item, abstract)
        if verify:
            partial = [f for f, a in arrays.items() if not a.is_fully_addressable]
            host = _restore(d, path, item, _host_abstract(item, entry)) if partial else {}
            _check_crcs(d, path, entry, {f: host[f] if f in partial else a for f, a in arrays.items()})
        values.append((path, _value(entry, arrays)))
    if target is None:
        return _nest(values), jqm
    treedef = jax.tree_util.tree_structure(target, is_leaf=lambda x: isinstance(x, QTensor))
    by_path = dict(values)
    return jax.tree_util.tree_unflatten(treedef, [by_path[p] for p, _ in leaf_paths(target)]), jqm


def _restore(d: Path, path: str, item: Path, abstract: Mapping[str, Any]) -> dict[str, Any]:
    """Orbax restore of one leaf's arrays as `abstract` describes them (host NumPy or sharded jax arrays)."""
    try:
        with _quiet_storage():
            return dict(ocp.load(item, dict(abstract)))
    except Exception as e:
        raise CheckpointError(f"{d}: leaf {path!r} cannot be read ({type(e).__name__}: {str(e)[:300]}); the "
                              "checkpoint is damaged, write it again") from None


def _host_abstract(item: Path, entry: Mapping[str, Any]) -> dict[str, Any]:
    """Orbax's NumPy metadata of a leaf's arrays: restoring with it gives host NumPy arrays."""
    stored = _orbax_metadata(item).metadata
    return {f: stored[f] for f in _stored(entry)}


def _check_crcs(d: Path, path: str, entry: Mapping[str, Any], arrays: Mapping[str, Any]) -> None:
    """Every restored array has the recorded shape, dtype and CRC-32 (when recorded); else CheckpointError."""
    for f, spec in _stored(entry).items():
        a = np.asarray(arrays[f])
        what = f"leaf {path!r}" + (f" array {f!r}" if entry["kind"] == "qtensor" else "")
        if list(a.shape) != list(spec["shape"]) or a.dtype.name != spec["dtype"]:
            raise CheckpointError(f"{d}: {what} reads as {a.dtype.name}{list(a.shape)}, the metadata says "
                                  f"{spec['dtype']}{spec['shape']}; the checkpoint is damaged")
        if "crc32" in spec and _crc32(a) != spec["crc32"]:
            raise CheckpointError(f"{d}: {what}: CRC-32 {_crc32(a):#010x} differs from the recorded "
                                  f"{spec['crc32']:#010x}; the data is damaged, write the checkpoint again (or "
                                  "load(..., verify=False) to read it anyway)")


def _load_leaf_host(d: Path, path: str, entry: Mapping[str, Any], verify: bool = True) -> Any:
    """One leaf with host NumPy arrays (a QTensor of them, or the array), checked against its metadata (and its
    CRC-32s with `verify`)."""
    item = _check_leaf(d, path, entry)
    arrays = {f: np.asarray(a) for f, a in _restore(d, path, item, _host_abstract(item, entry)).items()}
    if verify:
        _check_crcs(d, path, entry, arrays)
    return _value(entry, arrays)


def _check_finite_grid(d: Path, path: str, q: QTensor) -> None:
    """Scales and zero points are finite: an overflowed scale (a checkpoint written before jq refused them)
    dequantizes its group to NaN although every CRC matches."""
    for f in ("scale", "zero"):
        a = getattr(q, f)
        if a is not None and not np.isfinite(np.asarray(a, np.float32)).all():
            n = int((~np.isfinite(np.asarray(a, np.float32))).sum())
            raise CheckpointError(f"{d}: leaf {path!r}: {n} of {a.size} {f} values are not finite ({f} dtype "
                                  f"{a.dtype.name} overflowed when it was written), so they dequantize to NaN; "
                                  "quantize it again with scale_dtype: float32 for this leaf")


def verify(directory: str | os.PathLike, *, read_data: bool = True) -> dict[str, Any]:
    """Check a checkpoint's integrity; raise CheckpointError naming the directory and leaf on the first problem.

    Checks: the format and version (and the metadata's own CRC-32); every leaf in the metadata is stored, holding
    exactly the recorded arrays with their shapes and dtypes, and nothing else is stored; every QTensor fits its
    layout (`QTensor.check`); with `read_data`, every array is read (one leaf at a time, so memory stays at one
    leaf), its CRC-32 compared with the recorded one, and every scale and zero point checked to be finite.

    Returns:
      {"leaves", "quantized", "arrays", "bytes", "params"} of the checkpoint.
    """
    d, jqm = _read(directory)
    items = {jqm["leaves"][p].get("item") for p in jqm["paths"]}
    stray = sorted(x.name for x in (d / _ARRAYS).iterdir() if x.name not in items) if (d / _ARRAYS).is_dir() else []
    if stray:
        raise CheckpointError(f"{d}: {_ARRAYS}/{stray[0]} (and {len(stray) - 1} more) belongs to no leaf of the "
                              f"metadata; a foreign or mixed checkpoint, write it again")
    n_arrays = n_bytes = n_params = n_q = 0
    for path in jqm["paths"]:
        entry = jqm["leaves"][path]
        specs = _stored(entry)
        n_arrays += len(specs)
        n_bytes += sum(int(np.prod(s["shape"])) * jnp.dtype(s["dtype"]).itemsize for s in specs.values())
        n_params += int(np.prod(_logical_shape(entry)))
        n_q += entry["kind"] == "qtensor"
        if not read_data:
            _check_leaf(d, path, entry)
            continue
        value = _load_leaf_host(d, path, entry, verify=True)
        if isinstance(value, QTensor):
            _check_finite_grid(d, path, value)
    return {"leaves": len(jqm["paths"]), "quantized": n_q, "arrays": n_arrays, "bytes": n_bytes, "params": n_params}


# ----------------------------------------------------------------------------------------------- conversion


@dataclasses.dataclass(frozen=True)
class SourceLeaf:
    """One leaf of a conversion source, not yet read: `load()` returns it (an array, or a QTensor for a jq
    checkpoint). `jq.models` loaders' `LazyParam`s have the same fields."""

    path: str
    shape: tuple[int, ...]
    load: Callable[[], Any]
    dtype: str = "float32"


def _orbax_source(d: Path) -> tuple[str, list[SourceLeaf], dict[str, Any]]:
    """Leaves of a jq checkpoint (QTensors rebuilt) or of any plain Orbax PyTree checkpoint."""
    if (d / META_FILE).is_file():
        d, jqm = _read(d)
        leaves = []
        for p in jqm["paths"]:
            e = jqm["leaves"][p]
            dtype = e["dtype"] if e["kind"] == "qtensor" else e["arrays"]["value"]["dtype"]
            leaves.append(SourceLeaf(p, _logical_shape(e), functools.partial(_load_leaf_host, d, p, e), dtype))
        return "jq", leaves, {"source_meta": jqm.get("meta", {}), "source_recipe": jqm.get("recipe")}
    m = _orbax_metadata(d)
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

    leaves = [SourceLeaf(path_str(kp), tuple(v.shape), lambda i=i: load_one(i), np.dtype(v.dtype).name)
              for i, (kp, v) in enumerate(flat)]
    return "orbax", leaves, {}


def _open_source(src: str | os.PathLike) -> tuple[str, list[SourceLeaf], dict[str, Any]]:
    """(kind, lazy leaves, metadata incl. "path": the absolute source) of a GGUF file, a Hugging Face directory, an
    Orbax checkpoint, or a known model name (`jq.models.io.hub.KNOWN_MODELS`, fetched once like `jq eval` does)."""
    p = Path(src).expanduser().absolute()  # Orbax reads only absolute paths
    if not p.exists():
        from jq.models.io.hub import KNOWN_MODELS, resolve_model  # layer 7: model names (see the module docstring)

        if str(src) not in KNOWN_MODELS:
            raise FileNotFoundError(f"{src}: no such file or directory; pass a .gguf file, a Hugging Face directory "
                                    "(config.json + *.safetensors), an Orbax checkpoint directory or a known model "
                                    f"name ({', '.join(KNOWN_MODELS)})")
        p = resolve_model(str(src))
    if p.is_file() and p.suffix == ".gguf":
        from jq.models.io.gguf import open_gguf  # layer 7: the Llama name mapping (see the module docstring)

        cfg, lazy, _ = open_gguf(p)
        return "gguf", list(lazy), {"path": str(p), "model_config": dataclasses.asdict(cfg)}
    if p.is_dir() and (p / "config.json").is_file():
        from jq.models.io.safetensors import open_hf

        cfg, lazy = open_hf(p)
        return "hf", list(lazy), {"path": str(p), "model_config": dataclasses.asdict(cfg)}
    if p.is_dir():
        _check_dir(p)
        kind, leaves, info = _orbax_source(p)
        return kind, leaves, {"path": str(p), **info}
    raise ValueError(f"{p}: not a .gguf file, a Hugging Face directory (config.json + *.safetensors) or an Orbax "
                     "checkpoint directory")


def _plan(cfg: QuantConfig | None, leaves: Sequence[SourceLeaf], src: Path) -> list:
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
            meta: Mapping[str, Any] | None = None) -> Path:
    """Convert `src` by `recipe` into a checkpoint at `out`, streaming one leaf at a time.

    Host memory holds one leaf at a time: about twice the largest tensor plus a fixed overhead. To keep it there,
    the process is limited to 2 glibc malloc arenas from here on (unless MALLOC_ARENA_MAX is set) and freed memory
    is handed back to the OS after each leaf.

    Args:
      src: a float Orbax checkpoint (any PyTree checkpoint, or a jq one), a Hugging Face Llama directory, a
        llama GGUF file, or a known model name (`jq.models.io.hub.KNOWN_MODELS`); relative paths are fine.
      recipe: a QuantConfig, a recipe dict or a YAML path; None only with `dequantize` (a jq checkpoint back to
        float).
      out: the checkpoint directory to create; nothing appears there until the conversion is complete. It is
        checked before any work (`check_destination`).
      dequantize: write float weights instead of QTensors: a jq checkpoint is dequantized; with a recipe the
        weights are quantized and dequantized (fake quantization), for runtimes that take float weights.
      progress: one line per leaf on stderr.
      calib: for recipes that need data (GPTQ, AWQ, ...): calibration token ids int32 [S, L], or text files
        (default: `jq.apps.pipeline.default_calib_files()`), windowed by calib_samples / calib_len / calib_seed /
        calib_sampling (`jq.apps.pipeline.calibration_tokens`).
        Only a Llama GGUF / HF source can be run to collect statistics; that path loads the whole model.
      overwrite: replace an existing `out` (the old one stays until the new one is complete).
      meta: extra JSON metadata to store.

    Returns:
      The absolute path of the written checkpoint.
    """
    _limit_arenas()
    cfg = _as_recipe(recipe)
    if cfg is None and not dequantize:
        raise ValueError("convert needs a recipe (a YAML path such as configs/rtn_w4_g128.yaml) unless dequantize=True")
    check_destination(out, overwrite)  # before minutes of work, not after
    kind, leaves, info = _open_source(src)
    src_path = Path(info.pop("path"))
    info = {"source": str(src_path.absolute()), "source_format": kind, "dequantized": dequantize, **info,
            **dict(meta or {})}
    if cfg is not None and cfg.needs_calibration:
        return _convert_calibrated(src_path, kind, cfg, out, dequantize=dequantize, progress=progress, calib=calib,
                                   samples=calib_samples, length=calib_len, seed=calib_seed,
                                   sampling=calib_sampling, overwrite=overwrite, meta=info)
    if cfg is None and kind != "jq":
        raise ValueError(f"{src_path} holds float weights: dequantize without a recipe has nothing to do; pass a recipe")
    rules = _plan(cfg, leaves, src_path)
    header = _header(cfg, info, [leaf.path for leaf in leaves])
    w = _Writer(out, header, overwrite=overwrite)
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
    lay = entry["layout"]
    g = f"g{lay['group_size']}" if lay["granularity"] == "group" else lay["granularity"]
    return f"{entry['fmt']} {'sym' if entry['symmetric'] else 'asym'} {g}"


def _convert_calibrated(src: Path, kind: str, cfg: QuantConfig, out, *, dequantize: bool, progress: bool, calib,
                        samples: int, length: int, seed: int, sampling: str, overwrite: bool,
                        meta: dict[str, Any]) -> Path:
    """Data-aware recipes: load the whole Llama model, calibrate, quantize sequentially, then write."""
    methods = sorted({r.method for r in cfg.rules if r.scheme is not None and r.needs_calibration})
    if kind not in ("gguf", "hf"):
        raise ValueError(
            f"recipe {cfg.name!r} needs calibration data (methods/transforms {methods}): jq collects it by running a "
            f"Llama model, which it can load from a GGUF file or a Hugging Face directory, but {src} is an Orbax "
            "checkpoint. Convert from the original GGUF / Hugging Face model, or use a data-free recipe (rtn, hqq)"
        )
    from jq.apps import pipeline  # layer 7 (see the module docstring)
    from jq.tree.quantize import dequantize_params

    m = pipeline.load(str(src))
    if calib is not None and not isinstance(calib, (str, os.PathLike)) and np.asarray(calib).dtype.kind in "iu":
        tokens = np.asarray(calib, np.int32)
        record = {"samples": int(tokens.shape[0]), "length": int(tokens.shape[1]), "files": None}  # given as ids
    else:
        files = [Path(calib)] if isinstance(calib, (str, os.PathLike)) else \
            [Path(f) for f in calib] if calib is not None else pipeline.default_calib_files()
        if not files:
            raise ValueError(f"recipe {cfg.name!r} needs calibration text: pass calib=[FILE, ...] (--calib FILE ...)")
        for f in files:
            if not f.exists():
                raise FileNotFoundError(f"calibration file {f}: no such file")
        tokens, record = pipeline.calibration_draw(m.tokenizer, files, samples, length, seed, sampling)
    t0 = time.perf_counter()
    q, _ = pipeline.quantize(m, cfg, tokens, progress=progress)
    if dequantize:
        q = dequantize_params(q)
    meta = {**meta, "calibration": record, "quantize_seconds": time.perf_counter() - t0}
    return save(out, q, recipe=cfg, meta=meta, overwrite=overwrite)
