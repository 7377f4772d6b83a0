"""The jq checkpoint format (docs/FORMAT.md): constants, per-leaf metadata records, the header and its CRC-32, and
the Orbax calls every reader and writer shares. In short:

    NAME/jq_checkpoint.json    {"format": "jq-quantized-pytree", "format_version": "1.3", "header_crc32", "jq_version",
                               "recipe" (the recipe dict), "meta", "paths" (every leaf, in order), "leaves": {path:
                               per-leaf metadata: kind, fmt, layout, dtype, ..., array specs with CRC-32, "item"}}
    NAME/arrays/ITEM/          one Orbax checkpoint per leaf: {"value": array} for a float leaf, {"codes", "scale"
                               [, "zero"][, "perm"][, "codebook"]} for a QTensor, and those plus {"lowrank_a",
                               "lowrank_b"} for a LowRank leaf (a QTensor base + a low-rank term: LoRC)
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import logging
import os
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint.experimental.v1 as ocp
from jax.sharding import Sharding

from jq._version import __version__
from jq.numbers import formats
from jq.numbers.lowrank import LowRank
from jq.numbers.qtensor import ExecPolicy, Layout, QTensor
from jq.tree.recipe import QuantConfig, load_recipe, recipe_from_dict, recipe_to_dict

FORMAT = "jq-quantized-pytree"

FORMAT_VERSION = "1.3"  # major.minor: a reader refuses a newer major; a newer minor only adds fields it may ignore

# 1.1 adds "header_crc32": the CRC-32 of the metadata itself (a 1.0 checkpoint, without it, still reads)
# 1.2 adds learned-codebook QTensors: formats cb{b} / cb{b}x{d} and their "codebook" array
# 1.3 lets a codebook's table dims divide the scale dims (one table shared by a block of scale positions: GPTVQ)
# 1.4 adds lattice-codebook QTensors: formats e8p / e8p2 (uint16 / uint32 codes into the fixed E8P table, no
#     codebook array); written only for trees that hold one (a 1.3 reader refuses the unknown format name)
# 1.5 adds additive-codebook QTensors: formats aq{B}x{M} (AQLM: uint8 codes with a trailing axis of M indices, a
#     "codebook" of M tables [..., M, 2^B, 8]); written only for trees that hold one (a 1.4 reader refuses the name)
# 1.6 adds the 3-bit lattice format e8p3 (uint8 codes with a trailing axis of 3: a 24-bit code's bytes); written
#     only for trees that hold one (a 1.5 reader refuses the format name)
# 1.7 adds the 5- and 6-bit lattice formats e8p5 / e8p6 (uint8 codes with a trailing axis of 5 / 6: the stage codes'
#     bytes); written only for trees that hold one (a 1.6 reader refuses the format name)
# 2.0 adds LowRank leaves (kind "lowrank": a QTensor entry plus "lowrank" {scale, in_ndim, pool} and two arrays). A
#     1.x reader would drop the low-rank term, so only a checkpoint holding such a leaf is written as 2.0; every
#     other checkpoint stays 1.3 and reads in older jq.
# 3.0 adds QTensors a 2.x reader would misread: `zero_min` (weight-unit offsets: GGUF Q4_1 imported natively), an
#     `outer_scale` array (two-level scales: NVFP4) and scales stored in 8-bit float dtypes (MX's e8m0, NVFP4's
#     e4m3). Written only for trees that hold such a leaf.
# 3.1 lets `outer_scale` be per output channel (float16, broadcastable to the scales) over uint8 integer group scales
#     (QoQ's progressive groups); a 3.0 reader refuses such a leaf (its outer-scale shape check fails).
# 4.0 adds the dense-and-sparse term of a QTensor (arrays "sparse_index" int32 [nnz] and "sparse_value" float16 [nnz],
#     added to the decoded weight: SqueezeLLM / SpQR outliers). A 3.x reader would drop the term and return other
#     weights, so it must refuse the file: written only for trees that hold such a leaf.
LOWRANK_FORMAT_VERSION = "2.0"
SCALED_FORMAT_VERSION = "3.0"
CHANNEL_OUTER_FORMAT_VERSION = "3.1"
LATTICE_FORMAT_VERSION = "1.4"
ADDITIVE_FORMAT_VERSION = "1.5"
LATTICE3_FORMAT_VERSION = "1.6"
LATTICE56_FORMAT_VERSION = "1.7"
SPARSE_FORMAT_VERSION = "4.0"
READS_MAJOR = 4
PLAIN_SCALE_DTYPES = ("float32", "float16", "bfloat16")
QUANTIZED_KINDS = ("qtensor", "lowrank")

FIELDS = tuple(f.name for f in dataclasses.fields(QTensor) if not f.metadata.get("static"))  # codes .. codebook

# QTensor's static fields but the layout and the policy (fmt, symmetric, restricted, dtype), and the execution policy's
# fields (rotation, act, act_clip, act_outlier): stored flat under their own names, so a field either gains is
# stored without a format change (a reader fills absent ones in with their defaults and ignores unknown ones)
STATIC_FIELDS = tuple(f.name for f in dataclasses.fields(QTensor)
                      if f.metadata.get("static") and f.name not in ("layout", "policy"))
POLICY_FIELDS = tuple(f.name for f in dataclasses.fields(ExecPolicy))

TMP, OLD, LOCK = ".jq-tmp", ".jq-old", ".jq-lock"

META_FILE = "jq_checkpoint.json"

ARRAYS = "arrays"

CHUNK_BYTES = 64 << 20  # storage chunks: partial and sharded reads touch only the chunks they need

HEADER_CRC = "header_crc32"


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, is damaged, or does not match what was asked. The message names the
    directory (and leaf), what was found, and what to do."""


