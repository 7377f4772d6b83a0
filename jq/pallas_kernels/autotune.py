"""Block sizes per backend and shape: defaults, a small autotuner, and its on-disk cache.

`choose` answers "which (bm, bn, bk, num_warps, num_stages) for this kernel and problem":

- interpret mode (CPU tests): the defaults of `default_blocks`, never compiling or timing anything;
- a cached answer for (backend, device kind, kernel, M bucket, K, N, dtype): that;
- otherwise: time each of a handful of candidates on the real device with synthetic operands of the real
  shapes (compile failures, e.g. too much shared memory, are skipped), keep the fastest, and store it;
- `JQ_AUTOTUNE=0`: the defaults, after one compile-and-run check of them (not cached on disk).

If nothing compiles and runs, `NoBlocks` is raised; dispatch turns that into a fallback reason, so a kernel
that does not build on some device costs one failed compile, not the user's program.

Tuning happens when a kernel is first traced for a shape, so inside `jax.jit` too (the timing runs under
`jax.ensure_compile_time_eval`); the first trace of a new shape costs a few compilations. M is bucketed (all of
M <= 16 together, then powers of two up to 4096) so decode and prefill tune separately without one entry per
length.

Cache: JSON at platformdirs `user_cache_dir("jq") / "autotune.json"` (or `$JQ_AUTOTUNE_CACHE`), a map from
"backend|device kind|kernel|mM|kK|nN|dtype" to the chosen blocks and their time in seconds.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable

import jax
from jax.typing import DTypeLike

from jq.pallas_kernels.common import Blocks, Fit, Mode, next_pow2

__all__ = [
    "choose", "default_blocks", "candidate_blocks", "cache_path", "cache_key", "tuning_enabled", "m_bucket",
    "NoBlocks",
]

log = logging.getLogger("jq.pallas_kernels")

ENV_TUNE = "JQ_AUTOTUNE"
ENV_CACHE = "JQ_AUTOTUNE_CACHE"
M_CAP = 4096


class NoBlocks(RuntimeError):
    """No candidate block configuration compiled and ran on this device for a kernel and shape."""


# Answers already known in this process: cache key -> Blocks, or the NoBlocks message of a failed tuning.
_MEMO: dict[tuple[str, str], Blocks | str] = {}

# Candidates: decode (M <= 16), middle (M <= 128), large M. (bm, bn, bk, num_warps, num_stages).
_GPU = {
    "small": [(16, 32, 256, 4, 4), (16, 64, 256, 4, 4), (16, 64, 128, 4, 4), (16, 128, 128, 4, 3),
              (16, 32, 512, 4, 3), (16, 64, 512, 4, 3)],
    "mid": [(32, 64, 128, 4, 3), (64, 64, 128, 4, 3), (64, 128, 64, 4, 3), (32, 128, 128, 4, 3),
            (64, 128, 128, 8, 3), (16, 64, 256, 4, 4)],
    "large": [(128, 128, 64, 4, 3), (128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (64, 128, 64, 4, 4),
              (128, 128, 128, 8, 3), (64, 256, 64, 4, 3)],
}
_TPU = {
    "small": [(32, 512, 512, 4, 3), (32, 256, 512, 4, 3), (32, 512, 1024, 4, 3), (32, 1024, 512, 4, 3),
              (32, 256, 1024, 4, 3)],
    "mid": [(128, 512, 512, 4, 3), (128, 256, 512, 4, 3), (128, 512, 1024, 4, 3), (64, 512, 512, 4, 3)],
    "large": [(256, 512, 512, 4, 3), (256, 256, 512, 4, 3), (512, 512, 512, 4, 3), (256, 512, 1024, 4, 3),
              (128, 512, 1024, 4, 3)],
}


def _size_class(M: int) -> str:
    return "small" if M <= 16 else ("mid" if M <= 128 else "large")


def candidate_blocks(style: str, M: int) -> list[Blocks]:
    """The blocks the tuner tries for this style and M (before fitting to the problem); the first is the default."""
    table = _GPU if style == "gpu" else _TPU
    return [Blocks(*c) for c in table[_size_class(M)]]


def default_blocks(style: str, M: int) -> Blocks:
    """Blocks used untuned: interpret mode, JQ_AUTOTUNE=0, or when every candidate failed."""
    return candidate_blocks(style, M)[0]


def m_bucket(M: int) -> int:
    """16 for every decode-sized M (one 16-row tile either way), else the next power of two, capped at 4096."""
    return min(next_pow2(max(M, 16)), M_CAP)


def tuning_enabled(mode: Mode) -> bool:
    """Never in interpret mode; otherwise unless JQ_AUTOTUNE is 0/off/false."""
    if mode.interpret:
        return False
    return os.environ.get(ENV_TUNE, "1").strip().lower() not in ("0", "off", "false", "no")


def cache_path() -> Path:
    """The tuning cache file: $JQ_AUTOTUNE_CACHE, else autotune.json in the user cache directory."""
    env = os.environ.get(ENV_CACHE)
    if env:
        return Path(env)
    try:
        import platformdirs

        base = Path(platformdirs.user_cache_dir("jq"))
    except ImportError:  # pragma: no cover - platformdirs is a dependency
        base = Path.home() / ".cache" / "jq"
    return base / "autotune.json"


def _device_kind() -> str:
    try:
        return jax.devices()[0].device_kind
    except Exception:  # pragma: no cover
        return "unknown"


def cache_key(kernel: str, M: int, K: int, N: int, dtype: DTypeLike) -> str:
    """The cache key of `kernel` on an (M, K) x (K, N) problem: backend, device kind, kernel, M bucket, K, N, dtype."""
    return "|".join([jax.default_backend(), _device_kind(), kernel, f"m{m_bucket(M)}", f"k{K}", f"n{N}",
                     jax.numpy.dtype(dtype).name])


def _load(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _store(path: Path, key: str, entry: dict) -> None:
    """Merge one entry into the cache file atomically (another process may be writing too: last one wins)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        data = _load(path)
        data[key] = entry
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".autotune.", suffix=".json")
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except OSError as e:  # a read-only cache dir only costs re-tuning
        log.warning("could not write the autotune cache %s: %s", path, e)


