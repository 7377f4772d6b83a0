"""One process of a multi-controller run (started by `jq.apps.launch`, one or several processes over 8 CPU devices
in all, a (data 2, fsdp 4) mesh) that runs every scenario of tests/multihost/test_multihost.py in sequence:

  calib    capture statistics (Hessians, moments) of a tiny Llama, data parallel over the mesh
  gptq     a sequential GPTQ pass, data parallel, → codes / scales / zeros
  qat      two QAT steps (Orbax checkpoint after step 1), and the same run resumed from that checkpoint
  lora     two LoRA adapter steps on the frozen GPTQ result, sharded
  ckpt     the GPTQ result, sharded over all 8 devices, written as a jq checkpoint by every process (each its
           shards); with --load DIR, a checkpoint written elsewhere read back onto the mesh

    python tests/multihost/worker.py OUT_DIR NAME [--load DIR]

Process 0 writes OUT_DIR/NAME.npz (every result, gathered to the host); OUT_DIR/NAME-q is the jq checkpoint and
OUT_DIR/NAME-orbax the QAT train-state checkpoint.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

from jq import qat

qat.maybe_initialize_distributed()  # from the launcher's JAX_COORDINATOR_ADDRESS / _NUM_PROCESSES / _PROCESS_ID

import jax
import numpy as np
import optax
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jq
from jq import adapters as A
from jq import checkpoint
from jq.calibration.capture import capture
from jq.calibration.sequential import quantize_sequential
from jq.models.llama.blocks import block_spec
from jq.models.llama.config import LlamaConfig
from jq.models.llama.model import Llama, init_params
from jq.tree.paths import leaf_paths

REPO = Path(__file__).resolve().parents[2]
CFG = dataclasses.replace(LlamaConfig.tiny(vocab_size=64), n_layers=1)  # one block: compile time
SEQ, MICRO, ACCUM = 16, 8, 2
PARAMS = jax.jit(init_params, static_argnums=0)(CFG, jax.random.PRNGKey(0))
GPTQ = {"rules": [{"pattern": r"layers_\d+/.*kernel", "format": "int4", "symmetric": False, "group_size": 16,
                   "method": "gptq"}]}


def host(x) -> np.ndarray:
    """A (possibly multi-process) array on the host, whole."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def flat(prefix: str, tree) -> dict[str, np.ndarray]:
    """{prefix/path/field: host array} of a tree with QTensors (their codes, scale, zero, ... by field)."""
    out = {}
    for path, x in leaf_paths(tree):
        for kp, a in jax.tree_util.tree_flatten_with_path(x)[0]:
            field = "".join(str(getattr(k, "name", getattr(k, "key", k))) for k in kp)
            out[f"{prefix}/{path}" + (f"/{field}" if field else "")] = host(a)
    return out


def windows(n: int = 64) -> np.ndarray:
    rng = np.random.default_rng(3)
    start, step = rng.integers(0, 64, size=(n, 1)), rng.integers(1, 3, size=(n, 1))
    return ((start + step * np.arange(SEQ)) % 64).astype(np.int32)


def over_all_devices(tree, mesh):
    """Each array split on its first dim over all 8 devices when it divides (so every process holds only part of
    it), else replicated."""
    def put(a):
        spec = P(("data", "fsdp")) if a.ndim and a.shape[0] % mesh.size == 0 else P()
        host_a = np.asarray(a)
        return jax.make_array_from_callback(a.shape, NamedSharding(mesh, spec), lambda idx: host_a[idx])

    return jax.tree_util.tree_map(put, tree)


def lm_loss(model):
    def loss_fn(params, ids):
        logits = qat.apply(model, {"params": params}, ids)
        return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], ids[:, 1:]).mean()

    return loss_fn


