"""Test set-up: 8 fake CPU devices for sharding tests (must be set before jax is imported)."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# OpenBLAS worker threads (jax's CPU Cholesky) fight XLA's for the 2 cores: one thread is 2-30x faster here.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")


def pytest_collection_modifyitems(config, items):
    """The long tests (marked slow: real models, notebooks, several processes) first, in their own order: xdist hands
    out the rest as workers free up, so the suite ends on short tests instead of one worker finishing a minute-long
    notebook while the other idles."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
