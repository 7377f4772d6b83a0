"""Scheme: what grid a weight is rounded to (format, symmetry, granularity, range method, scale dtype), the
scale / zero-point arithmetic for a range, fake quantization, and packing the result into a QTensor.

Conventions (those of GPTQ, AutoGPTQ, llm-compressor and torchao, so results compare):
- symmetric int: scale = absmax / ((2^b − 1) / 2), codes in [−2^(b−1), 2^(b−1) − 1] (int4: absmax/7.5, −8..7);
  `restricted=True` gives absmax / (2^(b−1) − 1) and codes −7..7.
- asymmetric int: the range is widened to contain 0, scale = (max − min) / (2^b − 1),
  zero = round(−min / scale) in code units (or unrounded with `zero_point="float"`), codes in [0, 2^b − 1].
- fp8 / fp4 / NF4 (symmetric only): scale = absmax / format max.
Scales are rounded to `scale_dtype` *before* the codes are computed, so stored scales and codes agree exactly.
"""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp

from jq.numbers import formats
from jq.numbers.qtensor import GRANULARITIES, Layout, QTensor, grid_label

__all__ = ["Scheme", "RANGE_METHODS"]

RANGE_METHODS = ("minmax", "absmax", "percentile", "mse", "absmean")
ZERO_POINTS = ("int", "float")
SCALE_DTYPES = ("float32", "float16", "bfloat16")
ACT_FORMATS = ("int8", "fp8_e4m3", "int4")
ROTATIONS = ("hadamard",)


def _choice(field: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"scheme field {field!r} has value {value!r}; allowed values are {list(allowed)}")