def array_spec(a: np.ndarray) -> dict[str, Any]:
    """{"shape", "dtype", "crc32"} of one stored array (crc32 of its C-order bytes)."""
    return {"shape": list(a.shape), "dtype": a.dtype.name, "crc32": crc32(a)}


def crc32(a: np.ndarray) -> int:
    """CRC-32 of the C-order bytes of `a` (any shape and dtype)."""
    return zlib.crc32(np.ascontiguousarray(a).reshape(-1).view(np.uint8))


def layout_dict(lay: Layout) -> dict[str, Any]:
    """Every Layout field (shape, axes, granularity, group_size, padded, flat, ...) under its own name."""
    return {f.name: jsonable(getattr(lay, f.name)) for f in dataclasses.fields(Layout)}


def layout_from_dict(d: Mapping[str, Any]) -> Layout:
    """The Layout `layout_dict` stored (lists back to tuples; unknown fields ignored)."""
    names = {f.name for f in dataclasses.fields(Layout)}
    return Layout(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in names})


def to_numpy(path: str, x: Any) -> np.ndarray:
    """A leaf value as a host array of the same shape (gathers a sharded jax.Array); errors name the path."""
    if isinstance(x, (str, bytes)) or x is None:
        raise ValueError(f"{path}: leaf {x!r} is not an array; checkpoints hold arrays (and QTensors) only")
    a = np.asarray(jax.device_get(x))
    if a.dtype == object:
        raise ValueError(f"{path}: leaf of type {type(x).__name__} is not an array; checkpoints hold arrays only")
    return a


def leaf_record(path: str, x: Any) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(per-leaf metadata, the leaf's stored arrays by field: {"value": a} for an array, codes/scale/... for a
    QTensor, and lowrank_a / lowrank_b besides for a LowRank leaf on a QTensor base)."""
    if isinstance(x, (QTensor, LowRank)):
        q = x.base if isinstance(x, LowRank) else x
        if not isinstance(q, QTensor):
            raise ValueError(f"{path}: a LowRank leaf on a float base (adapters beside float weights) is not stored in "
                             "checkpoints: merge it (jq.adapters.merge) or save the adapters apart (jq.adapters.split, "
                             "then jq.adapters.io.save)")
        arrays = {f: to_numpy(f"{path}/{f}", a) for f, a in leaf_arrays(x).items()}
        policy = {k: getattr(q.policy, k) for k in POLICY_FIELDS}
        policy["rotation"] = None if q.policy.rotation is None else str(q.policy.rotation)  # "hadamard(seed=3)"
        entry = {"kind": "lowrank" if q is not x else "qtensor", **{k: jsonable(getattr(q, k)) for k in STATIC_FIELDS},
                 **policy, "layout": layout_dict(q.layout), "arrays": {f: array_spec(a) for f, a in arrays.items()}}
        if q is not x:
            entry["lowrank"] = {"scale": float(x.scale), "in_ndim": int(x.in_ndim), "pool": int(x.pool)}
        return entry, arrays
    a = to_numpy(path, x)
    return {"kind": "array", "arrays": {"value": array_spec(a)}}, {"value": a}


def stored_specs(entry: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The arrays a leaf's metadata describes: {field: {"shape", "dtype", "crc32"}}."""
    return entry["arrays"]


