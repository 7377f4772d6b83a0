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
import json
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

from jq import __version__
from jq.config import QuantConfig, load_recipe, recipe_from_dict, recipe_to_dict
from jq.qtensor import Layout, QTensor
from jq.quantize import leaf_paths, path_str, quantize_leaf

__all__ = ["FORMAT", "FORMAT_VERSION", "META_FILE", "CheckpointError", "SourceLeaf", "save", "load", "read_meta",
           "abstract_tree", "verify", "convert"]

FORMAT = "jq-quantized-pytree"
FORMAT_VERSION = "1.0"  # major.minor: a reader refuses a newer major; a newer minor only adds fields it may ignore
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


def _write_leaf(item: Path, arrays: dict[str, np.ndarray]) -> None:
    """One leaf's arrays as an Orbax checkpoint at `item` (Orbax commits it atomically). Tests replace this to
    interrupt or fail a write."""
    ctx = ocp.Context()
    ctx.array.saving.storage_options.chunk_byte_size = _CHUNK_BYTES
    ctx.memory.deepcopy_host_arrays = False  # the arrays are ours and never mutated: no second host copy
    with ctx:
        ocp.save(item, arrays)


def _no_space(e: BaseException) -> bool:
    return (isinstance(e, OSError) and e.errno == errno.ENOSPC) or "No space left on device" in str(e)


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


class _Writer:
    """Streams leaves into `out`: one Orbax checkpoint per leaf in the hidden staging directory `.NAME.jq-tmp`,
    then `jq_checkpoint.json`, then a rename to `out`.

    Nothing appears at `out` before `commit()`; `abort()` (or a killed process, cleaned by the next writer)
    leaves no directory at `out`. One writer per `out` at a time (an flock on `.NAME.jq-lock`).
    """

    def __init__(self, out: str | os.PathLike, header: dict[str, Any], *, overwrite: bool = False):
        self.out = Path(out).absolute()
        if self.out.exists() and not overwrite:
            raise FileExistsError(f"{self.out} already exists; choose another output directory or pass "
                                  "overwrite=True (--overwrite) to replace it")
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.staging = self.out.parent / f".{self.out.name}{_TMP}"
        self._lock = self._acquire_lock()
        self._clean_stale()
        (self.staging / _ARRAYS).mkdir(parents=True)
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
        """Remove what an interrupted earlier write to `out` left: the staging directory, a set-aside old `out`."""
        for p in (self.staging, self.out.parent / f".{self.out.name}{_OLD}"):
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()

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
                              f"({nbytes / 1e6:.1f} MB) of {self.out}; nothing was left at {self.out}. Free space "
                              f"on {self.out.parent} and run again") from e
            raise
        self.leaves[path] = entry
        return entry

    def commit(self) -> Path:
        """Write jq_checkpoint.json and rename the staging directory to `out` (replacing an old `out` if allowed)."""
        missing = [p for p in self.header["paths"] if p not in self.leaves]
        if missing or not self.leaves:
            raise ValueError(f"{self.out}: {len(missing)} planned leaves were not written (first: {missing[:1]}); "
                             "nothing was committed" if missing else f"nothing to write to {self.out}: no leaves")
        try:
            _write_json(self.staging / META_FILE, {**self.header, "leaves": self.leaves})
        except OSError as e:
            if _no_space(e):
                raise OSError(errno.ENOSPC, f"no space left on device while committing {self.out}; nothing was "
                              f"left at {self.out}. Free space on {self.out.parent} and run again") from e
            raise
        _fsync_dir(self.staging)
        if self.out.exists():
            old = self.out.parent / f".{self.out.name}{_OLD}"
            os.rename(self.out, old)
            os.rename(self.staging, self.out)
            shutil.rmtree(old)
        else:
            os.rename(self.staging, self.out)
        _fsync_dir(self.out.parent)
        self._release_lock()
        return self.out

    def abort(self) -> None:
        """Remove everything this write created; `out` (if it existed before) is left as it was."""
        try:
            self._clean_stale()
        finally:
            self._release_lock()


def save(directory: str | os.PathLike, qparams: Any, *, recipe: QuantConfig | Mapping | str | None = None,
         meta: Mapping[str, Any] | None = None, overwrite: bool = False) -> Path:
    """Write a parameter tree (arrays and QTensors) to `directory` in the documented format (docs/FORMAT.md).

    Args:
      directory: the checkpoint directory to create (it must not exist unless `overwrite`).
      qparams: a pytree (nested dicts, an NNX State, ...) of arrays / QTensors; sharded jax.Arrays are gathered
        to the host one leaf at a time.
      recipe: the recipe that produced it (a QuantConfig, a recipe dict or a YAML path), stored as a dict.
      meta: JSON-serializable extra metadata (model, source, timings, ...).
      overwrite: replace an existing `directory` (atomically: the old one stays until the new one is complete).

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
        return ocp.metadata(d)
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
    """(dir, validated jq metadata): format, version, and a complete, consistent leaf table."""
    d = Path(directory)
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
         target: Any = None) -> tuple[Any, dict[str, Any]]:
    """Read a checkpoint -> (tree, jq metadata). Arrays are restored by Orbax straight onto their devices.

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
        try:
            arrays = ocp.load(item, abstract)
        except Exception as e:
            raise CheckpointError(f"{d}: leaf {path!r} cannot be read ({type(e).__name__}: {str(e)[:300]}); the "
                                  "checkpoint is damaged, write it again") from None
        values.append((path, _value(entry, arrays)))
    if target is None:
        return _nest(values), jqm
    treedef = jax.tree_util.tree_structure(target, is_leaf=lambda x: isinstance(x, QTensor))
    by_path = dict(values)
    return jax.tree_util.tree_unflatten(treedef, [by_path[p] for p, _ in leaf_paths(target)]), jqm


