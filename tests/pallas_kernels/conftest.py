"""Every kernel test starts without JQ_KERNELS and with its own autotune cache."""

import pytest


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch, tmp_path):
    monkeypatch.delenv("JQ_KERNELS", raising=False)
    monkeypatch.setenv("JQ_AUTOTUNE_CACHE", str(tmp_path / "autotune.json"))
