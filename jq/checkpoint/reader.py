"""Reading a checkpoint: the validated metadata, the abstract tree, `load` (arrays restored by Orbax straight
onto their devices, each checked against its recorded CRC-32 as it is read) and `verify` (everything `load` checks,
plus stray directories and non-finite scales, one leaf at a time)."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint.experimental.v1 as ocp

from jq.checkpoint.format import (
    ARRAYS,
    FORMAT,
    HEADER_CRC,
    QUANTIZED_KINDS,
    META_FILE,
    OLD,
    TMP,
    CheckpointError,
    abstract_leaf,
    check_version,
    crc32,
    header_crc,
    leaf_arrays,
    leaf_value,
    logical_shape,
    nest,
    orbax_metadata,
    quiet_storage,
    stored_specs,
)
from jq.checkpoint.sharding import leaf_shardings, spec_lookup
from jq.numbers.lowrank import LowRank, is_weight_leaf
from jq.numbers.qtensor import QTensor
from jq.tree.paths import leaf_paths

__all__ = ["load", "read_meta", "abstract_tree", "verify", "load_leaf_host", "read_checked"]


def check_dir(d: Path) -> None:
    """FileNotFoundError / CheckpointError unless `d` is an existing directory."""
    if not d.exists():
        raise FileNotFoundError(f"{d}: no such checkpoint directory; pass a directory written by `jq convert`, "
                                "`jq quantize --out` or jq.checkpoint.save")
    if not d.is_dir():
        raise CheckpointError(f"{d} is a file, not a checkpoint directory")
    if any(part.endswith((TMP, OLD)) for part in d.absolute().parts):
        raise CheckpointError(f"{d} is (inside) the temporary directory of an unfinished write, not a checkpoint; "
                              "run the write again (it removes this directory)")


def read_checked(directory: str | os.PathLike) -> tuple[Path, dict[str, Any]]:
    """(absolute dir, validated jq metadata): format, version, the metadata's own CRC-32 (format 1.1 on), and a
    complete, consistent leaf table. Absolute, because Orbax reads only absolute paths."""
    d = Path(directory).absolute()
    check_dir(d)
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
    check_version(d, jqm.get("format_version"))
    if HEADER_CRC in jqm and header_crc(jqm) != jqm[HEADER_CRC]:
        rec = jqm[HEADER_CRC]
        raise CheckpointError(f"{mf}: CRC-32 {header_crc(jqm):#010x} of the metadata differs from the recorded "
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
    return read_checked(directory)[1]


def _item(d: Path, path: str, entry: Mapping[str, Any]) -> Path:
    item = d / ARRAYS / str(entry.get("item", ""))
    if not entry.get("item") or not item.is_dir():
        raise CheckpointError(f"{d}: leaf {path!r}: its arrays directory {item} is missing; the checkpoint is "
                              "truncated or damaged, write it again")
    return item


def _check_leaf(d: Path, path: str, entry: Mapping[str, Any]) -> Path:
    """The leaf's Orbax checkpoint holds exactly the arrays its metadata describes, with their shapes and dtypes,
    and a QTensor's arrays fit its layout. Returns the leaf's directory."""
    item = _item(d, path, entry)
    stored = orbax_metadata(item, f" (leaf {path!r})").metadata
    specs = stored_specs(entry)
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
            what = f"leaf {path!r}" + (f" array {f!r}" if entry["kind"] in QUANTIZED_KINDS else "")
            raise CheckpointError(f"{d}: {what} is stored as {np.dtype(got.dtype).name}{list(got.shape)} but the "
                                  f"metadata says {spec['dtype']}{spec['shape']}; the checkpoint is damaged")
    if entry["kind"] in QUANTIZED_KINDS:
        try:
            abstract_leaf(entry).check(f"{d}: {path}")
        except Exception as e:
            raise CheckpointError(str(e)) from None
    return item


def abstract_tree(directory: str | os.PathLike) -> dict[str, Any]:
    """The checkpoint's tree without reading arrays (metadata only): nested dicts of jax.ShapeDtypeStruct leaves and
    QTensors of them (what `jax.eval_shape` of the quantized tree gives). Feed it to `jq.report`, or use it as a
    `target`."""
    d, jqm = read_checked(directory)
    return nest([(p, abstract_leaf(jqm["leaves"][p])) for p in jqm["paths"]])


def _kind(x: Any) -> str:
    return "a LowRank (quantized + low-rank)" if isinstance(x, LowRank) else "a QTensor" if isinstance(
        x, QTensor) else "an array"


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
        got = abstract_leaf(entry)
        if _kind(t) != _kind(got):
            raise CheckpointError(f"{d}: leaf {p!r} is {_kind(got)} in the checkpoint but {_kind(t)} in the target; "
                                  "quantize the target with the checkpoint's recipe (read_meta()['recipe'])")
        tq, gq = (t.base, got.base) if isinstance(t, LowRank) else (t, got)
        if isinstance(tq, QTensor) and (tq.fmt, tq.layout) != (gq.fmt, gq.layout):
            raise CheckpointError(f"{d}: leaf {p!r} is {got!r} in the checkpoint but {t!r} in the target")
        have, want = leaf_arrays(got), leaf_arrays(t)
        pairs = [(f if is_weight_leaf(t) else "", have.get(f), want.get(f)) for f in sorted(set(have) | set(want))]
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
    d, jqm = read_checked(directory)
    target_leaves = dict(leaf_paths(target)) if target is not None else None
    if target_leaves is not None:
        _check_target(d, jqm, target_leaves)
    lookup = spec_lookup(shardings, target_leaves)
    values = []
    for path in jqm["paths"]:
        entry = jqm["leaves"][path]
        item = _check_leaf(d, path, entry)
        sh = leaf_shardings(path, entry, lookup(path, abstract_leaf(entry)), mesh)
        abstract = {f: jax.ShapeDtypeStruct(tuple(s["shape"]), jnp.dtype(s["dtype"]), sharding=sh[f])
                    for f, s in stored_specs(entry).items()}
        arrays = _restore(d, path, item, abstract)
        if verify:
            partial = [f for f, a in arrays.items() if not a.is_fully_addressable]
            host = _restore(d, path, item, _host_abstract(item, entry)) if partial else {}
            _check_crcs(d, path, entry, {f: host[f] if f in partial else a for f, a in arrays.items()})
        values.append((path, leaf_value(entry, arrays)))
    if target is None:
        return nest(values), jqm
    treedef = jax.tree_util.tree_structure(target, is_leaf=is_weight_leaf)
    by_path = dict(values)
    return jax.tree_util.tree_unflatten(treedef, [by_path[p] for p, _ in leaf_paths(target)]), jqm


def _restore(d: Path, path: str, item: Path, abstract: Mapping[str, Any]) -> dict[str, Any]:
    """Orbax restore of one leaf's arrays as `abstract` describes them (host NumPy or sharded jax arrays)."""
    try:
        with quiet_storage():
            return dict(ocp.load(item, dict(abstract)))
    except Exception as e:
        raise CheckpointError(f"{d}: leaf {path!r} cannot be read ({type(e).__name__}: {str(e)[:300]}); the "
                              "checkpoint is damaged, write it again") from None


