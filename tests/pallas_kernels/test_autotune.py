"""The kernels' autotuner (`jq.pallas_kernels.autotune`): default blocks without tuning, the fastest candidate picked
and cached per shape and device, and the rules that fit blocks to a problem."""

from __future__ import annotations

import json

import jax.numpy as jnp
import pytest

from jq.pallas_kernels import autotune, common
from jq.pallas_kernels.common import Blocks, Mode


def test_autotune_defaults_without_tuning(monkeypatch, tmp_path):
    def never(**kw):
        raise AssertionError("interpret mode must not compile anything")

    fit_gpu = lambda b: common.fit_blocks(b, "gpu", 7, 256, 256, 32)
    fit_tpu = lambda b: common.fit_blocks(b, "tpu", 700, 256, 256, 256)
    assert autotune.choose("k", Mode("gpu", True), 7, 256, 256, jnp.bfloat16, fit_gpu, never) == \
        autotune.default_blocks("gpu", 7)
    # JQ_AUTOTUNE=0 on a device: the defaults, after one compile-and-run check; nothing written to disk.
    monkeypatch.setenv("JQ_AUTOTUNE", "0")
    ran = []

    def probe(M):
        return lambda b: (lambda: ran.append(b))

    assert autotune.choose("k", Mode("tpu"), 700, 256, 256, jnp.bfloat16, fit_tpu, probe) == \
        autotune.default_blocks("tpu", 700)
    assert len(ran) == 1 and not (tmp_path / "autotune.json").exists()

    def broken(M):
        def run(b):
            raise RuntimeError("Mosaic failed to compile")
        return run

    with pytest.raises(autotune.NoBlocks, match="Mosaic failed"):
        autotune.choose("k2", Mode("tpu"), 700, 256, 256, jnp.bfloat16, fit_tpu, broken)


def test_autotune_picks_fastest_and_caches(monkeypatch, tmp_path):
    monkeypatch.setenv("JQ_AUTOTUNE_CACHE", str(tmp_path / "tune" / "cache.json"))
    built = []

    def make_runner(M):
        built.append(M)
        return lambda b: (lambda: b)

    def timer(thunk):
        b = thunk()
        if b.bn == 128:
            raise RuntimeError("out of shared memory")  # failing candidates are skipped
        return 1.0 / b.bn + b.bk * 1e-6

    mode = Mode("gpu")
    fit = lambda b: common.fit_blocks(b, "gpu", 5, 4096, 4096, 32, 2, 0.5)
    best = autotune.choose("w4a16_test", mode, 5, 4096, 4096, jnp.bfloat16, fit, make_runner, timer=timer)
    assert best.bn == 64 and best.bm == 16 and built == [5]
    data = json.loads((tmp_path / "tune" / "cache.json").read_text())
    (key,) = data
    assert key.endswith("|w4a16_test|m16|k4096|n4096|bfloat16") and data[key]["bn"] == 64
    autotune._MEMO.clear()  # a new process: read back from disk, no tuning
    assert autotune.choose("w4a16_test", mode, 6, 4096, 4096, jnp.bfloat16, fit, make_runner, timer=timer) == best
    assert built == [5]

    def all_fail(thunk):
        raise RuntimeError("no")

    with pytest.raises(autotune.NoBlocks):
        autotune.choose("w4a16_bad", mode, 5, 4096, 4096, jnp.bfloat16, fit, make_runner, timer=all_fail)


def test_fit_blocks_rules():
    f = common.fit_blocks(Blocks(16, 64, 256), "gpu", 1, 11008, 4096, 128)
    assert (f.blocks.bm, f.blocks.bn, f.blocks.bk, f.Mp, f.Kp, f.Np) == (16, 64, 256, 16, 11008, 4096)
    f = common.fit_blocks(Blocks(32, 512, 512), "tpu", 3, 11008, 14336, 256)
    assert f.blocks.bm == 32 and f.blocks.bn == 512 and 11008 % f.blocks.bk == 0 and f.blocks.bk % 256 == 0
    f = common.fit_blocks(Blocks(32, 512, 512), "tpu", 3, 96, 80, 128)  # small dims: one whole-dim block
    assert (f.blocks.bk, f.blocks.bn, f.Kp, f.Np) == (96, 80, 96, 80)
    # Shared memory: f32 activations with 128x128x128 tiles and 3 stages would need ~270 KiB on sm_90.
    f = common.fit_blocks(Blocks(128, 128, 64, 4, 3), "gpu", 256, 4096, 4096, 128, 4, 0.5)
    assert common.gpu_smem_estimate(f.blocks, 4, 0.5) <= common.GPU_SMEM_BUDGET and f.blocks.bk == 128