def time_call(thunk: Callable[[], object], iters: int = 10) -> float:
    """Median wall time of `thunk()` (blocked until ready) over `iters` runs after one warm-up / compile run."""
    jax.block_until_ready(thunk())
    ts = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(thunk())
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def _run_once(thunk: Callable[[], object]) -> float:
    jax.block_until_ready(thunk())
    return 0.0


def choose(
    kernel: str,
    mode: Mode,
    M: int,
    K: int,
    N: int,
    dtype: DTypeLike,
    fit: Callable[[Blocks], Fit],
    make_runner: Callable[..., Callable[[Blocks], Callable[[], object]]],
    *,
    timer: Callable[[Callable[[], object]], float] = time_call,
) -> Blocks:
    """Blocks for `kernel` on an (M, K) x (K, N) problem: cached, tuned now, or the defaults (see module doc).

    fit(blocks) adapts requested blocks to the problem (`common.fit_blocks` with the kernel's constraints).
    make_runner(M=...) builds synthetic operands once and returns a function from blocks to a thunk running
    the kernel with them; `timer` measures a thunk (injectable for tests). Raises NoBlocks when tuning found
    no candidate that runs (dispatch then falls back to XLA with that reason).
    """
    default = default_blocks(mode.style, M)
    if mode.interpret:
        return default
    tune = tuning_enabled(mode)
    key = cache_key(kernel, M, K, N, dtype) + ("" if tune else "|untuned")
    path = cache_path()
    memo = _MEMO.get((str(path), key))
    if isinstance(memo, str):
        raise NoBlocks(memo)
    if memo is not None:
        return memo
    if tune:
        hit = _load(path).get(key)
        if hit:
            best = Blocks(**{f.name: hit[f.name] for f in dataclasses.fields(Blocks)})
            _MEMO[(str(path), key)] = best
            return best
    seen, cands = set(), []
    for c in candidate_blocks(mode.style, M) if tune else [default]:
        fb = fit(c)
        if fb.blocks not in seen:
            seen.add(fb.blocks)
            cands.append(fb)
    # Candidates that pad the weight (a copy every call) only compete when nothing fits without padding.
    unpadded = [f for f in cands if f.Np == N and f.Kp == K]
    cands = unpadded or cands
    if not tune:
        timer = _run_once
    results, errors = [], []
    with jax.ensure_compile_time_eval():
        run = make_runner(M=M)
        for fb in cands:
            try:
                t = timer(run(fb.blocks))
            except Exception as e:  # a candidate that does not compile (shared memory, registers) is skipped
                first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
                log.debug("autotune %s: %s failed: %s", kernel, fb.blocks, first)
                errors.append(first)
                continue
            results.append((t, fb.blocks))
    if not results:
        msg = f"no block configuration of {kernel} ran for M={M} K={K} N={N} ({errors[0] if errors else 'none'})"
        log.warning("autotune: %s", msg)
        _MEMO[(str(path), key)] = msg
        raise NoBlocks(msg)
    t, best = min(results, key=lambda r: r[0])
    if tune:
        log.info("autotune %s M=%d K=%d N=%d: %s in %.1f us", kernel, M, K, N, best, t * 1e6)
        _store(path, key, {**dataclasses.asdict(best), "seconds": t})
    else:
        best = default
    _MEMO[(str(path), key)] = best
    return best
