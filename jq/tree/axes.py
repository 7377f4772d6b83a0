"""How a model uses each weight, as plain records, and the contraction axes that follow from it.

`jq.interop.usage.trace_usage` traces a model once and fills these records (`LeafUsage` per parameter path, one
`WeightUse` per consumer of the leaf); `quantize_params(..., usage=...)` reads them here to pick each leaf's
contraction axes (groups run along the last of them) instead of guessing from names, to refuse a rule whose explicit
`axes` disagree with the model's use, and to keep gathered embeddings float. The records are arrays-free and
Flax-free, so the tree layer can read them without knowing how they were made.

Axes are the leaf's own axes: a Gemma-style `w (heads, d_model, head_dim)` used by
`einsum("BTD,NDH->BTNH", x, w)` has contraction axes (1,), batch axes (), free axes (0, 2).
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Mapping

__all__ = ["WeightUse", "LeafUsage", "axes_from_use", "warn_if_larger", "unmatched_matmuls"]

KINDS = ("matmul", "gather", "elementwise", "other")


@dataclasses.dataclass(frozen=True)
class WeightUse:
    """One consumer of a weight leaf in the traced model.

    Attributes:
      kind: "matmul" (an operand of `dot_general`: `jnp.einsum`, `@`, `nn.Dense` ...), "gather" (rows taken: an
        embedding lookup), "elementwise" (a norm scale, a bias) or "other" (any other primitive, named).
      primitive: the consuming primitive's name ("dot_general", "gather", "mul", ...).
      contract / batch / free: for a matmul, the leaf axes the dot contracts, treats as batch, and keeps.
      stacked: leaf axes a `scan` sliced off before this use (scanned layers: the layer axis).
      exact: whether the operand's dims map one-to-one onto the leaf's axes in order (through converts,
        transposes, broadcasts, slices and simple reshapes), so the other operand can be flattened to [tokens, K]
        along the contraction axes; False when a reshape split or merged axes in a way that cannot be followed.
      note: how the value reached the consumer when it was not the leaf itself ("transpose", "slice", ...).
    """

    kind: str
    primitive: str
    contract: tuple[int, ...] = ()
    batch: tuple[int, ...] = ()
    free: tuple[int, ...] = ()
    stacked: tuple[int, ...] = ()
    exact: bool = True
    note: str = ""

    def describe(self) -> str:
        """'matmul (dot_general) contracting axes (1,)' and the like, for messages."""
        if self.kind == "matmul":
            s = f"matmul contracting axes {self.contract}"
            s += f", batch axes {self.batch}" if self.batch else ""
            s += f", stacked axes {self.stacked}" if self.stacked else ""
            return s + ("" if self.exact else " (axes not followed exactly)")
        return f"{self.kind} ({self.primitive})"


@dataclasses.dataclass(frozen=True)
class LeafUsage:
    """Every traced use of one parameter leaf (`path`, logical `shape`)."""

    path: str
    shape: tuple[int, ...]
    uses: tuple[WeightUse, ...] = ()

    @property
    def matmuls(self) -> tuple[WeightUse, ...]:
        """The uses as a `dot_general` operand."""
        return tuple(u for u in self.uses if u.kind == "matmul")

    @property
    def gathered(self) -> bool:
        """Whether rows of the leaf are gathered (an embedding table; it may also be used as a tied LM head)."""
        return any(u.kind == "gather" for u in self.uses)

    @property
    def contraction_axes(self) -> tuple[int, ...] | None:
        """The leaf axes every matmul use contracts, when they all agree; None otherwise (no matmul, or uses that
        disagree: see `conflict`)."""
        axes = {u.contract for u in self.matmuls}
        return axes.pop() if len(axes) == 1 else None

    @property
    def conflict(self) -> str | None:
        """A sentence describing matmul uses that contract different axes, or None."""
        axes = sorted({u.contract for u in self.matmuls})
        return None if len(axes) < 2 else f"its matmuls contract different axes {axes}"

    @property
    def kind(self) -> str:
        """'embedding' (gathered), 'matmul', 'elementwise', 'other' or 'unused': how the leaf is consumed."""
        if self.gathered:
            return "embedding"
        for k in ("matmul", "elementwise", "other"):
            if any(u.kind == k for u in self.uses):
                return k
        return "unused"

    def describe(self) -> str:
        """The uses in one line, for messages."""
        return "; ".join(sorted({u.describe() for u in self.uses})) or "no use (the traced forward never reads it)"


def axes_from_use(path: str, shape: tuple[int, ...], rule_axes: tuple[int, ...] | None,
                  use: LeafUsage | None) -> tuple[int, ...] | None:
    """The contraction axes to quantize `path` with, given the rule's explicit `axes` (or None) and the traced use.

    Returns the rule's axes when they agree with the use (or the use is unknown), the traced axes when the rule has
    none, and None when the leaf is used by no matmul and the rule names no axes (the caller keeps it float).
    Raises ValueError naming the leaf, both axes and the fix when they disagree, or when the use is ambiguous and
    the rule names no axes.
    """
    if use is None or not use.matmuls:
        return rule_axes
    traced = use.contraction_axes
    nd = len(shape)
    if rule_axes is not None:
        mine = tuple(sorted(a % nd for a in rule_axes))
        if traced is not None and mine != traced:
            raise ValueError(
                f"{path}: the rule's axes {tuple(rule_axes)} disagree with how the model uses this weight of shape "
                f"{tuple(shape)}: {use.describe()}. Groups would run along axis {max(mine)} (length "
                f"{shape[max(mine)]}) instead of the contracted axis {max(traced)} (length {shape[max(traced)]}). "
                f"Set axes: {list(traced)} in the rule for this leaf, or drop axes to use the traced ones")
        return mine
    if traced is None:
        raise ValueError(
            f"{path}: cannot choose contraction axes for this weight of shape {tuple(shape)}: {use.conflict}. "
            f"Give the rule for this leaf explicit axes (e.g. axes: {list(sorted({u.contract for u in use.matmuls})[0])})")
    return traced


def warn_if_larger(path: str, n_weights: int, float_bits: int, stored_bits: float, label: str,
                   shape: tuple[int, ...], group_axis: int, padded: int | None) -> None:
    """Warn when a quantized leaf stores more bits than its float original (groups along a short axis padded up
    to the group size, e.g. int4 g128 along an axis of length 4: ~174 bits per weight), naming the leaf, the
    layout and the fix."""
    if stored_bits <= float_bits or n_weights == 0:
        return
    pad = "" if padded in (None, shape[group_axis]) else f", padded to {padded}"
    warnings.warn(
        f"{path}: quantized as {label} it stores {stored_bits:.1f} bits per weight, more than the {float_bits} of "
        f"the float leaf: groups run along axis {group_axis} of shape {tuple(shape)} (length {shape[group_axis]}"
        f"{pad}). Check the contraction axes (give the rule axes:, or quantize with usage=jq.interop.trace_usage"
        f"(...)), or use a smaller group_size / granularity: channel for this leaf", stacklevel=3)


def unmatched_matmuls(usage: Mapping[str, LeafUsage], decided: set[str], limit: int = 8) -> str:
    """A sentence listing the traced matmul weights no rule quantized (for the 'matched no parameter' warning)."""
    left = [u for p, u in sorted(usage.items()) if p not in decided and u.matmuls and not u.gathered]
    if not left:
        return ""
    shown = ", ".join(f"{u.path} {tuple(u.shape)} axes {u.contraction_axes}" for u in left[:limit])
    more = f" and {len(left) - limit} more" if len(left) > limit else ""
    return f"; the model's matmul weights no rule quantized ({len(left)}): {shown}{more}"
