"""Sharded QAT fine-tuning: a (data, fsdp) device mesh, a jitted train step with gradient accumulation, a
resumable batch iterator, Orbax checkpoints, and multi-host start-up.

Sharding (FSDP, ZeRO-3 style). Every parameter, learned step size and optimizer moment is split along its largest
dimension that the `fsdp` axis size divides (replicated when none does); batches are split over both mesh axes.
XLA inserts the all-gathers of weights and the reduce-scatters of gradients. The step's result is the single-device
result up to the order of floating-point reductions.

Gradient accumulation. A batch is `[grad_accum, micro_batch, ...]`; one step scans over the micro-batches, sums
gradients, divides by `grad_accum` and applies one optimizer update — the update of the whole batch.

Resume. A checkpoint holds the train state (params, learned quantization parameters, optimizer state, step) and
the iterator's position; restoring both continues the run bit for bit.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jq.tree.recipe import QuantConfig
from jq.qat.tree import fake_quantize

__all__ = [
    "make_mesh",
    "param_spec",
    "tree_shardings",
    "batch_sharding",
    "shard_batch",
    "shard_tree",
    "init_train_state",
    "make_train_step",
    "WindowBatches",
    "Checkpointer",
    "maybe_initialize_distributed",
]

DATA, FSDP = "data", "fsdp"


# -- mesh and shardings ---------------------------------------------------------------------------------------------


def make_mesh(data: int | None = None, fsdp: int | None = None, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 2-D mesh ("data", "fsdp") over `devices` (default: all). Defaults: one data row per process (host), fsdp
    over each host's devices; give one of the two sizes and the other is inferred."""
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    if data is None and fsdp is None:
        data = jax.process_count() if n % jax.process_count() == 0 else 1
    if data is None:
        data = n // fsdp
    if fsdp is None:
        fsdp = n // data
    if data * fsdp != n:
        raise ValueError(f"mesh data={data} x fsdp={fsdp} does not cover the {n} devices")
    return Mesh(np.asarray(devices, dtype=object).reshape(data, fsdp), (DATA, FSDP))


def param_spec(shape: tuple[int, ...], n_fsdp: int) -> P:
    """Shard the largest dimension the fsdp size divides (the first such on ties); replicate when none does."""
    if n_fsdp > 1:
        for d in sorted(range(len(shape)), key=lambda i: -shape[i]):
            if shape[d] % n_fsdp == 0 and shape[d] >= n_fsdp:
                return P(*([None] * d + [FSDP]))
    return P()


def tree_shardings(tree: Any, mesh: Mesh) -> Any:
    """A NamedSharding per array leaf of `tree` (params, optimizer state, ...) by `param_spec`."""
    n = mesh.shape[FSDP]
    return jax.tree_util.tree_map(lambda x: NamedSharding(mesh, param_spec(tuple(np.shape(x)), n)), tree)


def batch_sharding(mesh: Mesh, shape: tuple[int, ...], batch_axis: int = 1) -> NamedSharding:
    """Split `batch_axis` over (data, fsdp) when their product divides it, else over data, else replicate."""
    b = shape[batch_axis]
    nd, nf = mesh.shape[DATA], mesh.shape[FSDP]
    axes = (DATA, FSDP) if b % (nd * nf) == 0 else (DATA if b % nd == 0 else None)
    spec = [None] * len(shape)
    spec[batch_axis] = axes
    return NamedSharding(mesh, P(*spec))


def shard_tree(tree: Any, mesh: Mesh | None) -> Any:
    """Place a pytree of arrays (e.g. a frozen teacher) on `mesh` by `tree_shardings`; unchanged without a mesh."""
    return tree if mesh is None else jax.device_put(tree, tree_shardings(tree, mesh))


def shard_batch(batch: np.ndarray, mesh: Mesh | None, batch_axis: int = 1) -> jax.Array:
    """Put a host batch (the same global batch on every process, e.g. [grad_accum, micro_batch, T]) onto the mesh,
    same shape; each device takes its slice."""
    if mesh is None:
        return jnp.asarray(batch)
    sharding = batch_sharding(mesh, batch.shape, batch_axis)
    return jax.make_array_from_callback(batch.shape, sharding, lambda idx: batch[idx])


# -- train state and step -------------------------------------------------------------------------------------------


def init_train_state(qat_params: dict[str, Any], optimizer: optax.GradientTransformation,
                     mesh: Mesh | None = None) -> dict:
    """{"params": qat_params, "opt_state": optimizer.init(qat_params), "step": int32 0}, sharded on `mesh`."""
    def make(p):
        return {"params": p, "opt_state": optimizer.init(p), "step": jnp.zeros((), jnp.int32)}

    if mesh is None:
        return make(qat_params)
    return jax.jit(make, out_shardings=tree_shardings(jax.eval_shape(make, qat_params), mesh))(qat_params)


