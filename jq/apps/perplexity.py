"""Perplexity over non-overlapping windows of a token stream, for any `forward(params, ids) -> logits`."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


@jax.jit
def window_nll_sum(logits: jax.Array, ids: jax.Array) -> jax.Array:
    """Summed next-token NLL. logits: [B, T, V] (any float dtype), ids: [B, T] int -> scalar fp32.

    Position t predicts ids[:, t+1]; the last position has no target, so B*(T-1) terms. NLL = logsumexp − the
    target's logit, both reductions over the logits in place: no [B, T, V] temporary (a log-softmax copy of Gemma's
    262k-entry logits is 2 GB per 4 windows).
    """
    x = logits.astype(jnp.float32)
    lse = jax.nn.logsumexp(x, axis=-1)[:, :-1]
    target = jnp.take_along_axis(x[:, :-1], ids[:, 1:, None].astype(jnp.int32), axis=-1)[..., 0]
    return jnp.sum(lse - target)


def make_windows(token_ids: Sequence[int] | np.ndarray, window: int, windows: int,
                 bos: int | None = None) -> np.ndarray:
    """The first `windows` non-overlapping windows of `window` tokens -> int32 [n, window] (n <= windows). With a
    `bos` id, each window is BOS + the next `window - 1` text tokens (the loss then covers window - 1 text tokens).

    Raises ValueError when the text is shorter than one window; warns when fewer than `windows` exist.
    """
    if window < 2:
        raise ValueError(f"window must be at least 2 tokens (one prediction needs a context token), got {window}")
    if windows < 1:
        raise ValueError(f"windows must be at least 1, got {windows}")
    ids = np.asarray(token_ids, dtype=np.int32).reshape(-1)
    if bos is not None:
        text = make_windows(ids, window - 1, windows)
        return np.concatenate([np.full((len(text), 1), bos, np.int32), text], axis=1)
    available = ids.size // window
    if available == 0:
        raise ValueError(
            f"the text has {ids.size} tokens, fewer than one window of {window}: use a longer text or a smaller --window"
        )
    if available < windows:
        warnings.warn(
            f"only {available} windows of {window} tokens in {ids.size} tokens (asked for {windows}); using {available}",
            stacklevel=3,
        )
    n = min(available, windows)
    return ids[: n * window].reshape(n, window)


def perplexity(
    forward: Callable[[Any, jax.Array], jax.Array],
    params: Any,
    token_ids: Sequence[int] | np.ndarray,
    window: int = 512,
    windows: int = 16,
    batch_size: int = 4,
    bos: int | None = None,
) -> dict[str, float | int]:
    """exp(mean next-token NLL) over the first `windows` non-overlapping `window`-token windows.

    forward(params, ids[B, window] int32) -> logits[B, window, V]; params are passed through untouched (they may be
    quantized containers). `bos`: start each window with it (`make_windows`). Returns {"perplexity", "nll" (mean, nats), "tokens" (predicted positions),
    "windows" (windows used)}.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    batches = make_windows(token_ids, window, windows, bos)
    total = 0.0
    for start in range(0, len(batches), batch_size):
        ids = jnp.asarray(batches[start: start + batch_size])
        total += float(window_nll_sum(forward(params, ids), ids))
    count = len(batches) * (window - 1)
    nll = total / count
    return {"perplexity": math.exp(nll), "nll": nll, "tokens": count, "windows": len(batches)}
