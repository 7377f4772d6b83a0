"""Real multi-process runs on one machine: `jq.apps.launch` starts tests/multihost/worker.py as 1 process × 8 CPU
devices and as 2 processes × 4 (a JAX multi-controller run, gloo collectives), each running every scenario on the
same (data 2, fsdp 4) mesh; the two runs must agree:

- calibration statistics (Hessians, moments): equal within float32 reduction order (rtol 1e-6; bit-identical on
  jax 0.10 CPU), GPTQ codes / scales / zeros of a sequential pass: identical;
- two QAT steps and two LoRA steps: equal parameters (rtol 1e-6); a resume from the 2-process Orbax checkpoint
  continues bit for bit, and that checkpoint restores in this single process;
- the jq checkpoint written by 2 processes (each its shards) restores here in one process, and the one written
  by 1 process restores in 2, sharded, with the same codes.

About 20 s of CPU for the 1-process run and 40 s for the 2-process one (XLA at optimization level 0 in both).
"""

from __future__ import annotations

import importlib.util
import os
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from jq.apps.launch import launch, process_env

WORKER = Path(__file__).with_name("worker.py")
pytestmark = pytest.mark.slow  # two launches of a JAX program (~1 min of CPU)


def _worker():
    spec = importlib.util.spec_from_file_location("multihost_worker", WORKER)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(out dir, results of 1 process × 8 devices, results of 2 processes × 4 devices)."""
    out = tmp_path_factory.mktemp("multihost")
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COORDINATOR")}
    env["XLA_FLAGS"] = "--xla_backend_optimization_level=0"  # compile time; the same for both runs
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).parents[2]), env.get("PYTHONPATH")]))
    for n, name, extra in ((1, "one", []), (2, "two", ["--load", str(out / "one-q")])):
        status, logs = launch([sys.executable, str(WORKER), str(out), name, *extra], n, cpu_devices=8 // n,
                              timeout=400, env=env, echo=False)
        assert status == 0, f"{n}-process run failed ({status}):\n" + "\n".join(f"--- process {i}\n{log[-4000:]}"
                                                                              for i, log in enumerate(logs))
    return out, dict(np.load(out / "one.npz")), dict(np.load(out / "two.npz"))


def _group(res: dict, prefix: str) -> dict:
    found = {k[len(prefix) + 1:]: v for k, v in res.items() if k.startswith(prefix + "/")}
    assert found, f"no results under {prefix}/"
    return found


def _same(a: dict, b: dict, rtol: float = 0.0, atol: float = 0.0) -> None:
    assert sorted(a) == sorted(b)
    for k, x in a.items():
        if rtol or atol:
            np.testing.assert_allclose(x, b[k], rtol=rtol, atol=atol, err_msg=k)
        else:
            np.testing.assert_array_equal(x, b[k], err_msg=k)


def test_launcher_environment_and_a_failing_process_stops_the_rest():
    env = process_env(1, 2, 4321, cpu_devices=4, base={"XLA_FLAGS": "--xla_force_host_platform_device_count=8 --x"})
    assert env["JAX_COORDINATOR_ADDRESS"] == "localhost:4321" and env["JAX_NUM_PROCESSES"] == "2"
    assert env["JAX_PROCESS_ID"] == "1" and env["JAX_PLATFORMS"] == "cpu"
    assert env["XLA_FLAGS"] == "--x --xla_force_host_platform_device_count=4"
    code = "import os, sys, time\nif os.environ['JAX_PROCESS_ID'] == '1': print('failing'); sys.exit(3)\ntime.sleep(60)"
    t0 = time.monotonic()
    status, logs = launch([sys.executable, "-c", code], 2, echo=False)
    assert status == 3 and "failing" in logs[1]
    assert time.monotonic() - t0 < 30  # process 0 was stopped, not waited for
    assert launch([sys.executable, "-c", "import time; time.sleep(60)"], 1, timeout=1, echo=False)[0] == 124
    with pytest.raises(ValueError, match="no command given"):
        launch([], 2)


def test_auto_coordinator_lets_jax_detect_the_cluster(monkeypatch):
    import jax

    from jq import qat

    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda *a, **k: calls.append((a, k)))
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
    assert qat.maybe_initialize_distributed("auto") and calls == [((), {})]  # TPU pod slice, SLURM, Open MPI


def test_two_processes_ran_with_four_devices_each(runs):
    _, one, two = runs
    assert int(one["processes"]) == 1 and int(two["processes"]) == 2


def test_calibration_statistics_match_the_single_process_run(runs):
    _, one, two = runs
    a, b = _group(one, "calib"), _group(two, "calib")
    assert any(k.endswith("hessian") for k in a)
    _same(a, b, rtol=1e-6, atol=1e-7)  # float32 sums in another reduction order at most


def test_sequential_gptq_gives_the_same_codes(runs):
    _, one, two = runs
    a = _group(one, "gptq")
    assert any(k.endswith("/codes") for k in a) and any(k.endswith("/zero") for k in a)
    _same(a, _group(two, "gptq"))


def test_qat_and_adapter_steps_give_the_same_parameters(runs):
    _, one, two = runs
    for name in ("qat_step1", "qat", "lora"):
        _same(_group(one, name), _group(two, name), rtol=1e-6, atol=1e-7)
    assert any(not np.array_equal(v, _group(one, "qat_step1")[k]) for k, v in _group(one, "qat").items())
    _same(_group(two, "qat_resumed"), _group(two, "qat"))  # resumed from the 2-process Orbax checkpoint


def test_two_process_orbax_checkpoint_restores_in_one_process(runs):
    import jax
    import optax

    import jq
    from jq import qat

    out, one, _ = runs
    w = _worker()
    recipe = jq.load_recipe(w.REPO / "configs" / "qat_w4_g128.yaml")
    like = qat.init_train_state(qat.init(w.PARAMS, recipe), optax.adam(3e-3), qat.make_mesh(data=2, fsdp=4))
    with qat.Checkpointer(out / "two-orbax") as ck:
        assert ck.latest_step() == 1
        state, extra = ck.restore(like)
    assert extra["data"] == {"epoch": 0, "index": w.MICRO * w.ACCUM}
    assert state["params"]["params"]["layers_0"]["mlp"]["gate_proj"]["kernel"].sharding.mesh.size == 8
    _same(_group(w.flat("x", state["params"]), "x"), _group(one, "qat_step1"), rtol=1e-6, atol=1e-7)
    assert int(jax.device_get(state["step"])) == 1


def test_quantized_checkpoint_crosses_process_counts(runs):
    from jq import checkpoint

    out, one, two = runs
    gptq = _group(one, "gptq")
    _same(_group(two, "loaded"), gptq)  # written by 1 process, read sharded by 2
    _same(_group(two, "loaded_local"), gptq)  # and whole by each of the 2
    assert (out / "two-refused-0.txt").read_text().startswith("FileExistsError: ")  # an existing checkpoint
    assert (out / "two-refused-1.txt").read_text() == (f"RuntimeError: process 0 failed to start writing "
                                                       f"{out / 'two-q'}; its output says why")
    items = sorted((out / "two-q" / "arrays").iterdir())
    written_by = {p.name for item in items for p in (item / "state").glob("ocdbt.process_*")}
    assert written_by == {"ocdbt.process_0", "ocdbt.process_1"}  # each process wrote its own shards
    tree, meta = checkpoint.load(out / "two-q")  # written by 2 processes, read (CRCs checked) by 1
    assert meta["recipe"]["rules"][0]["method"] == "gptq"
    _same(_group(_worker().flat("x", tree), "x"), gptq)