def _load_leaf_host(d: Path, path: str, entry: Mapping[str, Any]) -> Any:
    """One leaf with host NumPy arrays (a QTensor of them, or the array), checked against its metadata."""
    item = _check_leaf(d, path, entry)
    stored = _orbax_metadata(item).metadata  # NumPy metadata: restores NumPy arrays on the host
    try:
        arrays = ocp.load(item, {f: stored[f] for f in _stored(entry)})
    except Exception as e:
        raise CheckpointError(f"{d}: leaf {path!r} cannot be read ({type(e).__name__}: {str(e)[:300]}); the "
                              "checkpoint is damaged, write it again") from None
    return _value(entry, {f: np.asarray(a) for f, a in arrays.items()})


def verify(directory: str | os.PathLike, *, read_data: bool = True) -> dict[str, Any]:
    """Check a checkpoint's integrity; raise CheckpointError naming the directory and leaf on the first problem.

    Checks: the format and version; every leaf in the metadata is stored, holding exactly the recorded arrays
    with their shapes and dtypes, and nothing else is stored; every QTensor fits its layout (`QTensor.check`); with `read_data`, every array is
    read (one leaf at a time, so memory stays at one leaf) and its CRC-32 compared with the recorded one.

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
        value = _load_leaf_host(d, path, entry)
        arrays = {f: getattr(value, f) for f in specs} if entry["kind"] == "qtensor" else {"value": value}
        for f, spec in specs.items():
            a = arrays[f]
            what = f"leaf {path!r}" + (f" array {f!r}" if entry["kind"] == "qtensor" else "")
            if list(a.shape) != spec["shape"] or a.dtype.name != spec["dtype"]:
                raise CheckpointError(f"{d}: {what} reads as {a.dtype.name}{list(a.shape)}, the metadata says "
                                      f"{spec['dtype']}{spec['shape']}; the checkpoint is damaged")
            if "crc32" in spec and _crc32(a) != spec["crc32"]:
                raise CheckpointError(f"{d}: {what}: CRC-32 {_crc32(a):#010x} differs from the recorded "
                                      f"{spec['crc32']:#010x}; the data is damaged, write the checkpoint again")
        del value, arrays
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
    """(kind, lazy leaves, metadata) of a GGUF file, a Hugging Face directory or an Orbax checkpoint."""
    p = Path(src)
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such file or directory; pass a .gguf file, a Hugging Face directory "
                                "(config.json + *.safetensors) or an Orbax checkpoint directory")
    if p.is_file() and p.suffix == ".gguf":
        from jq.models.gguf_loader import open_gguf  # layer 7: the Llama name mapping (see the module docstring)

        cfg, lazy, _ = open_gguf(p)
        return "gguf", list(lazy), {"model_config": dataclasses.asdict(cfg)}
    if p.is_dir() and (p / "config.json").is_file():
        from jq.models.hf_loader import open_hf

        cfg, lazy = open_hf(p)
        return "hf", list(lazy), {"model_config": dataclasses.asdict(cfg)}
    if p.is_dir():
        _check_dir(p)
        return _orbax_source(p)
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
      src: a float Orbax checkpoint (any PyTree checkpoint, or a jq one), a Hugging Face Llama directory or a
        llama GGUF file.
      recipe: a QuantConfig, a recipe dict or a YAML path; None only with `dequantize` (a jq checkpoint back to
        float).
      out: the checkpoint directory to create; nothing appears there until the conversion is complete.
      dequantize: write float weights instead of QTensors: a jq checkpoint is dequantized; with a recipe the
        weights are quantized and dequantized (fake quantization), for runtimes that take float weights.
      progress: one line per leaf on stderr.
      calib: for recipes that need data (GPTQ, AWQ, ...): calibration token ids int32 [S, L], or text files
        (default: `jq.models.pipeline.default_calib_files()`), windowed by calib_samples / calib_len / calib_seed /
        calib_sampling (`jq.models.pipeline.calibration_tokens`).
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
    src_path = Path(src)
    kind, leaves, info = _open_source(src_path)
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
    from jq.models import pipeline  # layer 7 (see the module docstring)
    from jq.quantize import dequantize_params

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
