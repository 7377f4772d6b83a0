"""Shared helpers of the benchmark scripts — timing and the environment a figure was measured in (run as
`python benchmarks/X.py`, which puts this folder on sys.path)."""

from __future__ import annotations

import os
import platform
import time

import jax
import numpy as np


def timed(fn, *args, repeats: int):
    """(output, compile + first run seconds, median run seconds over `repeats` further runs)."""
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    first = time.perf_counter() - t0
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        runs.append(time.perf_counter() - t0)
    return out, first, float(np.median(runs))


def environment(**extra) -> dict:
    """What a benchmark figure depends on besides its inputs — the device, the library versions, the host — merged
    with the script's own `extra` settings, for the `meta` of every result JSON."""
    dev = jax.devices()[0]
    meta = {"device": str(dev), "device_kind": dev.device_kind, "backend": jax.default_backend(),
            "jax": jax.__version__, "numpy": np.__version__, "cpu_count": os.cpu_count(),
            "machine": platform.machine(),
            "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}
    return {**meta, **extra}