def logical_shape(entry: Mapping[str, Any]) -> tuple[int, ...]:
    """The shape of the leaf a metadata entry describes (a QTensor's layout shape, not its stored codes')."""
    return tuple(entry["layout"]["shape"] if entry["kind"] in QUANTIZED_KINDS else entry["arrays"]["value"]["shape"])


def leaf_value(entry: Mapping[str, Any], arrays: Mapping[str, Any]) -> QTensor | LowRank | Any:
    """A leaf from its stored arrays (shapes as `stored_specs(entry)`): the QTensor (or LowRank), or the array."""
    if entry["kind"] == "lowrank":
        lr = entry["lowrank"]
        return LowRank(qtensor_from(entry, arrays), arrays["lowrank_a"], arrays["lowrank_b"], scale=float(lr["scale"]),
                       in_ndim=int(lr["in_ndim"]), pool=int(lr["pool"]))
    return qtensor_from(entry, arrays) if entry["kind"] == "qtensor" else arrays["value"]


def leaf_arrays(x: Any) -> dict[str, Any]:
    """The arrays a leaf stores, by the field names of `stored_specs` (QTensor fields, lowrank_a / lowrank_b, or
    "value")."""
    if isinstance(x, LowRank):
        return {**leaf_arrays(x.base), "lowrank_a": x.a, "lowrank_b": x.b}
    if isinstance(x, QTensor):
        return {f: getattr(x, f) for f in FIELDS if getattr(x, f) is not None}
    return {"value": x}


def jsonable(v: Any) -> Any:
    """`v` as JSON can hold it: tuples → lists (recursively), NumPy scalars → Python scalars."""
    if isinstance(v, tuple):
        return [jsonable(x) for x in v]
    if isinstance(v, (np.generic,)):
        return v.item()
    return v


def qtensor_from(entry: Mapping[str, Any], arrays: Mapping[str, Any]) -> QTensor:
    """The QTensor of a metadata entry and its stored arrays (codes, scale[, zero][, perm][, codebook][, outer_scale]
    [, sparse_index, sparse_value]: arrays or ShapeDtypeStructs of the stored shapes)."""
    static = {k: tuple(entry[k]) if isinstance(entry[k], list) else entry[k] for k in STATIC_FIELDS if k in entry}
    policy = ExecPolicy(**{k: entry[k] for k in POLICY_FIELDS if k in entry})  # parses the rotation's string form
    return QTensor(codes=arrays["codes"], scale=arrays["scale"], zero=arrays.get("zero"), perm=arrays.get("perm"),
                   codebook=arrays.get("codebook"), outer_scale=arrays.get("outer_scale"),
                   sparse_index=arrays.get("sparse_index"), sparse_value=arrays.get("sparse_value"),
                   layout=layout_from_dict(entry["layout"]), policy=policy, **static)


def abstract_leaf(entry: Mapping[str, Any],
                  shardings: Mapping[str, Sharding | None] | None = None) -> QTensor | jax.ShapeDtypeStruct:
    """The leaf as jax.ShapeDtypeStructs (a QTensor of them for a quantized leaf), optionally with shardings."""
    shardings = shardings or {}
    return leaf_value(entry, {f: jax.ShapeDtypeStruct(tuple(s["shape"]), jnp.dtype(s["dtype"]), sharding=shardings.get(f))
                          for f, s in stored_specs(entry).items()})


def nest(items: Sequence[tuple[str, Any]]) -> dict[str, Any]:
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