def make_train_step(
    loss_fn: Callable[..., jax.Array],
    optimizer: optax.GradientTransformation,
    cfg: QuantConfig | None = None,
    *,
    mesh: Mesh | None = None,
    donate: bool = True,
    rng_seed: int | None = None,
) -> Callable[[dict, Any], tuple[dict, dict]]:
    """A jitted `step(state, batch, *frozen) -> (state, {"loss", "grad_norm"})`.

    loss_fn(params, micro_batch, *frozen) -> scalar: the ordinary loss of the float model; `params` is
      `fake_quantize(qat_params, cfg)` (or the float params when `cfg` is None: the float control run).
    batch: leaves [grad_accum, micro_batch, ...]; gradients are averaged over the leading axis (one update).
    frozen: arrays the loss reads but nobody trains, e.g. a distillation teacher's params (shard them with
      `shard_tree`); passed as arguments, not closed over, so they are not baked into the compiled step.
    mesh: keep the state sharded by `tree_shardings` (put the state there with `init_train_state(..., mesh)` and
      batches with `shard_batch`). `donate` reuses the old state's buffers.
    rng_seed: when given, `loss_fn` also gets `key=` a PRNG key folded from (seed, step, micro-batch index), e.g.
      for adapter dropout; a resumed run draws the same keys.
    """

    def loss_of(qp, mb, frozen, key):
        p = qp["params"] if cfg is None else fake_quantize(qp, cfg)
        return loss_fn(p, mb, *frozen) if key is None else loss_fn(p, mb, *frozen, key=key)

    def constrain(tree):
        return tree if mesh is None else jax.lax.with_sharding_constraint(tree, tree_shardings(tree, mesh))

    def step(state, batch, *frozen):
        qp = state["params"]
        n = jax.tree_util.tree_leaves(batch)[0].shape[0]
        step_key = None if rng_seed is None else jax.random.fold_in(jax.random.PRNGKey(rng_seed), state["step"])

        def micro(acc, xs):
            mb, i = xs
            key = None if step_key is None else jax.random.fold_in(step_key, i)
            loss, g = jax.value_and_grad(loss_of)(qp, mb, frozen, key)
            return jax.tree_util.tree_map(jnp.add, acc, (loss, constrain(g))), None

        zero = (jnp.zeros((), jnp.float32), jax.tree_util.tree_map(jnp.zeros_like, qp))
        (loss, grads), _ = jax.lax.scan(micro, zero, (batch, jnp.arange(n)))
        loss, grads = loss / n, jax.tree_util.tree_map(lambda g: g / n, grads)
        updates, opt_state = optimizer.update(grads, state["opt_state"], qp)
        new = {"params": optax.apply_updates(qp, updates), "opt_state": opt_state, "step": state["step"] + 1}
        return constrain(new), {"loss": loss, "grad_norm": optax.global_norm(grads)}

    return jax.jit(step, donate_argnums=(0,) if donate else ())


# -- data -----------------------------------------------------------------------------------------------------------


class WindowBatches:
    """Resumable batches of token windows: epoch e visits the windows [N, L] in the order of a permutation seeded
    by (seed, e); each batch is int32 [grad_accum, micro_batch, L] (an epoch's remainder is skipped).

    `state()` → {"epoch", "index"} (JSON-able) and `restore(state)` make a resumed run see the same batches.
    """

    def __init__(self, windows: np.ndarray, micro_batch: int, grad_accum: int = 1, seed: int = 0):
        self.windows = np.asarray(windows, np.int32)
        self.micro_batch, self.grad_accum, self.seed = int(micro_batch), int(grad_accum), int(seed)
        self.per_batch = self.micro_batch * self.grad_accum
        if self.per_batch > len(self.windows):
            raise ValueError(f"a batch of {self.grad_accum} x {self.micro_batch} windows needs at least "
                             f"{self.per_batch}; the corpus has {len(self.windows)} — lower --batch-size / --seq-len")
        self.epoch, self.index = 0, 0
        self._cached: tuple[int, np.ndarray] | None = None

    def _order(self, epoch: int) -> np.ndarray:
        if self._cached is None or self._cached[0] != epoch:
            self._cached = (epoch, np.random.default_rng([self.seed, epoch]).permutation(len(self.windows)))
        return self._cached[1]

    def state(self) -> dict[str, int]:
        """The iterator's position {"epoch", "index"} (JSON-able, for a checkpoint)."""
        return {"epoch": self.epoch, "index": self.index}

    def restore(self, state: dict[str, int]) -> None:
        """Continue from a position `state()` returned."""
        self.epoch, self.index = int(state["epoch"]), int(state["index"])

    def __iter__(self) -> Iterator[np.ndarray]:
        return self

    def __next__(self) -> np.ndarray:
        if self.index + self.per_batch > len(self.windows):
            self.epoch, self.index = self.epoch + 1, 0
        pick = self._order(self.epoch)[self.index : self.index + self.per_batch]
        self.index += self.per_batch
        return self.windows[pick].reshape(self.grad_accum, self.micro_batch, -1)