def _host_abstract(item: Path, entry: Mapping[str, Any]) -> dict[str, Any]:
    """Orbax's NumPy metadata of a leaf's arrays: restoring with it gives host NumPy arrays."""
    stored = orbax_metadata(item).metadata
    return {f: stored[f] for f in stored_specs(entry)}


def _check_crcs(d: Path, path: str, entry: Mapping[str, Any], arrays: Mapping[str, Any]) -> None:
    """Every restored array has the recorded shape, dtype and CRC-32 (when recorded); else CheckpointError."""
    for f, spec in stored_specs(entry).items():
        a = np.asarray(arrays[f])
        what = f"leaf {path!r}" + (f" array {f!r}" if entry["kind"] in QUANTIZED_KINDS else "")
        if list(a.shape) != list(spec["shape"]) or a.dtype.name != spec["dtype"]:
            raise CheckpointError(f"{d}: {what} reads as {a.dtype.name}{list(a.shape)}, the metadata says "
                                  f"{spec['dtype']}{spec['shape']}; the checkpoint is damaged")
        if "crc32" in spec and crc32(a) != spec["crc32"]:
            raise CheckpointError(f"{d}: {what}: CRC-32 {crc32(a):#010x} differs from the recorded "
                                  f"{spec['crc32']:#010x}; the data is damaged, write the checkpoint again (or "
                                  "load(..., verify=False) to read it anyway)")


def load_leaf_host(d: Path, path: str, entry: Mapping[str, Any], verify: bool = True) -> Any:
    """One leaf with host NumPy arrays (a QTensor of them, or the array), checked against its metadata (and its
    CRC-32s with `verify`)."""
    item = _check_leaf(d, path, entry)
    arrays = {f: np.asarray(a) for f, a in _restore(d, path, item, _host_abstract(item, entry)).items()}
    if verify:
        _check_crcs(d, path, entry, arrays)
    return leaf_value(entry, arrays)


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
    d, jqm = read_checked(directory)
    items = {jqm["leaves"][p].get("item") for p in jqm["paths"]}
    stray = sorted(x.name for x in (d / ARRAYS).iterdir() if x.name not in items) if (d / ARRAYS).is_dir() else []
    if stray:
        raise CheckpointError(f"{d}: {ARRAYS}/{stray[0]} (and {len(stray) - 1} more) belongs to no leaf of the "
                              f"metadata; a foreign or mixed checkpoint, write it again")
    n_arrays = n_bytes = n_params = n_q = 0
    for path in jqm["paths"]:
        entry = jqm["leaves"][path]
        specs = stored_specs(entry)
        n_arrays += len(specs)
        n_bytes += sum(int(np.prod(s["shape"])) * jnp.dtype(s["dtype"]).itemsize for s in specs.values())
        n_params += int(np.prod(logical_shape(entry)))
        n_q += entry["kind"] in QUANTIZED_KINDS
        if not read_data:
            _check_leaf(d, path, entry)
            continue
        value = load_leaf_host(d, path, entry, verify=True)
        if isinstance(value, LowRank):
            value = value.base
        if isinstance(value, QTensor):
            _check_finite_grid(d, path, value)
    return {"leaves": len(jqm["paths"]), "quantized": n_q, "arrays": n_arrays, "bytes": n_bytes, "params": n_params}
