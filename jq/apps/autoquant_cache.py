"""The sensitivity cache of `jq autoquant --cache` and `benchmarks/autoquant.py --cache`: per candidate, per layer, per
metric, so nothing measured is measured twice.

A cache file holds, for one model, calibration draw and base recipe (its key), one column per candidate recipe
(keyed by the recipe's content, not its name): the layers a whole-model measurement scored it on and, per layer, its
stored bits, the layer's float bytes and every cost measured so far — the estimates for all layers, the logits' KL
for the layers a `--refine` or a validation measured (a KL on other tokens than the default, `--kl-samples` /
`--kl-stride`, under its own name beside it). Adding a candidate to a search measures only that one; a
refinement that stops resumes with the layers it had measured (each is written as it is done). The file is written
whole to a temporary name and renamed, so a stopped run never leaves half of one; each write merges what another run
sharing the file wrote meanwhile (under a lock), so two runs at once keep both runs' measurements.

A file holds one store per key (another calibration draw or base adds a store beside the others, it does not
replace them). Candidates and the base are known by what they quantize and how: a recipe's name and description are
labels, so rewording one keeps its measurements. A file that is not such a cache (another JSON, a recipe, a damaged
write) is refused, never overwritten. Files of the first layout (one store, recipes keyed with their labels) are read
as the current one.
"""

from __future__ import annotations

import inspect
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jq.apps.autoquant import sensitivity_tables
from jq.models.family import LoadedModel
from jq.tree.recipe import QuantConfig, recipe_to_dict

try:
    import fcntl
except ImportError:  # not POSIX: writes still merge, unlocked
    fcntl = None

__all__ = ["cache_key", "cached_tables"]

FORMAT, _VERSION = "jq-autoquant-cache", 3
_LABELS = ("name", "description")  # what a recipe says about itself, not what it measures
_DEFAULTS = {k: p.default for k, p in inspect.signature(sensitivity_tables).parameters.items()}
_OPTIONS = {k: _DEFAULTS[k] for k in ("fisher_samples", "hessian_samples")}  # the sample counts a key assumes
_KL_OPTIONS = {k: _DEFAULTS[k] for k in ("kl_samples", "kl_stride")}  # part of the stored KL's name instead


def _stored(metric: str, options: dict[str, Any]) -> str:
    """The name a metric's costs are kept under: "kl[kl_samples=1,kl_stride=4]" for a KL measured on other tokens
    than the default ones (so the estimates of the same key serve both), else the metric's name."""
    kl = {k: options.get(k, v) for k, v in _KL_OPTIONS.items()}
    if metric != "kl" or kl == _KL_OPTIONS:
        return metric
    return "kl[" + ",".join(f"{k}={v}" for k, v in kl.items()) + "]"


def cache_key(m: LoadedModel, draw: dict[str, Any], base: QuantConfig | None = None,
              latency: tuple[int, str] | None = None) -> dict[str, Any]:
    """What a cached cost depends on besides its candidate: the model's source, the calibration draw (as
    `jq.apps.data.calibration_draw` records it; the file list order-free), the base recipe, and for latencies the
    tokens per matmul and the device kind. JSON-shaped."""
    calib = {k: (sorted(map(str, v)) if k == "files" else v) for k, v in draw.items()}
    key = {"model": str(m.source), "calibration": calib,
           "base": _content(recipe_to_dict(base)) if base is not None else None}
    if latency:
        key["latency"] = list(latency)
    return json.loads(json.dumps(key))


def _content(recipe: dict[str, Any]) -> dict[str, Any]:
    """A YAML-shaped recipe without its labels."""
    return {k: v for k, v in recipe.items() if k not in _LABELS}


def _recipe_id(recipe: dict[str, Any]) -> str:
    """A column's key: the YAML-shaped recipe without its labels, as sorted JSON."""
    return json.dumps(_content(recipe), sort_keys=True)


def _column_id(c: QuantConfig) -> str:
    return _recipe_id(recipe_to_dict(c))


def _from_version_2(store: dict[str, Any]) -> dict[str, Any]:
    """A store of the first layout (its key carried "version": 2 and the base's labels, its columns were keyed by
    the whole recipe) in the current one; columns that differed only in their labels are merged."""
    key = {k: v for k, v in store["key"].items() if k != "version"}
    if key.get("base") is not None:
        key["base"] = _content(key["base"])
    columns: dict[str, Any] = {}
    for cid, col in store["columns"].items():  # a second label of the same recipe: every cost of either is kept
        _merge_column(columns, _recipe_id(json.loads(cid)), col)
    return {**store, "key": key, "columns": columns}


