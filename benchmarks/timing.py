"""Shared timing helper of the benchmark scripts (run as `python benchmarks/X.py`, which puts this folder on
sys.path)."""

from __future__ import annotations

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
