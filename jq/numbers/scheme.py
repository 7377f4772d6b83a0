"""Scheme: how one weight is quantized, as recipes write it — the flat record a YAML rule maps onto, composed of
three records with one concern each:

- `grid` (`jq.numbers.grid.Grid`): the values the weight is rounded to and the arithmetic on them;
- `range_search` (`jq.numbers.ranges.Range`): how a grid's range is found from the weights;
- `policy` (`jq.numbers.qtensor.ExecPolicy`): how the quantized weight executes — online rotation, activation
  quantization, the LLM.int8 outlier split — carried by the QTensor it produces.

Validated on construction (by those records); errors name the field and the allowed values.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

from jq.numbers.grid import SCALE_DTYPES, ZERO_POINTS, Grid
from jq.numbers.hadamard import Rotation
from jq.numbers.qtensor import ACT_FORMATS, ExecPolicy, Layout, QTensor
from jq.numbers.ranges import RANGE_METHODS, Range

__all__ = ["Scheme", "RANGE_METHODS", "ZERO_POINTS", "SCALE_DTYPES", "ACT_FORMATS", "ROTATIONS"]

ROTATIONS = ("hadamard",)
_GRID = tuple(f.name for f in dataclasses.fields(Grid))


@dataclasses.dataclass(frozen=True)
class Scheme:
    """How to quantize one weight. Validated on construction; errors name the field and the allowed values.

    Attributes:
      format: a name from `formats.FORMATS` ("int2".."int8", "fp8_e4m3", "fp8_e5m2", "fp4_e2m1", "fp6_e2m3",
        "fp6_e3m2", "nf4"; learned codebooks "cb2".."cb8" and "cb{b}x{d}", d ∈ 2, 4, which methods `kmeans`, `gptvq`
        and `higgs` fit: `jq.numbers.codebook`), or a microscaling preset that also fixes the block size and scale
        dtype (`jq.numbers.mx`): OCP MX v1.0 "mxfp4", "mxfp6_e2m3", "mxfp6_e3m2", "mxfp8_e4m3", "mxfp8_e5m2",
        "mxint8" (blocks of 32 along the contraction axis, e8m0 power-of-two scales) and NVIDIA's "nvfp4" (blocks of
        16, e4m3 scales, a float32 per-tensor `outer_scale`). A preset needs no group_size / scale_dtype (others
        than its own are refused) and `pad: true` where its block does not divide the contraction axis.
      symmetric: zero-centred grid (required for float and codebook formats).
      restricted: symmetric ints use −(2^(b−1)−1)..2^(b−1)−1 (drop the most negative code).
      granularity: "tensor", "channel" or "group"; a `group_size` implies "group".
      group_size: elements per group along the last contraction axis.
      pad: zero-pad the group axis to a multiple of `group_size` instead of raising (the last group is partial).
      flat_groups: form groups from the weight flattened with the group axis innermost (PyTorch's
        `W.reshape(-1, g)` on `(out, in)`); needs only that g divides the weight's size. Identical to per-axis
        groups when g divides the axis; offered for parity with toolkits that group this way.
      range: "minmax", "absmax", "percentile", "mse" (grid search of shrink factors under a p-norm) or "absmean"
        (±mean |x| per group: BitNet b1.58's ternary weight scale, with int2 symmetric restricted codes {-1, 0, 1}) or
        "gaussian" (±α*·rms per group, α* the clip that minimises the rounding MSE of a standard normal on the grid:
        QuEST's fit for Hadamard-rotated weights; int formats; `jq.numbers.ranges.gaussian_clip`).
      percentile: the upper percentile for range="percentile" (the lower one is 100 − p).
      mse_grid, mse_max_shrink, mse_norm: the MSE clip search visits shrink factors 1, 1−1/grid, … down to
        1 − max_shrink and keeps, per group, the one with the least sum |q(x) − x|^norm.
      zero_point: "int" (rounded, stored as uint8) or "float" (unrounded, stored in `scale_dtype`).
      scale_dtype: dtype scales (and float zero points) are stored in: "float16", "float32", "bfloat16" (presets:
        their own, "float8_e8m0fnu" / "float8_e4m3fn").
      scale_round: MX presets: "floor" (the OCP spec's 2^(floor(log2 amax) − emax), clipping the block's largest
        elements to the element max) or "ceil" (the smallest power of two that clips nothing: torchao's RCEIL).
      axes: contraction axes of the weight; None lets the caller pick (Dense kernels: (0,)).
      act: quantize the layer's input activations dynamically per token to this format ("int8", "fp8_e4m3",
        "int4") in the matmul (W8A8, W4A8, W4A4); None keeps them float (weight-only).
      act_clip: the per-token scale covers `act_clip` × max |x| (QuaRot clips int4 activations at 0.9), or
        "gaussian": α*·rms(x), the int grid's Gaussian-MSE-optimal clip (QuEST; for Hadamard-rotated inputs).
      act_outlier: LLM.int8 decomposition: input channels whose |x| exceeds this threshold for some token of the
        batch (6.0 in the paper) bypass activation quantization and multiply the dequantized weight in float.
      rotate: "hadamard" stores Qᵀ W (Q the normalised Hadamard matrix of the contraction length, any size
        `jq.numbers.hadamard` supports) and the matmul rotates its input by Q online: x Q · Qᵀ W = x W, with the input's
        outliers spread over all channels before activation quantization (QuaRot's online down_proj rotation).
        Needs a single contraction axis; calibration Hessians are rotated to match (Qᵀ H Q).
      progressive: QServe's QoQ progressive groups (`jq.numbers.progressive`): a float16 scale per output channel,
        then int4 codes with uint8 integer group scales and integer zeros on the int8 grid it defines, so that a W4A8
        matmul (`act: int8`) runs int8 × int8 after an integer dequantization. Needs an int format of at most 4 bits,
        symmetric: false and a group_size; scale_dtype becomes uint8.
    """

    format: str = "int8"
    symmetric: bool = True
    restricted: bool = False
    granularity: str = "channel"
    group_size: int | None = None
    pad: bool = False
    flat_groups: bool = False
    range: str = "minmax"
    percentile: float = 99.99
    mse_grid: int = 100
    mse_max_shrink: float = 0.8
    mse_norm: float = 2.4
    zero_point: str = "int"
    scale_dtype: str = "float16"
    axes: tuple[int, ...] | None = None
    act: str | None = None
    act_clip: float | str = 1.0
    act_outlier: float | None = None
    rotate: str | None = None
    scale_round: str = "floor"
    progressive: bool = False

    def __post_init__(self):
        if self.axes is not None:
            object.__setattr__(self, "axes", tuple(int(a) for a in self.axes))
        grid = Grid(**{f: getattr(self, f) for f in _GRID})
        for k in ("granularity", "group_size", "scale_dtype", "restricted"):  # a group_size implies "group"; presets
            object.__setattr__(self, k, getattr(grid, k))
        object.__setattr__(self, "_grid", grid)
        object.__setattr__(self, "_range", Range(self.range, self.percentile, self.mse_grid, self.mse_max_shrink,
                                                 self.mse_norm))
        try:
            rotation = Rotation.parse(self.rotate)
        except ValueError:
            raise ValueError(f"scheme field 'rotate' has value {self.rotate!r}; allowed values are {list(ROTATIONS)} "
                             "(or 'hadamard(seed=N)')") from None
        object.__setattr__(self, "_policy", ExecPolicy(rotation, self.act, self.act_clip, self.act_outlier))

    @property
    def grid(self) -> Grid:
        """The values the weight is rounded to, and the arithmetic on them."""
        return self._grid

    @property
    def range_search(self) -> Range:
        """How the grid's range is searched."""
        return self._range

    @property
    def policy(self) -> ExecPolicy:
        """How the quantized weight executes (what the QTensor carries)."""
        return self._policy

    @property
    def fmt(self) -> Any:
        """The grid's `Format` (`jq.numbers.formats`)."""
        return self._grid.fmt

    @property
    def bits(self) -> int:
        """Storage bits per code of the grid's format."""
        return self._grid.bits

    def describe(self) -> str:
        """The scheme in a few words: its grid ('int4 asym g128'), then range search, activations and rotation."""
        r = "" if self.range == "minmax" else f" {self.range}"
        a = f" a:{self.act}" if self.act else ""
        a += f"@{self.act_clip}" if self.act and self.act_clip != 1.0 else ""
        a += f" outlier>{self.act_outlier:g}" if self.act_outlier is not None else ""
        rot = f" rot:{self.rotate}" if self.rotate else ""
        return f"{self._grid.describe()}{r}{a}{rot}"

    def layout(self, shape: tuple[int, ...], axes: tuple[int, ...], path: str = "<array>") -> Layout:
        """The layout of a weight of `shape` contracted over `axes` on this scheme's grid; errors name `path`."""
        return self._grid.layout(shape, axes, path)

    def make_qtensor(self, codes_g: jnp.ndarray, scale_g: jnp.ndarray, zero_g: jnp.ndarray | None, layout: Layout,
                     dtype: Any, perm: jnp.ndarray | None = None) -> QTensor:
        """`Grid.make_qtensor` with this scheme's execution policy."""
        return self._grid.make_qtensor(codes_g, scale_g, zero_g, layout, dtype, perm, self._policy)