def _merge_column(columns: dict[str, Any], cid: str, col: dict[str, Any]) -> None:
    """Add column `col` to `columns` under `cid`; where one is there, add the layers and costs it lacks."""
    mine = columns.setdefault(cid, col)
    if mine is col:
        return
    for p, entry in col["layers"].items():
        mine["layers"].setdefault(p, entry)["cost"] = {**entry["cost"], **mine["layers"][p]["cost"]}
    if "targets" not in mine and "targets" in col:
        mine.update(targets=col["targets"], fixed_bytes=col["fixed_bytes"])


def _read(path: Path) -> list[dict[str, Any]]:
    """The stores in the cache file `path` ([] when it does not exist). ValueError naming the file when it exists
    but is not an autoquant cache: it is not ours to overwrite."""
    if not path.exists():
        return []
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"--cache {path}: not a readable autoquant cache ({e}); it is left as it is: give another "
                         "file name, or delete it to measure afresh") from None
    if isinstance(data, dict) and data.get("format") == FORMAT and isinstance(data.get("stores"), list):
        if data.get("version", 0) > _VERSION:
            raise ValueError(f"--cache {path}: written by a newer jq (cache version {data['version']}, this one "
                             f"reads up to {_VERSION}); upgrade jq or give another file")
        return data["stores"]
    if isinstance(data, dict) and isinstance(data.get("key"), dict) and data["key"].get("version") == 2 \
            and "columns" in data:
        return [_from_version_2(data)]
    raise ValueError(f"--cache {path}: a JSON file but not an autoquant cache (no \"format\": \"{FORMAT}\"); it is "
                     "left as it is: give another file name, or delete it to measure afresh")


def _store(stores: list[dict[str, Any]], key: dict[str, Any]) -> dict[str, Any]:
    """The store of `key` among `stores`, added (empty) when there is none."""
    for store in stores:
        if store["key"] == key:
            return store
    stores.append({"key": key, "columns": {}, "extras": {}})
    return stores[-1]


def _merge(ours: list[dict[str, Any]], theirs: list[dict[str, Any]]) -> None:
    """Add to `ours` what `theirs` (the file as another run left it) holds and ours lacks: stores, columns, layers,
    costs (ours kept where both have one)."""
    for other in theirs:
        store = _store(ours, other["key"])
        for cid, col in other["columns"].items():
            _merge_column(store["columns"], cid, col)
        store["extras"] = store["extras"] or other["extras"]


def _write(path: Path, stores: list[dict[str, Any]]) -> None:
    """Write `stores` whole under a temporary name and rename it, merged with what another run sharing the file
    wrote since it was read (under an exclusive lock where the platform has one), so neither loses measurements."""
    with open(path.with_name(path.name + ".lock"), "a") as lock:
        if fcntl is not None:
            fcntl.flock(lock, fcntl.LOCK_EX)
        _merge(stores, _read(path))
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps({"format": FORMAT, "version": _VERSION, "stores": stores}))
        os.replace(tmp, path)


def _absorb_layer(store: dict[str, Any], candidates: Sequence[QuantConfig], path: str,
                  rows: dict[str, dict[str, Any]]) -> None:
    """Add one layer's rows (metric → `sensitivity_tables` row) measured for `candidates` (their columns exist)."""
    for ci, c in enumerate(candidates):
        for metric, row in rows.items():
            entry = store["columns"][_column_id(c)]["layers"].setdefault(
                path, {"weights": row["weights"], "float_bytes": row["float_bytes"], "bits": row["bits"][ci],
                       "cost": {}})
            entry["cost"][metric] = row["cost"][ci]
            if "latency" in row:
                entry["latency"] = row["latency"][ci]


def _absorb(store: dict[str, Any], candidates: Sequence[QuantConfig], tables: dict[str, dict[str, Any]]) -> None:
    """Add a whole-model `sensitivity_tables` result (metric → table, every layer the candidates quantize) measured
    for `candidates` to the store: their columns, the layers they were scored on, their share of the seconds."""
    first = next(iter(tables.values()))
    for ci, c in enumerate(candidates):
        col = store["columns"].setdefault(_column_id(c), {"name": c.name, "rule": first["rules"][ci], "layers": {},
                                                          "seconds": 0.0})
        col["targets"], col["fixed_bytes"] = list(first["layers"]), first["fixed_bytes"]
        col["seconds"] += first["seconds"] / len(candidates)  # what a table from the cache reports it cost
    for p in first["layers"]:
        _absorb_layer(store, candidates, p, {x: t["layers"][p] for x, t in tables.items()})
    store["extras"] = {k: v for k, v in first.items() if k in ("base", "latency_tokens", "device")}