def run_qat(out: Path, name: str, mesh) -> dict[str, np.ndarray]:
    recipe = jq.load_recipe(REPO / "configs" / "qat_w4_g128.yaml")
    params = PARAMS
    opt = optax.adam(3e-3)
    step = qat.make_train_step(lm_loss(Llama(CFG)), opt, recipe, mesh=mesh)

    def fresh():
        return qat.init_train_state(qat.init(params, recipe), opt, mesh)

    batches = qat.WindowBatches(windows(), MICRO, ACCUM, seed=5)
    state, _ = step(fresh(), qat.shard_batch(next(batches), mesh))
    with qat.Checkpointer(out / f"{name}-orbax") as ck:
        ck.save(state, {"data": batches.state()})
    res = flat("qat_step1", state["params"])
    state, _ = step(state, qat.shard_batch(next(batches), mesh))
    res.update(flat("qat", state["params"]))
    resumed = qat.WindowBatches(windows(), MICRO, ACCUM, seed=5)
    with qat.Checkpointer(out / f"{name}-orbax") as ck:
        again, extra = ck.restore(fresh())
    resumed.restore(extra["data"])
    again, _ = step(again, qat.shard_batch(next(resumed), mesh))
    res.update(flat("qat_resumed", again["params"]))
    return res


def run_lora(mesh, base) -> dict[str, np.ndarray]:
    model = Llama(CFG)
    cfg = A.LoraConfig(rank=4, alpha=8)

    def loss_fn(ad, ids, base):
        logits = jq.interop.apply(model, {"params": A.combine(base, ad, cfg)}, ids)
        return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], ids[:, 1:]).mean()

    opt = optax.adam(1e-2)
    step = qat.make_train_step(loss_fn, opt, mesh=mesh)
    state = qat.init_train_state({"params": A.init(base, cfg, jax.random.PRNGKey(1)), "quant": {}}, opt, mesh)
    batches, sharded_base = qat.WindowBatches(windows(), MICRO, ACCUM), qat.shard_tree(base, mesh)
    for _ in range(2):
        state, _ = step(state, qat.shard_batch(next(batches), mesh), sharded_base)
    return flat("lora", state["params"])


def _lap(what: str, t0: list[float]) -> None:
    now = time.perf_counter()
    print(f"process {jax.process_index()}: {what} {now - t0[0]:.1f} s", flush=True)
    t0[0] = now


def main(argv: list[str]) -> int:
    out, name = Path(argv[0]), argv[1]
    load = Path(argv[argv.index("--load") + 1]) if "--load" in argv else None
    mesh = qat.make_mesh(data=2, fsdp=4)
    assert jax.device_count() == 8, jax.devices()
    res: dict[str, np.ndarray] = {"processes": np.int32(jax.process_count())}
    t0 = [time.perf_counter()]

    params = PARAMS
    tokens = np.random.default_rng(0).integers(0, 64, (16, SEQ)).astype(np.int32)
    stats = capture(Llama(CFG), {"params": params}, [tokens[:8], tokens[8:]], mesh=mesh,
                    traced=False)
    for path, st in stats.items():
        for field in ("hessian", "act_absmean", "act_sq", "act_absmax"):
            res[f"calib/{path}/{field}"] = host(getattr(st, field))
    _lap("calibration statistics", t0)

    q, _ = quantize_sequential(block_spec(CFG), params, jq.recipe_from_dict(GPTQ), tokens, batch_size=8, mesh=mesh,
                               progress=False)
    res.update(flat("gptq", q))
    _lap("sequential GPTQ", t0)
    res.update(run_qat(out, name, mesh))
    _lap("QAT steps, Orbax save and resume", t0)
    res.update(run_lora(mesh, q))
    _lap("LoRA steps", t0)

    sharded = over_all_devices(q, mesh)
    checkpoint.save(out / f"{name}-q", sharded, recipe=GPTQ)
    try:  # a refused write: process 0 says why, the others that it failed
        checkpoint.save(out / f"{name}-q", sharded, recipe=GPTQ)
    except (FileExistsError, RuntimeError) as e:
        (out / f"{name}-refused-{jax.process_index()}.txt").write_text(f"{type(e).__name__}: {e}")
    if load is not None:
        # every stored array split on its first dim over all 8 devices where it divides (else replicated)
        loaded, _ = checkpoint.load(load, mesh=mesh, shardings=lambda _path, _abstract: P(("data", "fsdp")))
        res.update(flat("loaded", loaded))
        res.update(flat("loaded_local", checkpoint.load(load)[0]))  # no mesh: whole, on each process's own device
    _lap("jq checkpoint write and read", t0)
    if jax.process_index() == 0:
        np.savez(out / f"{name}.npz", **res)
    print(f"process {jax.process_index()} of {jax.process_count()}: done", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
