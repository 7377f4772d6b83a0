"""Fixtures shared by the application tests."""

from __future__ import annotations

import numpy as np
import pytest

from jq.models.io.gguf import load_gguf

from jqtest.llama import tiny_cfg, tiny_checkpoint, write_gguf


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    """(folder holding tiny.gguf — a 2-layer tied-embedding llama, seed 12 —, its loaded model, 8 × 16 calibration
    ids)."""
    d = tmp_path_factory.mktemp("tiny")
    cfg = tiny_cfg(tie=True)
    write_gguf(d / "tiny.gguf", cfg, tiny_checkpoint(cfg, seed=12))
    return d, load_gguf(d / "tiny.gguf"), np.random.default_rng(0).integers(0, cfg.vocab_size, (8, 16))