@dataclasses.dataclass(frozen=True)
class Scheme:
    """How to quantize one weight. Validated on construction; errors name the field and the allowed values.

    Attributes:
      format: a name from `formats.FORMATS` ("int2".."int8", "fp8_e4m3", "fp8_e5m2", "fp4_e2m1", "nf4").
      symmetric: zero-centred grid (required for float and codebook formats).
      restricted: symmetric ints use −(2^(b−1)−1)..2^(b−1)−1 (drop the most negative code).
      granularity: "tensor", "channel" or "group"; a `group_size` implies "group".
      group_size: elements per group along the last contraction axis.
      pad: zero-pad the group axis to a multiple of `group_size` instead of raising (the last group is partial).
      flat_groups: form groups from the weight flattened with the group axis innermost (PyTorch's
        `W.reshape(-1, g)` on `(out, in)`); needs only that g divides the weight's size. Identical to per-axis
        groups when g divides the axis; offered for parity with toolkits that group this way.
      range: "minmax", "absmax", "percentile", "mse" (grid search of shrink factors under a p-norm) or "absmean"
        (±mean |x| per group: BitNet b1.58's ternary weight scale, with int2 symmetric restricted codes {-1, 0, 1}).
      percentile: the upper percentile for range="percentile" (the lower one is 100 − p).
      mse_grid, mse_max_shrink, mse_norm: the MSE clip search visits shrink factors 1, 1−1/grid, … down to
        1 − max_shrink and keeps, per group, the one with the least sum |q(x) − x|^norm.
      zero_point: "int" (rounded, stored as uint8) or "float" (unrounded, stored in `scale_dtype`).
      scale_dtype: dtype scales (and float zero points) are stored in.
      axes: contraction axes of the weight; None lets the caller pick (Dense kernels: (0,)).
      act: quantize the layer's input activations dynamically per token to this format ("int8", "fp8_e4m3",
        "int4") in the matmul (W8A8, W4A8, W4A4); None keeps them float (weight-only).
      act_clip: the per-token scale covers `act_clip` × max |x| (QuaRot clips int4 activations at 0.9).
      act_outlier: LLM.int8 decomposition: input channels whose |x| exceeds this threshold for some token of the
        batch (6.0 in the paper) bypass activation quantization and multiply the dequantized weight in float.
      rotate: "hadamard" stores Qᵀ W (Q the normalised Hadamard matrix of the contraction length, any size
        `jq.numbers.hadamard` supports) and the matmul rotates its input by Q online: x Q · Qᵀ W = x W, with the input's
        outliers spread over all channels before activation quantization (QuaRot's online down_proj rotation).
        Needs a single contraction axis; calibration Hessians are rotated to match (Qᵀ H Q).
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
    act_clip: float = 1.0
    act_outlier: float | None = None
    rotate: str | None = None

    def __post_init__(self):
        if self.act is not None:
            _choice("act", self.act, ACT_FORMATS)
        if not (isinstance(self.act_clip, (int, float)) and 0.0 < self.act_clip <= 1.0):
            raise ValueError(f"scheme field 'act_clip' has value {self.act_clip!r}; use a ratio in (0, 1]")
        if self.act_outlier is not None:
            if self.act is None or not isinstance(self.act_outlier, (int, float)) or self.act_outlier <= 0:
                raise ValueError(f"scheme field 'act_outlier' has value {self.act_outlier!r} with act={self.act!r}; "
                                 "it is a positive threshold (e.g. 6.0) and needs activation quantization (act: int8)")
        if self.rotate is not None:
            _choice("rotate", self.rotate, ROTATIONS)
        _choice("format", self.format, formats.FORMATS)
        if self.group_size is not None:
            if not isinstance(self.group_size, int) or self.group_size < 1:
                raise ValueError(f"scheme field 'group_size' has value {self.group_size!r}; use a positive int")
            object.__setattr__(self, "granularity", "group")
        _choice("granularity", self.granularity, GRANULARITIES)
        if self.granularity == "group" and self.group_size is None:
            raise ValueError("scheme field 'group_size' is missing; granularity 'group' needs e.g. group_size: 128")
        if self.flat_groups and (self.granularity != "group" or self.pad):
            raise ValueError(
                "scheme field 'flat_groups' needs granularity 'group' (a group_size) and pad: false; "
                f"got granularity {self.granularity!r}, pad {self.pad!r}"
            )
        _choice("range", self.range, RANGE_METHODS)
        _choice("zero_point", self.zero_point, ZERO_POINTS)
        _choice("scale_dtype", self.scale_dtype, SCALE_DTYPES)
        if not self.fmt.is_int and not self.symmetric:
            raise ValueError(
                f"scheme field 'symmetric' is False but format {self.format!r} has no zero point; "
                "use symmetric: true, or an int format for asymmetric quantization"
            )
        if not 50.0 < self.percentile <= 100.0:
            raise ValueError(f"scheme field 'percentile' has value {self.percentile!r}; use a value in (50, 100]")
        if not 0.0 <= self.mse_max_shrink < 1.0 or self.mse_grid < 1 or self.mse_norm <= 0:
            raise ValueError(
                f"scheme MSE search fields mse_grid={self.mse_grid}, mse_max_shrink={self.mse_max_shrink}, "
                f"mse_norm={self.mse_norm}; need grid >= 1, 0 <= max_shrink < 1, norm > 0"
            )
        if self.axes is not None:
            object.__setattr__(self, "axes", tuple(int(a) for a in self.axes))

    @property
    def fmt(self) -> formats.Format:
        return formats.get_format(self.format)

    @property
    def bits(self) -> int:
        return self.fmt.bits

    def describe(self) -> str:
        """The scheme in a few words: its grid ('int4 asym g128'), then range search, activations and rotation."""
        g = f"g{self.group_size}{' flat' if self.flat_groups else ''}" if self.granularity == "group" else self.granularity
        r = "" if self.range == "minmax" else f" {self.range}"
        a = f" a:{self.act}" if self.act else ""
        a += f"@{self.act_clip:g}" if self.act and self.act_clip != 1.0 else ""
        a += f" outlier>{self.act_outlier:g}" if self.act_outlier is not None else ""
        rot = f" rot:{self.rotate}" if self.rotate else ""
        return f"{grid_label(self.format, self.symmetric, g)}{r}{a}{rot}"

    # -- layout ---------------------------------------------------------------------------------------------
    def layout(self, shape: tuple[int, ...], axes: tuple[int, ...], path: str = "<array>") -> Layout:
        """The layout of a weight of `shape` contracted over `axes`; errors name `path`."""
        nd = len(shape)
        axes = tuple(sorted(a % nd for a in axes)) if nd else ()
        if any(not -nd <= a < nd for a in (self.axes or ())):
            raise ValueError(f"{path}: axes {self.axes} out of range for shape {shape}")
        padded = None
        if self.flat_groups:
            n = math.prod(shape)
            if n % self.group_size:
                raise ValueError(
                    f"{path}: group_size {self.group_size} does not divide the {n} elements of shape {shape}; "
                    "flat groups need that — choose another group size, or flat_groups: false with pad: true"
                )
            return Layout(tuple(shape), axes, "group", self.group_size, None, flat=True)
        if self.granularity == "group":
            ga = max(axes) if axes else nd - 1
            k = shape[ga]
            if k % self.group_size:
                if not self.pad:
                    raise ValueError(
                        f"{path}: group_size {self.group_size} does not divide axis {ga} of length {k} "
                        f"(shape {shape}); choose a group size that divides {k}, or set pad: true"
                    )
                padded = -(-k // self.group_size) * self.group_size
        return Layout(tuple(shape), axes, self.granularity, self.group_size, padded)

    # -- arithmetic in the grouped view ---------------------------------------------------------------------
    @property
    def code_span(self) -> float:
        """What a scale divides a range by: max |x| / scale = this (symmetric), (max − min) / scale = this
        (asymmetric)."""
        f = self.fmt
        if not f.is_int:
            return float(f.max)
        if not self.symmetric:
            return float(2**f.bits - 1)
        return float(2 ** (f.bits - 1) - 1 if self.restricted else (2**f.bits - 1) / 2)

    def scale_zero(self, lo: jnp.ndarray, hi: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray | None]:
        """Scales (rounded to `scale_dtype`, returned as f32) and zero points (code units) for ranges lo..hi."""
        f = self.fmt
        sdt = jnp.dtype(self.scale_dtype)
        if self.symmetric:
            amax = jnp.maximum(jnp.abs(lo), jnp.abs(hi))
            scale = _nonzero((amax / self.code_span).astype(sdt).astype(jnp.float32))
            return scale, None
        lo, hi = jnp.minimum(lo, 0.0), jnp.maximum(hi, 0.0)
        qmax = 2**f.bits - 1
        scale = _nonzero(((hi - lo) / qmax).astype(sdt).astype(jnp.float32))
        zero = -lo / scale
        if self.zero_point == "int":
            zero = jnp.clip(jnp.round(zero), 0, qmax)
        else:
            zero = zero.astype(sdt).astype(jnp.float32)
        return scale, zero

    def encode(self, xg: jnp.ndarray, scale: jnp.ndarray, zero: jnp.ndarray | None) -> jnp.ndarray:
        """Codes (unpacked) for the grouped view `xg` under broadcastable `scale` / `zero`."""
        y = xg / scale
        if zero is not None:
            y = y + zero
        return self.fmt.encode(y, symmetric=self.symmetric, restricted=self.restricted)

    def decode(self, codes: jnp.ndarray, scale: jnp.ndarray, zero: jnp.ndarray | None) -> jnp.ndarray:
        v = self.fmt.decode(codes, jnp.float32)
        if zero is not None:
            v = v - zero
        return v * scale

    def fake_quant(self, xg: jnp.ndarray, scale: jnp.ndarray, zero: jnp.ndarray | None) -> jnp.ndarray:
        """Quantize then dequantize (float in, float out), same shape."""
        return self.decode(self.encode(xg, scale, zero), scale, zero)

    # -- the quantized tensor -------------------------------------------------------------------------------
    def make_qtensor(
        self,
        codes_g: jnp.ndarray,
        scale_g: jnp.ndarray,
        zero_g: jnp.ndarray | None,
        layout: Layout,
        dtype,
        perm: jnp.ndarray | None = None,
    ) -> QTensor:
        """Assemble a QTensor from unpacked codes / keepdims scales in the grouped view of `layout`."""
        f = self.fmt
        codes = codes_g.reshape(layout.stored_shape)
        if f.packs:
            codes = formats.pack(codes, f.bits, axis=layout.pack_axis)
        squeeze = (layout.inner_axis,) if layout.granularity == "group" else ()
        scale = jnp.squeeze(scale_g, squeeze).astype(self.scale_dtype)
        zero = None
        if zero_g is not None:
            zdt = jnp.uint8 if self.zero_point == "int" else jnp.dtype(self.scale_dtype)
            zero = jnp.squeeze(zero_g, squeeze).astype(zdt)
        return QTensor(
            codes=codes,
            scale=scale.reshape(layout.scale_shape),
            zero=None if zero is None else zero.reshape(layout.scale_shape),
            perm=perm,
            fmt=self.format,
            layout=layout,
            symmetric=self.symmetric,
            restricted=self.restricted,
            dtype=jnp.dtype(dtype).name,
            act=self.act,
            act_clip=float(self.act_clip),
            act_outlier=None if self.act_outlier is None else float(self.act_outlier),
            rotation=self.rotate,
        )


def _nonzero(scale: jnp.ndarray) -> jnp.ndarray:
    """An all-zero group gets scale 1: its codes are the zero point and it dequantizes to exact zeros."""
    return jnp.where(scale > 0, scale, jnp.ones_like(scale))
