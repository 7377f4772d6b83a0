"""The end-to-end cost of changing one weight: KL(float model's next-token distribution ‖ the changed model's),
resumed from the first module call that reads the changed weight.

Measuring each layer and candidate alone (`jq autoquant --refine`, `metric="kl"`) runs the whole model once per
pair, although every module call before the first one that reads the changed leaf computes exactly what the float
model computed. So the reference run records, for each call the root module makes (its embedding, its blocks, its
final norm ...), its output and the module scopes it reached (its own and any nested or shared module's); a run for a
change to leaf `path` returns the recorded outputs for the calls before the first one that reached `path`'s module
and computes from there on. Exact for any linen model whose forward is deterministic (a model whose blocks run
inside one scanned call just resumes from that call: nothing is skipped). The rows of the calibration batch run one
at a time, so the vocabulary-sized temporaries are those of one row. Under a large vocabulary (Gemma 3's 262k) the
LM head is most of each run: `stride` scores every stride-th position only, the head run on those alone.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jq.models.family import LoadedModel

__all__ = ["logit_kl", "log_probs", "mean_kl"]


def log_probs(logits: jax.Array) -> jax.Array:
    """Next-token log-probabilities (float32) of logits [..., V]."""
    return jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)


def mean_kl(log_p: jax.Array, log_q: jax.Array) -> jax.Array:
    """Mean over the positions of KL(p ‖ q) for log-probabilities [..., V] (`log_probs`)."""
    return jnp.mean(jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1))


class _Calls:
    """The calls the root module makes, in order, during one trace: each one's scopes reached and output."""

    def __init__(self, replay: tuple = (), skip: int = 0, rerun: frozenset[int] = frozenset(), head: int = -1,
                 stride: int = 1):
        self.depth, self.scopes, self.outputs = 0, [], []
        self.replay, self.skip, self.rerun, self.head, self.stride = replay, skip, rerun, head, stride

    def intercept(self, next_fun, args, kwargs, context):
        scope = tuple(context.module.scope.path) if context.module.scope is not None else ()
        self.depth += 1
        try:
            if self.depth == 2:  # a call the root module makes (depth 1 is the root's own call)
                index = len(self.scopes)
                self.scopes.append({scope})
                if index < self.skip and index not in self.rerun:
                    return self.replay[index]
                if index == self.head and self.stride > 1:  # the head on every stride-th position only
                    args = (args[0][:, ::self.stride], *args[1:])
                out = next_fun(*args, **kwargs)
                self.outputs.append(out)
                return out
            if self.depth > 2:
                self.scopes[-1].add(scope)
            return next_fun(*args, **kwargs)
        finally:
            self.depth -= 1


def _first_reader(scopes: list[set[tuple[str, ...]]], path: str) -> int:
    """The index of the first root-level call that reached a module owning leaf `path` ("a/b/kernel"), or 0 when
    none did (a parameter the root module reads itself, at a point no call marks: nothing is replayed then)."""
    owner = tuple(path.split("/")[:-1])
    for i, reached in enumerate(scopes):
        if any(owner[:len(s)] == s for s in reached):
            return i
    return 0


def logit_kl(m: LoadedModel, ids: np.ndarray, stride: int = 1) -> Callable[..., float]:
    """kl(params, changed=None) → the mean over the tokens of `ids` (int [S, T]) of KL(float model's next-token
    distribution ‖ the one under `params`, the model's tree with float or quantized leaves). `changed`: the one leaf
    path in which `params` differs from the float model's (a layer quantized alone): the calls before the first one
    that reads it are not run again. `stride` > 1: the mean over every stride-th position only — the last call (the
    LM head, most of the work under a large vocabulary) runs on those; checked to be position-wise, else a
    ValueError. Compiled once per tree structure and resume point."""
    if stride < 1:
        raise ValueError(f"logit_kl(stride={stride}): the stride between scored positions must be at least 1")
    module = m.family.module(m.cfg)
    ids = jnp.asarray(ids)
    probe = _Calls()
    with nn.intercept_methods(probe.intercept):
        jax.eval_shape(lambda p: module.apply({"params": p}, ids[:1]), m.params)
    scopes = probe.scopes
    kept = max(len(scopes) - 1, 0)  # every call's output but the last one's (the logits: never replayed)
    # a module called again later (a tied embedding, read first and as the head) is run, not replayed: its later
    # call needs what its first one set up
    rerun = frozenset(i for i, s in enumerate(scopes) if any(s & later for later in scopes[i + 1:]))

    def traced(params, row, replay=(), skip=0, head_stride=stride):
        calls = _Calls(replay, skip, rerun, kept, head_stride)
        with nn.intercept_methods(calls.intercept):
            logits = module.apply({"params": params}, row[None])[0]
        return log_probs(logits), calls

    if stride > 1:
        row = ids[0, :min(ids.shape[1], 4 * stride)]
        every, strided = traced(m.params, row, head_stride=1)[0][::stride], traced(m.params, row)[0]
        if every.shape != strided.shape or not np.allclose(every, strided, rtol=1e-4, atol=1e-4):
            raise ValueError(f"logit_kl(stride={stride}): the model's last call (its LM head) is not position-wise "
                             "on its first argument's axis 1, so positions cannot be skipped there; use stride=1")

    @jax.jit
    def reference(params):
        def row_fn(row):
            log_p, calls = traced(params, row)
            return log_p, tuple(calls.outputs[:kept])
        return jax.lax.map(row_fn, ids)

    ref, recorded = reference(m.params)

    def resumed(skip: int):
        @jax.jit
        def kl(params, ref, recorded):
            def row_kl(xs):
                row, log_p, replay = xs
                log_q, _ = traced(params, row, replay, skip)
                return mean_kl(log_p, log_q)
            return jnp.mean(jax.lax.map(row_kl, (ids, ref, recorded[:skip])))
        return kl

    compiled: dict[int, Any] = {}

    def kl(params: Any, changed: str | None = None) -> float:
        skip = 0 if changed is None else min(_first_reader(scopes, changed), kept)
        if skip not in compiled:
            compiled[skip] = resumed(skip)
        return float(compiled[skip](params, ref, recorded))

    return kl