# -- checkpoints ----------------------------------------------------------------------------------------------------


class Checkpointer:
    """Orbax checkpoints of a train state plus a JSON-able dict (the iterator position), one directory per step.

        ckpt = Checkpointer(directory, keep=3)
        ckpt.save(state, {"data": it.state()})
        state, extra = ckpt.restore(state_like)      # latest step; arrays come back with state_like's shardings
    """

    def __init__(self, directory: str | os.PathLike, keep: int | None = 3):
        import orbax.checkpoint as ocp

        self._ocp = ocp
        self.directory = Path(directory).absolute()
        self.manager = ocp.CheckpointManager(
            self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
        )

    def latest_step(self) -> int | None:
        """The newest saved step, or None when the directory holds none."""
        return self.manager.latest_step()

    def save(self, state: dict, extra: dict | None = None, *, wait: bool = True) -> int:
        """Save `state` (at its `state["step"]`, replacing one there) and the JSON-able `extra`; returns the step."""
        ocp = self._ocp
        step = int(jax.device_get(state["step"]))
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                        extra=ocp.args.JsonSave(extra or {})), force=True)
        if wait:
            self.manager.wait_until_finished()
        return step

    def restore(self, state_like: dict, step: int | None = None) -> tuple[dict, dict]:
        """(state, extra) of `step` (default: the latest); arrays take `state_like`'s shapes, dtypes, shardings."""
        ocp = self._ocp
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        self._check_params(step, state_like)
        abstract = jax.tree_util.tree_map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), state_like
        )
        out = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                                 extra=ocp.args.JsonRestore()))
        return out["state"], dict(out["extra"] or {})

    def _check_params(self, step: int, state_like: dict) -> None:
        """Refuse a resume whose trained tree differs from the saved one (other adapter ranks or targets, another
        recipe), naming the first differing leaf, before Orbax's own less specific error."""
        try:
            saved = self._ocp.StandardCheckpointHandler().metadata(self.directory / str(step) / "state")
            saved = getattr(saved, "tree", saved)["params"]
        except Exception:  # no metadata to compare (an older Orbax layout): Orbax checks what it can
            return
        from jq.tree.paths import path_str

        def shapes(tree):
            flat = jax.tree_util.tree_flatten_with_path(tree)[0]
            return {path_str(kp): tuple(getattr(x, "shape", ())) for kp, x in flat}

        have, want = shapes(saved), shapes(state_like["params"])
        for path in sorted(set(have) | set(want)):
            if have.get(path) != want.get(path):
                raise ValueError(
                    f"checkpoint step {step} in {self.directory}: params/{path} is "
                    f"{'absent' if path not in have else 'shape ' + str(have[path])} there but "
                    f"{'absent' if path not in want else 'shape ' + str(want[path])} in this run: it was trained with "
                    "other settings (adapter rank or targets, recipe). Resume with those, or use a fresh --ckpt-dir")

    def close(self) -> None:
        """Wait for pending saves, then release the manager."""
        self.manager.wait_until_finished()
        self.manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- multi-host -----------------------------------------------------------------------------------------------------


def maybe_initialize_distributed(coordinator: str | None = None, num_processes: int | None = None,
                                 process_id: int | None = None) -> bool:
    """Call `jax.distributed.initialize` when launched multi-host: a coordinator HOST:PORT is given here or in
    JAX_COORDINATOR_ADDRESS (with JAX_NUM_PROCESSES / JAX_PROCESS_ID, unless the cluster is auto-detected), or
    "auto": JAX detects the cluster itself (TPU pod slice, SLURM, Open MPI). Returns whether it initialized; a
    single-process launch does nothing. Must run before any other JAX call (docs/MULTIHOST.md)."""
    coordinator = coordinator or os.environ.get("JAX_COORDINATOR_ADDRESS")
    if not coordinator or jax.distributed.is_initialized():
        return False
    if coordinator == "auto":
        jax.distributed.initialize()
        return True
    env_n, env_id = os.environ.get("JAX_NUM_PROCESSES"), os.environ.get("JAX_PROCESS_ID")
    num_processes = num_processes if num_processes is not None else (int(env_n) if env_n else None)
    process_id = process_id if process_id is not None else (int(env_id) if env_id else None)
    jax.distributed.initialize(coordinator, num_processes, process_id)
    return True
