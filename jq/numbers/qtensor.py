"""QTensor: a quantized array as a pytree — codes, scales, zero points, an optional permutation — plus static layout.

Layout (`jq.numbers.layout`): the logical shape, the contraction axes and the granularity (tensor / channel / groups
of `group_size` along the last contraction axis, optionally zero-padded).

Codes are stored with the group axis permuted by `perm` when present (act-order): `stored = W[perm]` along the
group axis, so `x @ W == x[..., perm] @ stored`. Sub-byte codes are bit-packed along the group axis
(`formats.pack`). Dequantized value = (code − zero) · scale for ints, table[code] · scale for fp4/NF4, and
float(code) · scale for fp8.

Vector codebooks (`jq.numbers.codebook`): `codes` hold one index per vector of `vec` stored weights along the pack
axis; "lut" formats (`cb8x2`) store `codebook`, tables of 2^bits vectors per scale position or per block of them
(GPTVQ: one per group of rows), "lattice" ones (`e8p`) read E8P's fixed table; a weight is table[index] · scale.
"additive" ones (`aq8x2`, AQLM: `jq.numbers.additive`) hold M indices per vector (codes [..., M]) into M tables stored
in `codebook` [..., M, 2^B, 8]; a weight is the sum of the M entries · scale.

Dense-and-sparse (SqueezeLLM / SpQR): an optional sparse term added to the decoded weight — `sparse_index` int32
[nnz], flat row-major positions in the logical shape, and `sparse_value` float16 [nnz] — so a few outlier weights are
kept almost exactly while the dense codes fit the rest. It lives in the same domain as the codes (before an online
rotation's inverse), and `jq.ops` multiplies it beside the dense part.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import DTypeLike

from jq.numbers import additive, formats, lattice
from jq.numbers.hadamard import Rotation
from jq.numbers.layout import Layout

__all__ = ["Layout", "QTensor", "ExecPolicy", "grid_label", "is_qtensor", "ACT_FORMATS"]

ACT_FORMATS = ("int8", "fp8_e4m3", "int4", "int3", "int2", "mxfp8_e4m3", "mxfp8_e5m2", "mxfp6_e2m3", "mxfp6_e3m2",
               "mxfp4", "mxint8", "nvfp4")  # per token; MX / NVFP4 in blocks along the contraction (jq.numbers.mx)


@dataclasses.dataclass(frozen=True)
class ExecPolicy:
    """How a QTensor executes in a matmul — not what it stores.

    Attributes:
      rotation: None, or a `jq.numbers.hadamard.Rotation` Q: the codes hold Qᵀ W along the (single) contraction
        axis, `dequantize` returns W, and `jq.ops` multiplies x Q by the stored weight (QuaRot's online rotation).
      act: format the matmul quantizes its input activations to, per token ("int8", "fp8_e4m3", "int4"), or None.
      act_clip: per-token activation range: act_clip · max |x| (a ratio in (0, 1]), or "gaussian": α*·rms(x), the
        Gaussian-MSE-optimal clip of the int grid (QuEST's, `jq.numbers.ranges.gaussian_clip`).
      act_outlier: LLM.int8 threshold: input channels with |x| above it skip activation quantization, or None.
    """

    rotation: Rotation | None = None
    act: str | None = None
    act_clip: float | str = 1.0
    act_outlier: float | None = None

    def __post_init__(self):
        object.__setattr__(self, "rotation", Rotation.parse(self.rotation))
        if self.act is not None and self.act not in ACT_FORMATS:
            raise ValueError(f"scheme field 'act' has value {self.act!r}; allowed values are {list(ACT_FORMATS)}")
        gauss = self.act_clip == "gaussian" and (self.act is None or formats.get_format(self.act).is_int)
        if not gauss and not (isinstance(self.act_clip, (int, float)) and 0.0 < self.act_clip <= 1.0):
            raise ValueError(f"scheme field 'act_clip' has value {self.act_clip!r} (act {self.act!r}); use a ratio in "
                             "(0, 1], or 'gaussian' with int activations (int8 / int4 / int3 / int2)")
        object.__setattr__(self, "act_clip", self.act_clip if gauss else float(self.act_clip))
        if self.act_outlier is not None:
            if self.act is None or not isinstance(self.act_outlier, (int, float)) or self.act_outlier <= 0:
                raise ValueError(f"scheme field 'act_outlier' has value {self.act_outlier!r} with act={self.act!r}; "
                                 "it is a positive threshold (e.g. 6.0) and needs activation quantization (act: int8)")
            object.__setattr__(self, "act_outlier", float(self.act_outlier))


def grid_label(fmt: str, symmetric: bool, granularity: str) -> str:
    """'int4 asym g128': format, symmetry and granularity label — the one spelling of a grid in every report
    (learned codebooks and microscaling presets have no symmetry choice: 'cb3 channel', 'mxfp4 g32')."""
    f = formats.get_format(fmt)
    if f.is_lookup or f.is_mx:
        return f"{fmt} {granularity}"
    return f"{fmt} {'sym' if symmetric else 'asym'} {granularity}"


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QTensor:
    """A quantized array. Array fields are pytree children; everything else is static metadata.

    Attributes:
      codes: stored codes; packed uint8 when the format has < 8 bits, else int8/uint8/float8.
      scale: float scales, shape `layout.scale_shape`.
      zero: zero points in code units (asymmetric int formats), same shape as `scale`, or None.
      perm: int32 [K] permutation of the group axis (codes stored as W[perm]), or None.
      codebook: learned tables (format kind "lut" only), float16 `table_shape + (2^bits, vec)`, else None; the
        table shape is `scale_shape` (a table per scale position) or dims dividing it (one table shared by each block
        of scale positions, e.g. [G, 1] for one table per group of rows shared by every output channel).
      outer_scale: a second level multiplying the scales, or None: a float32 scalar (shape (); NVFP4: e4m3 scales per
        16 weights times one float32), or float16 per output channel, broadcastable to `scale` (progressive QoQ:
        uint8 group scales on an int8 grid, `jq.numbers.progressive`).
      sparse_index / sparse_value: the dense-and-sparse term (int32 flat positions [nnz], float16 values [nnz]) added
        to the decoded weight, or None.
      fmt: format name (see `formats.FORMATS`).
      layout: static `Layout`.
      symmetric / restricted: the integer code range used.
      zero_min: `zero` holds each group's offset in weight units and a weight is code·scale + zero (GGUF Q4_1 and
        K-quants store a minimum this way: d·q + m), instead of a zero point in code units ((code − zero)·scale).
      dtype: name of the logical (dequantized) dtype.
      policy: how it executes (`ExecPolicy`: online rotation, activation quantization, outlier split) — the one
        static field that is not about what is stored.
    """

    codes: jax.Array
    scale: jax.Array
    zero: jax.Array | None = None
    perm: jax.Array | None = None
    codebook: jax.Array | None = None
    outer_scale: jax.Array | None = None
    sparse_index: jax.Array | None = None
    sparse_value: jax.Array | None = None
    fmt: str = dataclasses.field(default="int8", metadata=dict(static=True))
    layout: Layout = dataclasses.field(default=None, metadata=dict(static=True))
    symmetric: bool = dataclasses.field(default=True, metadata=dict(static=True))
    restricted: bool = dataclasses.field(default=False, metadata=dict(static=True))
    zero_min: bool = dataclasses.field(default=False, metadata=dict(static=True))
    dtype: str = dataclasses.field(default="float32", metadata=dict(static=True))
    policy: ExecPolicy = dataclasses.field(default=ExecPolicy(), metadata=dict(static=True))

    # -- array-like metadata --------------------------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, ...]:
        """The logical shape of the weight (`layout.shape`), not of the stored codes."""
        return self.layout.shape

    @property
    def ndim(self) -> int:
        """The number of logical dimensions."""
        return len(self.layout.shape)

    @property
    def size(self) -> int:
        """The number of logical weights."""
        return math.prod(self.layout.shape)

    @property
    def format(self) -> formats.Format:
        """The `Format` named by `fmt`."""
        return formats.get_format(self.fmt)

    def describe(self) -> str:
        """The grid in a few words, as reports and logs print it: 'int4 asym g128', 'int8 sym channel perm'."""
        return grid_label(self.fmt, self.symmetric, self.layout.granularity_label) + (
            " min" if self.zero_min else "") + (" perm" if self.perm is not None else "") + (
            " progressive" if self.outer_scale is not None and jnp.issubdtype(self.scale.dtype, jnp.integer) else "") + (
            f" + {100 * self.sparse_index.shape[0] / self.size:.2g}% sparse" if self.sparse_index is not None else "")

    def __repr__(self) -> str:
        lay = self.layout
        extra = f" act={self.policy.act}" if self.policy.act else ""
        return f"QTensor({self.describe()}, shape={lay.shape}, axes={lay.axes}{extra})"

    def __getitem__(self, key):
        """Only `q[...]` (how NNX reads a variable's value) is supported: it returns the QTensor itself."""
        if key is Ellipsis:
            return self
        raise TypeError(f"{self!r} cannot be indexed by {key!r}; call .dequantize() first")

    # -- decoding -------------------------------------------------------------------------------------------
    def unpacked_codes(self) -> jax.Array:
        """Codes in the stored (padded, permuted) shape, one element per weight."""
        f = self.format
        if not f.packs:
            return self.codes
        lay = self.layout
        n = lay.stored_shape[lay.pack_axis] // f.vec
        return formats.unpack(self.codes, f.bits, n, axis=lay.pack_axis, signed=f.is_int and self.symmetric)

    def dequantize(self, dtype: DTypeLike | None = None) -> jax.Array:
        """Back to a dense array of the logical shape `self.shape` (e.g. [K, N]) and dtype (or `dtype`)."""
        dtype = jnp.dtype(dtype or self.dtype)
        lay = self.layout
        if self.format.is_lookup:
            v = self._lookup()
        else:
            v = self.format.decode(self.unpacked_codes(), jnp.float32)
        v = v.reshape(lay.grouped_shape)
        scale = self.scale.astype(jnp.float32)
        if self.outer_scale is not None:
            scale = scale * self.outer_scale.astype(jnp.float32)
        if self.zero is None:
            v = v * lay.expand_scale(scale)
        elif self.zero_min:
            v = v * lay.expand_scale(scale) + lay.expand_scale(self.zero.astype(jnp.float32))
        else:
            v = (v - lay.expand_scale(self.zero.astype(jnp.float32))) * lay.expand_scale(scale)
        w = lay.from_grouped(v, self.perm)
        if self.sparse_index is not None:
            w = w.reshape(-1).at[self.sparse_index].add(self.sparse_value.astype(jnp.float32)).reshape(lay.shape)
        if self.policy.rotation is not None:  # stored Qᵀ W → W = Q (Qᵀ W)
            w = self.policy.rotation.inverse(w, axis=lay.axes[0])
        return w.astype(dtype)

    def _lookup(self) -> jax.Array:
        """Vector-codebook values in the stored shape (float32): each index [.., K/vec, ..] picks a vector of its own
        table (the one of its scale position; E8P's fixed table for a lattice format), filling the pack axis to K."""
        lay, f = self.layout, self.format
        if f.kind == "additive":
            return additive.lookup(self.codes, self.codebook, lay, f.bits)
        if f.kind == "lattice":
            return jnp.moveaxis(lattice.decode(self.codes, f.bits), -1, lay.pack_axis + 1).reshape(lay.stored_shape)
        tshape = tuple(self.codebook.shape[:-2])  # = scale_shape, or dims dividing it (tables shared by blocks)
        entries = 2**f.bits
        idx = self.unpacked_codes().astype(jnp.int32)  # stored shape, pack axis / vec
        tab = lay.vector_tables(tshape, f.vec)
        vals = self.codebook.astype(jnp.float32).reshape(-1, f.vec)[tab * entries + idx]
        return jnp.moveaxis(vals, -1, lay.pack_axis + 1).reshape(lay.stored_shape)

    def layer(self, i: int) -> "QTensor":
        """Slice `i` of a weight stacked on a leading axis that is neither contracted nor grouped (scanned layers'
        [L, K, N], stacked experts [E, K, N]): what `nn.scan` would hand one iteration, with its own layout.
        Raises ValueError for what has no per-slice form (see `takes_layers`)."""
        if not self.takes_layers:
            raise ValueError(f"{self!r}: no per-layer slice (the leading axis is contracted or grouped, groups are "
                             "flat, or a permutation / sparse term spans the stack)")
        lay = self.layout

        def take(a):
            return None if a is None else a if a.ndim == 0 else a[i] if a.shape[0] > 1 else a[0]

        sliced = dataclasses.replace(lay, shape=lay.shape[1:], axes=tuple(a - 1 for a in lay.axes))
        return dataclasses.replace(self, codes=self.codes[i], scale=take(self.scale), zero=take(self.zero),
                                   codebook=take(self.codebook), outer_scale=take(self.outer_scale), layout=sliced)

    @property
    def takes_layers(self) -> bool:
        """Whether `layer(i)` slices this QTensor (a leading axis of its own, per-axis groups or channels)."""
        lay = self.layout
        return (len(lay.shape) >= 2 and 0 not in lay.axes and not lay.flat and lay.granularity != "tensor"
                and self.perm is None and self.sparse_index is None)

    def dense_part(self) -> "QTensor":
        """The same QTensor without its sparse term (what a kernel multiplies; `jq.ops` adds the sparse product)."""
        return dataclasses.replace(self, sparse_index=None, sparse_value=None)

    def unrotated(self) -> "QTensor":
        """The same codes read as the stored (rotated) weight Qᵀ W, for a matmul that rotates its input itself."""
        return dataclasses.replace(self, policy=dataclasses.replace(self.policy, rotation=None))

    def check(self, where: str = "QTensor") -> None:
        """Raise ValueError if the arrays do not fit the static layout (a damaged or foreign file)."""
        lay, f = self.layout, self.format
        want = list(lay.stored_shape)
        problems = []
        if want[lay.pack_axis] % f.vec:
            problems.append(f"vectors of {f.vec} do not tile the pack axis of length {want[lay.pack_axis]}")
        want[lay.pack_axis] //= f.vec
        if f.packs:
            want[lay.pack_axis] = formats.packed_length(want[lay.pack_axis], f.bits)
        want += [f.books] if f.kind == "additive" else []  # M indices per vector
        want += list(lattice.storage(f.bits)[1]) if f.kind == "lattice" else []  # e8p3 / 5 / 6: a code's bytes
        if tuple(self.codes.shape) != tuple(want):
            problems.append(f"codes shape {tuple(self.codes.shape)} != {tuple(want)}")
        for name, a in (("scale", self.scale), ("zero", self.zero)):
            if a is not None and tuple(a.shape) != lay.scale_shape:
                problems.append(f"{name} shape {tuple(a.shape)} != {lay.scale_shape}")
        if self.perm is not None and tuple(self.perm.shape) != (lay.shape[lay.group_axis],):
            problems.append(f"perm shape {tuple(self.perm.shape)} != ({lay.shape[lay.group_axis]},)")
        if (self.zero is None) != (self.symmetric or not f.is_int):
            problems.append("zero point present/absent contrary to the symmetry")
        if self.zero_min and self.zero is None:
            problems.append("zero_min set without a zero (offset) array")
        o = None if self.outer_scale is None else tuple(self.outer_scale.shape)
        if o not in (None, ()) and (len(o) != len(lay.scale_shape)
                                    or any(a not in (1, b) for a, b in zip(o, lay.scale_shape))):
            problems.append(f"outer_scale shape {o} is neither () nor broadcastable to the scale shape {lay.scale_shape}")
        if (self.codebook is None) != (f.kind not in ("lut", "additive")):
            problems.append(f"codebook present/absent contrary to the format {self.fmt}")
        elif f.kind == "additive":  # (a codebook is present: checked above)
            problems += filter(None, [additive.table_problem(self.codebook.shape, lay, f.bits, f.books)])
        elif self.codebook is not None and not (tuple(self.codebook.shape[-2:]) == (2**f.bits, f.vec)
                                                and lay.tables_fit(tuple(self.codebook.shape[:-2]))):
            problems.append(f"codebook shape {tuple(self.codebook.shape)} != {lay.scale_shape + (2**f.bits, f.vec)} "
                            f"(scale shape, or dims dividing it, + ({2**f.bits} entries for {f.bits}-bit indices, "
                            f"vector length {f.vec}))")
        si, sv = self.sparse_index, self.sparse_value
        if (si is None) != (sv is None):
            problems.append("sparse_index without sparse_value (or the reverse)")
        elif si is not None and (si.ndim != 1 or tuple(sv.shape) != tuple(si.shape) or si.dtype != jnp.int32):
            problems.append(f"sparse term: index {si.dtype}{tuple(si.shape)} and value {tuple(sv.shape)} must be int32 "
                            "[nnz] and [nnz]")
        if problems:
            raise ValueError(f"{where}: {self!r} is inconsistent: " + "; ".join(problems))

    # -- honest size accounting -----------------------------------------------------------------------------
    @property
    def nbytes(self) -> int:
        """Bytes of everything stored: codes, scales, zero points, permutation, codebooks and the sparse term."""
        return sum(int(np.prod(a.shape)) * jnp.dtype(a.dtype).itemsize for a in self._arrays())

    @property
    def bits_per_weight(self) -> float:
        """Stored bits divided by the number of logical weights (scales and zeros included)."""
        return 8.0 * self.nbytes / self.size

    def _arrays(self) -> list[jax.Array]:
        return [a for a in (self.codes, self.scale, self.zero, self.perm, self.codebook, self.outer_scale,
                            self.sparse_index, self.sparse_value) if a is not None]


def is_qtensor(x: Any) -> bool:
    """Whether `x` is a QTensor (e.g. as `is_leaf` of a tree map)."""
    return isinstance(x, QTensor)
