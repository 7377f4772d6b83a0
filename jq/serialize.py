"""A simple, documented on-disk form for (quantized) parameter trees: one safetensors file + one JSON manifest.

    DIR/manifest.json       {"format": "jq-qtree", "format_version": 1, "jq_version": ..., "meta": {...},
                             "leaves": [{"path": "layers_0/attn/q_proj/kernel", "kind": "qtensor",
                                         "fmt": "int4", "layout": {...}, "symmetric": false, ...,
                                         "arrays": {"codes": {"key": ..., "dtype": "uint8", "shape": [...]}, ...}},
                                        {"path": "final_norm/scale", "kind": "array", "arrays": {"value": {...}}}]}
    DIR/tensors.safetensors every array under its "key" (path + "::" + field). dtypes numpy lacks (bfloat16,
                            float8) are stored as the unsigned int of the same width; the manifest's "dtype" is
                            the real one.

Nested dicts only (paths are "/"-joined keys). Writes go to a temporary sibling directory that is renamed into
place at the end, so an interrupted write never leaves a directory that loads. `load` refuses a newer format.
The Orbax checkpoint format of the checkpoint issue supersedes this for sharded, streaming use.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import jax
import ml_dtypes
import numpy as np
from safetensors.numpy import load_file, save_file

from jq.qtensor import Layout, QTensor
from jq.quantize import leaf_paths

__all__ = ["save", "load", "read_manifest", "FORMAT_VERSION"]

FORMAT = "jq-qtree"
FORMAT_VERSION = 1
_FIELDS = ("codes", "scale", "zero", "perm")


def _to_storable(a: np.ndarray) -> np.ndarray:
    if a.dtype.type in (ml_dtypes.bfloat16,) or a.dtype.name.startswith("float8") or a.dtype.name.startswith("float4"):
        return a.view(np.dtype(f"uint{8 * a.dtype.itemsize}"))
    return a


def _from_storable(a: np.ndarray, dtype: str) -> np.ndarray:
    if a.dtype.name == dtype:
        return a
    return a.view(getattr(ml_dtypes, dtype, None) or np.dtype(dtype))


def save(directory: str | os.PathLike, tree, meta: dict[str, Any] | None = None, *, overwrite: bool = False) -> Path:
    """Write a nested-dict tree of arrays / QTensors to `directory` atomically. Returns the directory."""
    out = Path(directory)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; choose a new --out directory or pass overwrite=True (--overwrite)")
    tensors: dict[str, np.ndarray] = {}
    leaves = []
    for path, x in leaf_paths(tree):
        arrays = {}
        entry: dict[str, Any] = {"path": path}
        if isinstance(x, QTensor):
            entry.update(
                kind="qtensor", fmt=x.fmt, symmetric=x.symmetric, restricted=x.restricted, dtype=x.dtype,
                rotation=x.rotation, act=x.act,
                layout={"shape": list(x.layout.shape), "axes": list(x.layout.axes), "granularity": x.layout.granularity,
                        "group_size": x.layout.group_size, "padded": x.layout.padded,
                        "flat": x.layout.flat},
            )
            fields = {f: getattr(x, f) for f in _FIELDS if getattr(x, f) is not None}
        else:
            entry["kind"] = "array"
            fields = {"value": x}
        for f, a in fields.items():
            a = np.asarray(jax.device_get(a))
            key = f"{path}::{f}"
            tensors[key] = np.ascontiguousarray(_to_storable(a))
            arrays[f] = {"key": key, "dtype": a.dtype.name, "shape": list(a.shape)}
        entry["arrays"] = arrays
        leaves.append(entry)
    from jq import __version__

    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "jq_version": __version__, "meta": meta or {},
                "leaves": leaves}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        save_file(tensors, str(tmp / "tensors.safetensors"))
        with open(tmp / "manifest.json", "w") as f:
            json.dump(manifest, f, indent=1)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def read_manifest(directory: str | os.PathLike) -> dict:
    """The manifest of a saved tree, validated (format name and version)."""
    d = Path(directory)
    mf = d / "manifest.json"
    if not d.is_dir():
        raise FileNotFoundError(f"{d} is not a directory; pass the directory written by `jq quantize --out`")
    if not mf.exists() or not (d / "tensors.safetensors").exists():
        raise ValueError(f"{d} is not a jq quantized tree: manifest.json or tensors.safetensors is missing")
    try:
        m = json.loads(mf.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{mf} is not valid JSON ({e}); the directory is damaged, write it again") from None
    if m.get("format") != FORMAT:
        raise ValueError(f"{mf}: format {m.get('format')!r} is not {FORMAT!r}")
    if int(m.get("format_version", 0)) > FORMAT_VERSION:
        raise ValueError(
            f"{mf}: format version {m['format_version']} is newer than this jq reads ({FORMAT_VERSION}); upgrade jq"
        )
    return m


def load(directory: str | os.PathLike) -> tuple[dict, dict]:
    """Read a tree written by `save` → (nested dict of numpy arrays / QTensors, manifest)."""
    m = read_manifest(directory)
    tensors = load_file(str(Path(directory) / "tensors.safetensors"))
    tree: dict = {}
    for e in m["leaves"]:
        arrs = {}
        for f, spec in e["arrays"].items():
            if spec["key"] not in tensors:
                raise ValueError(f"{directory}: leaf {e['path']!r} lacks tensor {spec['key']!r}; the file is damaged")
            a = _from_storable(tensors[spec["key"]], spec["dtype"])
            if list(a.shape) != spec["shape"]:
                raise ValueError(f"{directory}: {spec['key']} has shape {a.shape}, manifest says {spec['shape']}")
            arrs[f] = a
        if e["kind"] == "qtensor":
            lay = e["layout"]
            value = QTensor(
                codes=arrs["codes"], scale=arrs["scale"], zero=arrs.get("zero"), perm=arrs.get("perm"), fmt=e["fmt"],
                layout=Layout(tuple(lay["shape"]), tuple(lay["axes"]), lay["granularity"], lay["group_size"], lay["padded"],
                              lay.get("flat", False)),
                symmetric=e["symmetric"], restricted=e["restricted"], dtype=e["dtype"], rotation=e.get("rotation"),
                act=e.get("act"),
            )
            value.check(f"{directory}: {e['path']}")
        else:
            value = arrs["value"]
        node = tree
        *parents, last = e["path"].split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    return tree, m