def _has(col: dict[str, Any] | None, metric: str, layers: Sequence[str] | None) -> bool:
    """Whether the column holds `metric` on `layers` (None: every layer of its whole-model measurement); layers it
    was not scored on in that measurement (no candidate of its run quantizes them) need nothing."""
    if col is None or "targets" not in col:
        return False
    want = col["targets"] if layers is None else [p for p in layers if p in col["targets"]]
    return all(metric in col["layers"][p]["cost"] for p in want)


def _assemble(store: dict[str, Any], candidates: Sequence[QuantConfig], metric: str,
              only: Sequence[str] | None) -> dict[str, Any]:
    """The `sensitivity_tables` table of `metric` for `candidates` (and `only` these layers) from the store."""
    cols = [store["columns"][_column_id(c)] for c in candidates]
    layers = list(dict.fromkeys(p for col in cols for p in col["targets"]))
    if only is not None:
        layers = [p for p in only if p in layers]
    floats = {p: col["layers"][p]["float_bytes"] for col in cols for p in col["targets"]}
    rows = {}
    for p in layers:
        entries = [col["layers"][p] if p in col["targets"] else None for col in cols]  # None: not a choice here
        rows[p] = {"weights": next(e for e in entries if e is not None)["weights"], "float_bytes": floats[p],
                   "cost": [e["cost"][metric] if e else float("inf") for e in entries],
                   "bits": [e["bits"] if e else 8 * floats[p] for e in entries]}
        if any(e is not None and "latency" in e for e in entries):
            rows[p]["latency"] = [e.get("latency", float("inf")) if e else float("inf") for e in entries]
    total = cols[0]["fixed_bytes"] + sum(cols[0]["layers"][p]["float_bytes"] for p in cols[0]["targets"])
    return {"candidates": [c.name for c in candidates], "metric": metric, "rules": [col["rule"] for col in cols],
            "layers": rows, "fixed_bytes": int(total - sum(floats[p] for p in layers)),
            "seconds": float(sum(col["seconds"] for col in cols)), **store["extras"]}


def cached_tables(m: LoadedModel, candidates: Sequence[QuantConfig], calib: np.ndarray,
                  metrics: Sequence[str] = ("kfac",), progress: Any = None, *, cache: str | Path | None = None,
                  key: dict[str, Any] | None = None, only: Sequence[str] | None = None, **options: Any
                  ) -> dict[str, dict[str, Any]]:
    """`jq.apps.autoquant.sensitivity_tables` (same arguments and result) through the cache file `cache` written for
    `key` (`cache_key`): what it holds is read, only the missing (candidate, metric[, layer]) costs are measured —
    for the candidates that lack them —, and the file is rewritten before returning. Each table also says
    "measured": how many candidates had to be measured (0: all from the cache). No `cache`: measures everything."""
    if cache is None:
        tables = sensitivity_tables(m, candidates, calib, metrics, progress, only=only, **options)
        return {x: {**t, "measured": len(candidates)} for x, t in tables.items()}
    if key is None:
        raise ValueError("cached_tables(cache=...) needs the cache's key: cache_key(model, draw, base, latency)")
    if any(options.get(k, v) != v for k, v in _OPTIONS.items()):  # the sample counts the key assumes
        key = {**key, "options": {k: options.get(k, v) for k, v in _OPTIONS.items()}}
    path = Path(cache)
    stores = _read(path)
    store = _store(stores, key)
    cols = store["columns"]
    names = {x: _stored(x, options) for x in metrics}
    missing = [ci for ci, c in enumerate(candidates)
               if not all(_has(cols.get(_column_id(c)), names[x], only) for x in metrics)]
    if only is not None:  # a whole-model column comes first: it says which layers a candidate quantizes
        lacking = [candidates[ci].name for ci in missing if "targets" not in cols.get(_column_id(candidates[ci]), {})]
        if lacking:
            raise ValueError(f"cached_tables(only=...): candidates {lacking} have no whole-model measurement in "
                             f"{path}; measure all layers first (only=None)")
    if missing:
        sub = [candidates[ci] for ci in missing]
        if only is None:
            tables = sensitivity_tables(m, sub, calib, metrics, progress, **options)
            _absorb(store, sub, {names[x]: t for x, t in tables.items()})
            _write(path, stores)
        else:  # some layers (a refinement): each is written as it is done, so a stop loses one
            need = [p for p in only if any(not _has(cols[_column_id(c)], names[x], [p]) for c in sub for x in metrics)]

            def keep(p: str, rows: dict[str, dict[str, Any]]) -> None:
                _absorb_layer(store, sub, p, {names[x]: r for x, r in rows.items()})
                _write(path, stores)
            sensitivity_tables(m, sub, calib, metrics, progress, only=need, on_layer=keep, **options)
    return {x: {**_assemble(store, candidates, names[x], only), "metric": x, "measured": len(missing)}
            for x in metrics}
