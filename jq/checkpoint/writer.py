"""Writing a checkpoint: leaves stream into a hidden staging directory (one Orbax checkpoint each, committed by
Orbax), `jq_checkpoint.json` is written last and the directory renamed into place, so a directory at NAME is always
complete; an interrupted write leaves only `.NAME.jq-tmp/`, which the next write removes. (One Orbax checkpoint per
leaf rather than one Orbax *partial save* session: Orbax 0.12's partial saves re-read and merge every earlier save's
metadata on each save, which is cubic in the number of leaves — minutes for a few hundred.) `--overwrite` replaces
only a jq checkpoint and keeps the old one until the new one is in place (`check_destination`).

Several processes (a multi-controller run, docs/MULTIHOST.md): every process calls `save` with the same tree of
global arrays; each writes the shards it holds (Orbax), process 0 alone stages, writes the metadata and renames.
The directory must lie on a filesystem all processes share."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint.experimental.v1 as ocp

from jq.checkpoint.format import (
    ARRAYS,
    CHUNK_BYTES,
    FORMAT,
    LOCK,
    META_FILE,
    OLD,
    TMP,
    as_recipe,
    check_paths,
    header,
    leaf_arrays,
    leaf_record,
    nest,
    quiet_storage,
    sealed,
    tree_version,
)
from jq.numbers.lowrank import is_lowrank, is_weight_leaf
from jq.numbers.qtensor import QTensor
from jq.tree.paths import leaf_paths
from jq.tree.recipe import QuantConfig

__all__ = ["save", "check_destination", "Writer"]


def _write_leaf(item: Path, arrays: dict[str, np.ndarray]) -> None:
    """One leaf's arrays as an Orbax checkpoint at `item` (Orbax commits it atomically). Tests replace this to
    interrupt or fail a write."""
    ctx = ocp.Context()
    ctx.array.saving.storage_options.chunk_byte_size = CHUNK_BYTES
    ctx.memory.deepcopy_host_arrays = False  # the arrays are ours and never mutated: no second host copy
    with ctx, quiet_storage():
        ocp.save(item, arrays)


def _primary() -> bool:
    return jax.process_index() == 0


def _all_agree(err: BaseException | None, what: str) -> None:
    """Several processes: all learn whether process 0 (which alone touches the directory) managed `what`; it
    re-raises its own error, the others raise one naming it. One process: re-raise `err`, if any."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        ok = bool(multihost_utils.broadcast_one_to_all(np.int32(err is None)))
        if err is None and not ok:
            raise RuntimeError(f"process 0 failed to {what}; its output says why")
    if err is not None:
        raise err


def _split(value: Any) -> tuple[Any, dict[str, Any]]:
    """(the leaf with every array on the host — arrays spread over several processes all-gathered, one leaf at a
    time, for the metadata and CRCs —, the arrays to write by field: those spread over processes as they are,
    so each process writes its own shards; the rest as host arrays, or with several processes replicated over
    all devices so that Orbax writes them once)."""
    if jax.process_count() == 1:
        return value, {}
    from jax.experimental import multihost_utils

    def spread(a):
        return isinstance(a, jax.Array) and not a.is_fully_addressable

    host = jax.tree_util.tree_map(lambda a: multihost_utils.process_allgather(a, tiled=True) if spread(a) else a,
                                  value)
    return host, {f: a for f, a in leaf_arrays(value).items() if spread(a)}


def _replicated(a: np.ndarray) -> jax.Array:
    """A host array as one global array replicated over every device of every process."""
    sharding = jax.sharding.NamedSharding(jax.sharding.Mesh(np.asarray(jax.devices()), ("all",)),
                                          jax.sharding.PartitionSpec())
    return jax.make_array_from_callback(a.shape, sharding, lambda idx: a[idx])


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


class Writer:
    """Streams leaves into `out`: one Orbax checkpoint per leaf in the hidden staging directory `.NAME.jq-tmp`,
    then `jq_checkpoint.json`, then a rename to `out`.

    Nothing appears at `out` before `commit()`; `abort()` (or a killed process, cleaned by the next writer)
    leaves `out` as it was. One writer per `out` at a time (an flock on `.NAME.jq-lock`).
    """

    def __init__(self, out: str | os.PathLike, header: dict[str, Any], *, overwrite: bool = False):
        self.out = Path(out).absolute()
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.staging = self.out.parent / f".{self.out.name}{TMP}"
        self.old = self.out.parent / f".{self.out.name}{OLD}"
        self._lock, err = None, None
        if _primary():
            self._lock = self._acquire_lock()
            try:
                self._clean_stale()
                check_destination(self.out, overwrite)
                (self.staging / ARRAYS).mkdir(parents=True)
            except BaseException as e:
                self._release_lock()
                err = e
        _all_agree(err, f"start writing {self.out}")
        self.header = header
        self.leaves: dict[str, dict[str, Any]] = {}

    def _acquire_lock(self):
        lock_path = self.out.parent / f".{self.out.name}{LOCK}"
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
        host, spread = _split(value)
        entry, arrays = leaf_record(path, host)
        entry["item"] = _item_name(len(self.leaves), path)
        if jax.process_count() > 1:
            arrays = {f: spread[f] if f in spread else _replicated(a) for f, a in arrays.items()}
        try:
            _write_leaf(self.staging / ARRAYS / entry["item"], arrays)
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
        err = None
        if _primary():
            try:
                self._commit()
            except BaseException as e:
                err = e
        _all_agree(err, f"commit {self.out}")
        return self.out

    def _commit(self) -> None:
        try:
            version = tree_version(list(self.leaves.values()))
            _write_json(self.staging / META_FILE, sealed({**self.header, "format_version": version,
                                                          "leaves": self.leaves}))
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
                              f"{self.old} ({e}); delete that directory yourself", stacklevel=4)

    def abort(self) -> None:
        """Remove everything this write created; `out` (if it existed before) is left as it was."""
        if not _primary():
            return
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
        to the host one leaf at a time. Several processes: all call `save` with the same tree; arrays spread over
        them are written shard by shard, each process its own (see the module docstring).
      recipe: the recipe that produced it (a QuantConfig, a recipe dict or a YAML path), stored as a dict.
      meta: JSON-serializable extra metadata (model, source, timings, ...).
      overwrite: replace an existing checkpoint at `directory` (the old one stays until the new one is complete).

    Returns:
      The absolute path of the checkpoint.
    """
    items = leaf_paths(qparams)
    flat, _ = jax.tree_util.tree_flatten_with_path(qparams, is_leaf=is_weight_leaf)
    for path, x in items:  # refuse a LowRank on a float base before anything is written
        if is_lowrank(x) and not isinstance(x.base, QTensor):
            leaf_record(path, x)
    check_paths(items, [kp for kp, _ in flat])
    nest([(p, None) for p, _ in items])  # fail on ambiguous paths before anything is written
    w = Writer(directory, header(as_recipe(recipe), meta, [p for p, _ in items]), overwrite=overwrite)
    try:
        for path, x in items:
            w.add(path, x)
        return w.commit()
    except BaseException:
        w.abort()
        raise