def check_paths(items: Sequence[tuple[str, Any]], keypaths: Sequence[tuple]) -> None:
    """ValueError for a bare array (empty path) or a key containing "/" (the path separator)."""
    for (path, _), kp in zip(items, keypaths):
        if not path:
            raise ValueError("a checkpoint holds a tree of named leaves (e.g. {'params': ...}), not a bare array")
        bad = [k for k in kp if "/" in str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", ""))))]
        if bad:
            raise ValueError(f"{path}: key {bad[0]} contains '/', which the checkpoint uses to join paths; rename it")


def header_crc(m: Mapping[str, Any]) -> int:
    """CRC-32 of the metadata without its own CRC field, over canonical JSON (sorted keys, no spaces), so that a
    damaged byte anywhere in jq_checkpoint.json — a shape, a layout field, the recipe — is caught on load."""
    body = {k: v for k, v in m.items() if k != HEADER_CRC}
    return zlib.crc32(json.dumps(body, sort_keys=True, separators=(",", ":")).encode())


def sealed(m: dict[str, Any]) -> dict[str, Any]:
    """`m` with its header CRC (computed on the JSON round trip of `m`, which is what a reader sees)."""
    m = json.loads(json.dumps(m))
    m[HEADER_CRC] = header_crc(m)
    return m


def entry_version(entry: Mapping[str, Any]) -> str:
    """The oldest format version that holds a leaf's metadata entry: 4.0 for a dense-and-sparse term, 3.0 for
    weight-unit offsets, an outer scale or 8-bit float scales (3.1 for a per-channel outer scale), 2.0 for a LowRank
    leaf, 1.7 for the 5- and 6-bit lattice codebooks, 1.6 for the 3-bit one, 1.5 for an additive codebook, 1.4 for
    another lattice codebook, else 1.3."""
    arrays = entry.get("arrays", {})
    if "sparse_index" in arrays:
        return SPARSE_FORMAT_VERSION
    if list(arrays.get("outer_scale", {}).get("shape", [])):
        return CHANNEL_OUTER_FORMAT_VERSION
    if entry.get("zero_min") or "outer_scale" in arrays or (
            "scale" in arrays and arrays["scale"]["dtype"] not in PLAIN_SCALE_DTYPES):
        return SCALED_FORMAT_VERSION
    if entry.get("kind") == "lowrank":
        return LOWRANK_FORMAT_VERSION
    f = formats.FORMATS.get(str(entry.get("fmt")))
    kind = None if f is None else f.kind
    if kind == "lattice" and f.bits in (24, 40, 48):
        return LATTICE3_FORMAT_VERSION if f.bits == 24 else LATTICE56_FORMAT_VERSION
    return {"lattice": LATTICE_FORMAT_VERSION, "additive": ADDITIVE_FORMAT_VERSION}.get(kind, FORMAT_VERSION)


def tree_version(entries: Sequence[Mapping[str, Any]]) -> str:
    """The format version a checkpoint of these leaf entries is written as (the newest any leaf needs)."""
    return max((entry_version(e) for e in entries), key=lambda v: tuple(int(p) for p in v.split(".")),
               default=FORMAT_VERSION)


def header(recipe: QuantConfig | None, meta: Mapping[str, Any] | None, paths: list[str]) -> dict[str, Any]:
    """The checkpoint-level metadata (everything of jq_checkpoint.json but the leaves); its format_version is
    settled when the leaves are known (`tree_version`)."""
    h = {"format": FORMAT, "format_version": FORMAT_VERSION, "jq_version": __version__,
         "recipe": recipe_to_dict(recipe) if recipe is not None else None, "meta": dict(meta or {}), "paths": paths}
    try:
        json.dumps(h)
    except (TypeError, ValueError) as e:
        raise ValueError(f"checkpoint meta must be JSON-serializable ({e}); pass strings, numbers, lists and dicts") from None
    return h


def as_recipe(recipe: QuantConfig | Mapping | str | os.PathLike | None) -> QuantConfig | None:
    """`recipe` as a QuantConfig: itself, None, from a recipe dict, or loaded from a name / YAML path."""
    if recipe is None or isinstance(recipe, QuantConfig):
        return recipe
    if isinstance(recipe, Mapping):
        return recipe_from_dict(dict(recipe))
    return load_recipe(recipe)


@contextlib.contextmanager
def quiet_storage() -> Iterator[Callable[[], None]]:
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


def check_version(d: Path, v: Any) -> None:
    """CheckpointError unless `v` is a "major.minor" format version this jq reads."""
    try:
        major, _minor = (int(x) for x in str(v).split("."))
    except ValueError:
        raise CheckpointError(f"{d}: format_version {v!r} is not of the form 'major.minor'; the metadata is damaged") from None
    if major > READS_MAJOR:
        raise CheckpointError(
            f"{d}: format version {v} is newer than this jq reads ({READS_MAJOR}.x, jq {__version__}); upgrade jq "
            "to read this checkpoint"
        )


def orbax_metadata(d: Path, what: str = "") -> Any:
    """Orbax's metadata of the checkpoint `d`, with its logs silenced; CheckpointError naming `d` (and `what`) when
    it is damaged, unfinished or not an Orbax checkpoint."""
    try:
        with quiet_storage() as failed:
            m = ocp.metadata(d)
            if getattr(m, "metadata", None) is None:  # Orbax logs the error and returns None
                failed()
            return m
    except Exception as e:  # Orbax / tensorstore raise many types for a damaged or foreign directory
        raise CheckpointError(
            f"{d}{what} is not a readable Orbax checkpoint ({type(e).__name__}: {str(e)[:300]}); it is damaged, "
            "unfinished or not a checkpoint. Write it again (jq convert / jq quantize --out)"
        ) from None
