"""The static plan of one GPTQ run: sizes, block and sub-block lengths, and where group grids come from — all
Python ints and NumPy arrays known at trace time (see `jq.algorithms.gptq`)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax.numpy as jnp
import numpy as np

from jq.algorithms.grids import GridFitter, RangeFit
from jq.algorithms.refit import LeastSquaresRefit
from jq.numbers import formats
from jq.numbers.qtensor import Layout, QTensor
from jq.numbers.scheme import Scheme

__all__ = ["Plan", "check_options", "plan", "processing_order", "on_leading_axes"]

_SUB = 16  # channels per sub-block


@dataclasses.dataclass(frozen=True)
class Plan:
    """Static sizes of one GPTQ run (all Python ints / NumPy arrays, known at trace time)."""

    K: int  # real input channels (contraction axes flattened)
    Kp: int  # stored input channels (group axis zero-padded per leading index)
    Kt: int  # processed length: Kp rounded up to a multiple of the block
    N: int  # outputs (non-contraction axes flattened)
    B: int  # effective block size
    S: int  # sub-block size
    g: int | None  # group size (None for channel / tensor)
    level: str  # where grid params come from: "fixed", "static", "column" (in-block) or "block"
    store_perm: bool  # act-order groups: codes stored permuted, QTensor.perm set
    real_idx: np.ndarray | None  # [K] stored-flat position of each real channel; None when it is arange(K)

    @property
    def real_positions(self) -> np.ndarray:
        """[K] stored-flat positions of the real (not padding) inputs."""
        return np.arange(self.K) if self.real_idx is None else self.real_idx


def plan(layout: Layout, block_size: int, act_order: bool, static_groups: bool) -> Plan:
    """The static `Plan` of GPTQ on a kernel of logical shape `layout.shape` (contraction axes leading, [K..., N...]);
    raises ValueError for layouts GPTQ cannot run on (flat groups, ...); other axis arrangements are brought to this
    form first by `on_leading_axes`."""
    if layout.flat:
        raise ValueError(
            f"gptq: flat groups are not meaningful for GPTQ (layout {layout}); use per-axis groups with "
            "pad: true (flat_groups: false) for a group size that does not divide the input axis"
        )
    shape, axes = tuple(layout.shape), tuple(layout.axes)
    a = len(axes)
    if a == 0 or axes != tuple(range(a)) or a >= len(shape):
        raise ValueError(
            f"gptq: needs a kernel whose contraction axes lead and outputs follow (a Dense kernel (in, out) with "
            f"axes (0,), or DenseGeneral (in..., out...)); got layout shape={shape} axes={axes}. "
            "Quantize this weight with method: rtn"
        )
    if not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"gptq: block_size must be a positive int, got {block_size!r}")
    ka = shape[a - 1]
    ka_p = layout.padded if layout.padded is not None else ka
    lead = math.prod(shape[: a - 1])
    K, Kp, N = lead * ka, lead * ka_p, math.prod(shape[a:])
    group = layout.granularity == "group"
    store_perm = bool(act_order and group and not static_groups)
    real_idx = None
    if Kp != K:
        real_idx = (np.arange(lead)[:, None] * ka_p + np.arange(ka)[None, :]).reshape(-1)
    B = min(block_size, Kp)
    g = layout.group_size if group else None
    if not group:
        level = "fixed"
    elif static_groups:
        level = "static"
    elif g <= B:
        B, level = (B // g) * g, "column"
    else:
        d = max(x for x in range(1, B + 1) if g % x == 0)
        B, level = (d, "block") if 2 * d >= B else (g, "column")
    Kt = -(-Kp // B) * B
    # sub-blocks of S channels inside a block (S divides B, and g for in-block groups): channel-by-channel
    # updates touch only S rows, the rest of the block is updated by a matmul per sub-block
    m = g if level == "column" else B
    S = max(x for x in range(1, min(_SUB, m) + 1) if m % x == 0)
    if S < 4:
        S = B if level != "column" else S
    return Plan(K, Kp, Kt, N, B, S, g, level, store_perm, real_idx)


def processing_order(p: Plan, layout: Layout, diag: jnp.ndarray, act_order: bool
                     ) -> tuple[jnp.ndarray | None, jnp.ndarray | None, np.ndarray | None, jnp.ndarray | None]:
    """(order [Kt]: the stored-flat row processed at each step, or None for the stored order; o [K]: the real
    inputs in processing order, indexing H, or None; the processing positions of the real inputs, None when they
    come first; the group axis' shared order [ka] when act-order groups span several contraction axes, else None).

    Act-order sorts the inputs by descending diag H. With groups over several contraction axes (o_proj [heads,
    head_dim, d_model]) the stored permutation can only be of the group axis: it is ordered by diag H summed over
    the leading indices and shared by them, and the pass runs one leading index at a time, each index's padding
    after it; block padding comes last either way."""
    K, Kp, Kt = p.K, p.Kp, p.Kt
    if not act_order:
        return None, None, p.real_idx, None
    ka = layout.shape[len(layout.axes) - 1]
    if p.store_perm and K > ka:
        lead, ka_p = K // ka, Kp // (K // ka)
        shared = jnp.argsort(-diag.reshape(lead, ka).sum(0), stable=True).astype(jnp.int32)       # [ka]
        o = (jnp.arange(lead, dtype=jnp.int32)[:, None] * ka + shared).reshape(-1)
        stored = jnp.arange(lead, dtype=jnp.int32)[:, None] * ka_p
        order = jnp.concatenate([jnp.concatenate([stored + shared, stored + jnp.arange(ka, ka_p, dtype=jnp.int32)],
                                                 1).reshape(-1), jnp.arange(Kp, Kt, dtype=jnp.int32)])
        return order, o, p.real_idx, shared
    pos_real = p.real_positions
    rest = np.setdiff1d(np.arange(Kt), pos_real)  # group / block padding (decoupled in H, weights zero)
    o = jnp.argsort(-diag, stable=True)
    return jnp.concatenate([jnp.asarray(pos_real, jnp.int32)[o], jnp.asarray(rest, jnp.int32)]), o, None, None


def check_options(p: Plan, layout: Layout, scheme: Scheme, grid: GridFitter,
                  refit: LeastSquaresRefit | None,
                  static_groups: bool) -> bool:
    """Refuse a refit or a fitted (non-`RangeFit`) grid where groups are not formed during the pass, naming the
    layout and the fix; returns whether the grid is fitted (it then needs each group's valid rows)."""
    if refit is not None and p.level not in ("column", "block"):
        raise ValueError(f"gptq: refit applies to groups formed during the pass (granularity: group, "
                         f"static_groups: false); this layout is {layout.granularity!r} with static_groups="
                         f"{static_groups}. Drop the refit option")
    fitted = not isinstance(grid, RangeFit)  # a fitter that needs the group's valid rows (HQQ)
    if fitted and (p.level not in ("column", "block") or scheme.symmetric or not scheme.fmt.is_int):
        raise ValueError(f"gptq: the hqq option ({type(grid).__name__} grids) fits the zero point of asymmetric int "
                         f"groups formed during the pass; this is {scheme.describe()!r} with granularity "
                         f"{layout.granularity!r}, static_groups={static_groups}. Drop hqq, or use symmetric: false "
                         "with group_size")
    return fitted


def on_leading_axes(fn: Callable[..., tuple[QTensor, Any]], w: jnp.ndarray, layout: Layout, *args: Any,
                    **kwargs: Any) -> tuple[QTensor, Any]:
    """Run `fn(w', layout', *args, **kwargs) -> (QTensor, info)` on the weight transposed so that its contraction
    axes lead (in order) and the other axes follow — a Gemma-style `w (heads, d_model, head_dim)` contracted over
    axis 1 becomes `(d_model, heads, head_dim)`, i.e. [K, N] flattened — and give the QTensor back in `layout`
    (codes, scales and zero points transposed back; an act-order permutation of the group axis keeps its meaning,
    since the group axis is the last contraction axis in both). K is flattened in the order of the sorted
    contraction axes, as calibration flattens the inputs. Layouts whose axes already lead run unchanged."""
    nd = len(layout.shape)
    axes = sorted(layout.axes)
    perm = tuple(axes + [a for a in range(nd) if a not in axes])
    if layout.flat or not axes or perm == tuple(range(nd)):
        return fn(w, layout, *args, **kwargs)
    lt = dataclasses.replace(layout, shape=tuple(layout.shape[a] for a in perm), axes=tuple(range(len(axes))))
    q, info = fn(jnp.transpose(w, perm), lt, *args, **kwargs)
    inv = tuple(int(i) for i in np.argsort(perm))
    f = q.format
    codes = jnp.transpose(q.unpacked_codes(), inv)
    if f.packs:
        codes = formats.pack(codes, f.bits, axis=layout.pack_axis)
    back = dataclasses.replace(q, codes=codes, scale=jnp.transpose(q.scale, inv), layout=layout,
                               zero=None if q.zero is None else jnp.transpose(q.zero, inv))
    return back, info
