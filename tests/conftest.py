"""Test set-up: 8 fake CPU devices for sharding tests (must be set before jax is imported)."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# OpenBLAS worker threads (jax's CPU Cholesky) fight XLA's for the 2 cores: one thread is 2-30x faster here.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
