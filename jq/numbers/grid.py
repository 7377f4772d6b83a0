"""Grid: what values a weight is rounded to — format, symmetry, granularity (tensor / channel / group, padding),
zero-point kind and scale dtype — and the arithmetic on it: the scale / zero point for a range, encoding, decoding,
fake quantization, and packing the result into a QTensor. A `Scheme` (jq.numbers.scheme) holds a Grid with a range
search and an execution policy; the KV cache uses a Grid alone.

Conventions (those of GPTQ, AutoGPTQ, llm-compressor and torchao, so results compare):
- symmetric int: scale = absmax / ((2^b − 1) / 2), codes in [−2^(b−1), 2^(b−1) − 1] (int4: absmax/7.5, −8..7);
  `restricted=True` gives absmax / (2^(b−1) − 1) and codes −7..7.
- asymmetric int: the range is widened to contain 0, scale = (max − min) / (2^b − 1),
  zero = round(−min / scale) in code units (or unrounded with `zero_point="float"`), codes in [0, 2^b − 1].
  `zero_point="min"` stores the minimum itself in weight units (in `scale_dtype`) and a weight is code·scale + min —
  GGUF Q4_1 / K-quants' d·q + m; the range is not widened, so 0 need not be on the grid.
- fp8 / fp4 / NF4 (symmetric only): scale = absmax / format max.
- microscaling presets (mxfp4 … mxint8, nvfp4): blocks of the spec's size, power-of-two e8m0 scales (NVFP4: e4m3
  scales under a per-tensor float32 `outer_scale`), by the rules of `jq.numbers.mx`.
- progressive (QServe's QoQ, `jq.numbers.progressive`): asymmetric int4 groups with uint8 integer scales and integer
  zeros on the int8 grid of a per-output-channel float16 `outer_scale`.
Scales are rounded to `scale_dtype` *before* the codes are computed, so stored scales and codes agree exactly.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Collection
from typing import Any

import jax.numpy as jnp
from jax.typing import DTypeLike

from jq.numbers import additive, formats, mx, progressive
from jq.numbers.codebook import check_codebook_layout
from jq.numbers.layout import GRANULARITIES
from jq.numbers.qtensor import ExecPolicy, Layout, QTensor, grid_label

__all__ = ["Grid", "ZERO_POINTS", "SCALE_DTYPES", "choice"]

ZERO_POINTS = ("int", "float", "min")
SCALE_DTYPES = ("float32", "float16", "bfloat16")


def choice(field: str, value: Any, allowed: Collection[Any]) -> None:
    """ValueError naming the scheme field, its value and the allowed values unless `value` is allowed."""
    if value not in allowed:
        raise ValueError(f"scheme field {field!r} has value {value!r}; allowed values are {list(allowed)}")


@dataclasses.dataclass(frozen=True)
class Grid:
    """The grid one weight is rounded to. Validated on construction; errors name the field and the allowed values.
    Fields as the same names of `jq.numbers.scheme.Scheme` (which documents them)."""

    format: str = "int8"
    symmetric: bool = True
    restricted: bool = False
    granularity: str = "channel"
    group_size: int | None = None
    pad: bool = False
    flat_groups: bool = False
    zero_point: str = "int"
    scale_dtype: str = "float16"
    axes: tuple[int, ...] | None = None
    scale_round: str = "floor"
    progressive: bool = False

    def __post_init__(self):
        additive.check_name(self.format)  # aq{B}x{M} with B or M out of range: say which
        choice("format", self.format, formats.FORMATS)
        if self.progressive:
            self._progressive_fields()
        choice("scale_round", self.scale_round, mx.SCALE_ROUNDINGS)
        if self.fmt.is_mx:
            self._preset_fields()
        elif self.scale_round != "floor":
            raise ValueError(f"scheme field 'scale_round' has value {self.scale_round!r}, but format {self.format!r} "
                             f"has no power-of-two block scales; drop scale_round, or use one of {list(mx.PRESETS)}")
        if self.group_size is not None:
            if not isinstance(self.group_size, int) or self.group_size < 1:
                raise ValueError(f"scheme field 'group_size' has value {self.group_size!r}; use a positive int")
            object.__setattr__(self, "granularity", "group")
        choice("granularity", self.granularity, GRANULARITIES)
        if self.granularity == "group" and self.group_size is None:
            raise ValueError("scheme field 'group_size' is missing; granularity 'group' needs e.g. group_size: 128")
        if self.flat_groups and (self.granularity != "group" or self.pad):
            raise ValueError(
                "scheme field 'flat_groups' needs granularity 'group' (a group_size) and pad: false; "
                f"got granularity {self.granularity!r}, pad {self.pad!r}"
            )
        choice("zero_point", self.zero_point, ZERO_POINTS)
        if not self.fmt.is_mx and not self.progressive:
            choice("scale_dtype", self.scale_dtype, SCALE_DTYPES)
        if not self.fmt.is_int and not self.symmetric:
            raise ValueError(
                f"scheme field 'symmetric' is False but format {self.format!r} has no zero point; "
                "use symmetric: true, or an int format for asymmetric quantization"
            )
        if self.axes is not None:
            object.__setattr__(self, "axes", tuple(int(a) for a in self.axes))

    def _preset_fields(self) -> None:
        """A microscaling preset fixes block size, scale dtype and a symmetric grid (MXINT8: ±127)."""
        f, name = self.fmt, repr(self.format)
        if self.group_size not in (None, f.block):
            raise ValueError(f"scheme field 'group_size' has value {self.group_size!r}, but format {name} fixes blocks "
                             f"of {f.block}; drop group_size (or set group_size: {f.block})")
        short = {"float8_e8m0fnu": "e8m0", "float8_e4m3fn": "e4m3"}[f.scale_dtype_name]
        if self.scale_dtype not in ("float16", f.scale_dtype_name, short):  # float16: the field's default
            raise ValueError(f"scheme field 'scale_dtype' has value {self.scale_dtype!r}, but format {name} stores "
                             f"its block scales as {f.scale_dtype_name}; drop scale_dtype")
        if not self.symmetric:
            raise ValueError(f"scheme field 'symmetric' is False but format {name} has no zero point; use "
                             "symmetric: true")
        for k, v in (("group_size", f.block), ("granularity", "group"), ("scale_dtype", f.scale_dtype_name),
                     ("restricted", f.is_int)):
            object.__setattr__(self, k, v)

    def _progressive_fields(self) -> None:
        """QoQ's progressive grid (`jq.numbers.progressive`): asymmetric int (≤ 4 bits) groups, integer zeros, uint8
        group scales under a per-channel float16 outer scale."""
        f = self.fmt
        if not (f.is_int and not f.is_mx and f.bits <= 4 and not self.symmetric and self.zero_point == "int"
                and self.group_size is not None and not self.flat_groups and self.scale_dtype in ("float16", "uint8")):
            raise ValueError(
                f"scheme field 'progressive' is true with format {self.format!r}, symmetric {self.symmetric!r}, "
                f"zero_point {self.zero_point!r}, group_size {self.group_size!r}, flat_groups {self.flat_groups!r}, "
                f"scale_dtype {self.scale_dtype!r}; progressive groups need an int format of at most 4 bits, "
                "symmetric: false, zero_point: int, a group_size, flat_groups: false and no scale_dtype (it is uint8)")
        object.__setattr__(self, "scale_dtype", "uint8")

    def outer_scale(self, w: jnp.ndarray, axes: tuple[int, ...] | None = None) -> jnp.ndarray | None:
        """The second-level scale for the weight `w`, or None for grids without one: NVFP4's per-tensor float32 scale
        (shape ()) max |w| / (448 · 6); a progressive grid's float16 per-output-channel scales over the contraction
        `axes` (keepdims, e.g. [1, N]; `jq.numbers.progressive.channel_scale`). Methods quantize w / outer_scale and
        the QTensor stores it (`jq.tree.quantize`)."""
        if self.progressive:
            if axes is None:
                raise ValueError("a progressive grid's outer scale is per output channel: pass the contraction axes")
            return progressive.channel_scale(w, axes)
        if self.fmt.scale_dtype_name != "float8_e4m3fn":
            return None
        return mx.outer_scale(jnp.max(jnp.abs(jnp.asarray(w, jnp.float32))))

    @property
    def fmt(self) -> formats.Format:
        """The `Format` named by `format`."""
        return formats.get_format(self.format)

    @property
    def bits(self) -> int:
        """Storage bits per code of the format (before packing)."""
        return self.fmt.bits

    def describe(self) -> str:
        """'int4 asym g128': the grid in a few words (`jq.numbers.qtensor.grid_label`)."""
        g = f"g{self.group_size}{' flat' if self.flat_groups else ''}" if self.granularity == "group" else self.granularity
        if self.fmt.is_mx:  # 'mxfp4 g32': the preset says the rest
            return f"{self.format} {g}" + (" ceil" if self.scale_round == "ceil" else "")
        return grid_label(self.format, self.symmetric, g) + (" min" if self.zero_point == "min" and not self.symmetric
                                                              else "") + (" progressive" if self.progressive else "")

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
            lay = Layout(tuple(shape), axes, "group", self.group_size, None, flat=True)
            if self.fmt.is_lookup:
                check_codebook_layout(self.fmt, lay, path, per_table=False, kinds=formats.LOOKUP_KINDS)
            return lay
        if self.granularity == "group":
            ga = max(axes) if axes else nd - 1
            k = shape[ga]
            if k % self.group_size:
                if not self.pad:
                    fix = (f"format {self.format} fixes blocks of {self.group_size}: set pad: true (zero-pads the axis)"
                           if self.fmt.is_mx else f"choose a group size that divides {k}, or set pad: true")
                    raise ValueError(
                        f"{path}: group_size {self.group_size} does not divide axis {ga} of length {k} "
                        f"(shape {shape}); {fix}"
                    )
                padded = -(-k // self.group_size) * self.group_size
        lay = Layout(tuple(shape), axes, self.granularity, self.group_size, padded)
        if self.fmt.is_lookup:  # vectors tile the axis (table sizes: the method's check)
            check_codebook_layout(self.fmt, lay, path, per_table=False, kinds=formats.LOOKUP_KINDS)
        return lay

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
        """Scales (rounded to `scale_dtype`, returned as f32) and zero points (code units; the minimum in weight units
        for `zero_point="min"`) for ranges lo..hi; all of the ranges' shape (keepdims over the grouped view, e.g.
        [G, 1, N]), zero None when symmetric."""
        f = self.fmt
        if f.is_mx:
            return mx.block_scale(jnp.maximum(jnp.abs(lo), jnp.abs(hi)), f, self.scale_round), None
        if self.progressive:
            return progressive.scale_zero(lo, hi, f.bits)
        sdt = jnp.dtype(self.scale_dtype)
        if self.symmetric:
            amax = jnp.maximum(jnp.abs(lo), jnp.abs(hi))
            scale = _nonzero((amax / self.code_span).astype(sdt).astype(jnp.float32))
            return scale, None
        qmax = 2**f.bits - 1
        if self.zero_point == "min":
            scale = _nonzero(((hi - lo) / qmax).astype(sdt).astype(jnp.float32))
            return scale, lo.astype(sdt).astype(jnp.float32)
        lo, hi = jnp.minimum(lo, 0.0), jnp.maximum(hi, 0.0)
        scale = _nonzero(((hi - lo) / qmax).astype(sdt).astype(jnp.float32))
        zero = -lo / scale
        if self.zero_point == "int":
            zero = jnp.clip(jnp.round(zero), 0, qmax)
        else:
            zero = zero.astype(sdt).astype(jnp.float32)
        return scale, zero

    def encode(self, xg: jnp.ndarray, scale: jnp.ndarray, zero: jnp.ndarray | None) -> jnp.ndarray:
        """Codes (unpacked, xg's shape) for the grouped view `xg` under broadcastable `scale` / `zero`."""
        if zero is not None and self.zero_point == "min":
            y = (xg - zero) / scale
        else:
            y = xg / scale if zero is None else xg / scale + zero
        codes = self.fmt.encode(y, symmetric=self.symmetric, restricted=self.restricted)
        return progressive.clamp_codes(codes, scale, zero) if self.progressive else codes

    def decode(self, codes: jnp.ndarray, scale: jnp.ndarray, zero: jnp.ndarray | None) -> jnp.ndarray:
        """Float32 values of unpacked `codes` (the grouped view) under broadcastable `scale` / `zero`; same shape."""
        v = self.fmt.decode(codes, jnp.float32)
        if zero is None:
            return v * scale
        if self.zero_point == "min":
            return v * scale + zero
        return (v - zero) * scale

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
        dtype: DTypeLike,
        perm: jnp.ndarray | None = None,
        policy: ExecPolicy = ExecPolicy(),
    ) -> QTensor:
        """Assemble a QTensor from unpacked codes / keepdims scales in the grouped view of `layout`, executing by
        `policy` (online rotation, activation quantization). codes_g: `layout.grouped_shape` (e.g. [G, g, N]);
        scale_g, zero_g: keepdims (e.g. [G, 1, N]); `dtype`: the dtype the QTensor dequantizes to."""
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
        zero_min = zero is not None and self.zero_point == "min"
        return QTensor(
            codes=codes,
            scale=scale.reshape(layout.scale_shape),
            zero=None if zero is None else zero.reshape(layout.scale_shape),
            perm=perm,
            fmt=self.format,
            layout=layout,
            symmetric=self.symmetric,
            restricted=self.restricted,
            zero_min=zero_min,
            dtype=jnp.dtype(dtype).name,
            policy=policy,
        )



def _nonzero(scale: jnp.ndarray) -> jnp.ndarray:
    """An all-zero group gets scale 1: its codes are the zero point and it dequantizes to exact zeros."""
    return jnp.where(scale > 0, scale, jnp.ones_like(scale))
