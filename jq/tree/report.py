"""What a quantized tree costs and how far it is from the float one: per-leaf rows (path, shape, scheme, honest
bits per weight, stored bytes, relative error), their totals, and a rich table. The one place sizes are summed."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import jax.numpy as jnp
import numpy as np

from jq.numbers.lowrank import is_weight_leaf
from jq.tree.paths import leaf_paths

if TYPE_CHECKING:
    from rich.table import Table

__all__ = ["LeafReport", "report", "summarize", "size_summary", "format_report", "is_linear_kernel"]


@dataclasses.dataclass(frozen=True)
class LeafReport:
    path: str
    shape: tuple[int, ...]
    scheme: str
    bits_per_weight: float
    nbytes: int
    rel_error: float | None
    quantized: bool = False


def is_linear_kernel(path: str) -> bool:
    """A linear layer's kernel: what recipes target ("bits/weight (linear layers)"); the LM head is left out."""
    return path.endswith("kernel") and "lm_head" not in path


def _stored_bytes(x: Any) -> tuple[int, int]:
    """(logical elements, stored bytes) of a leaf: a QTensor or LowRank, an array or an abstract (ShapeDtypeStruct)
    leaf."""
    if is_weight_leaf(x):
        return x.size, x.nbytes
    n = int(np.prod(getattr(x, "shape", ())))
    dt = jnp.dtype(x.dtype if hasattr(x, "dtype") else np.asarray(x).dtype)
    return n, n * dt.itemsize


def report(params: Any, qparams: Any) -> list[LeafReport]:
    """Per-leaf rows of `qparams`: path, shape, scheme, honest bits/weight, stored bytes and relative Frobenius
    error against the float leaf of `params` at the same path. `qparams` may be abstract (`jax.ShapeDtypeStruct`
    leaves, e.g. `jq.checkpoint.abstract_tree`): sizes need only shapes and dtypes."""
    orig = dict(leaf_paths(params))
    rows = []
    for path, q in leaf_paths(qparams):
        shape = tuple(getattr(q, "shape", ()))
        n, nbytes = _stored_bytes(q)
        if is_weight_leaf(q):
            err = None
            if path in orig and not is_weight_leaf(orig[path]):
                w = jnp.asarray(orig[path], jnp.float32)
                err = float(jnp.linalg.norm(q.dequantize(jnp.float32) - w) / (jnp.linalg.norm(w) + 1e-30))
            desc = q.describe()
            rows.append(LeafReport(path, shape, desc, 8.0 * nbytes / max(n, 1), nbytes, err, True))
        else:
            dt = jnp.dtype(q.dtype if hasattr(q, "dtype") else np.asarray(q).dtype)
            rows.append(LeafReport(path, shape, f"float ({dt.name})", 8.0 * dt.itemsize, nbytes, None))
    return rows


def _totals(items: Iterable[tuple[str, int, int, bool]]) -> dict[str, float]:
    """Totals over (path, elements, bytes, quantized) of every leaf."""
    tot = lin = qua = (0, 0)
    add = lambda a, n, b: (a[0] + n, a[1] + b)  # noqa: E731
    for path, n, b, q in items:
        tot = add(tot, n, b)
        if is_linear_kernel(path):
            lin = add(lin, n, b)
        if q:
            qua = add(qua, n, b)
    bpw = lambda a: 8.0 * a[1] / max(a[0], 1)  # noqa: E731
    return {"params": tot[0], "model_bytes": tot[1], "bits_per_weight": bpw(tot), "linear_bits_per_weight": bpw(lin),
            "quantized_params": qua[0], "quantized_bits_per_weight": bpw(qua)}


def summarize(rows: list[LeafReport]) -> dict[str, float]:
    """Totals over a report: parameters and bytes, bits/weight over all leaves, over the linear kernels
    (`is_linear_kernel`) and over the quantized leaves."""
    return _totals((r.path, int(np.prod(r.shape)), r.nbytes, r.quantized) for r in rows)


def size_summary(tree: Any) -> dict[str, float]:
    """`summarize` of a (quantized) tree without computing errors: stored bytes and bits/weight."""
    return _totals((p, *_stored_bytes(x), is_weight_leaf(x)) for p, x in leaf_paths(tree))


def format_report(rows: list[LeafReport], *, only_quantized: bool = False, title: str | None = None) -> Table:
    """A `rich.table.Table` of the report (print it with `rich.print` or a Console)."""
    from rich.table import Table

    t = Table(title=title)
    for c, j in (("path", "left"), ("shape", "left"), ("scheme", "left"), ("bits/w", "right"), ("KiB", "right"),
                 ("rel err", "right")):
        t.add_column(c, justify=j)
    for r in rows:
        if only_quantized and r.rel_error is None:
            continue
        err = "" if r.rel_error is None else f"{r.rel_error:.4f}"
        t.add_row(r.path, "×".join(map(str, r.shape)), r.scheme, f"{r.bits_per_weight:.3f}", f"{r.nbytes / 1024:.1f}",
                  err)
    s = summarize(rows)
    t.caption = (f"{s['params']:,} params, {s['model_bytes'] / 2**20:.2f} MiB, {s['bits_per_weight']:.3f} bits/weight "
                 "overall")
    return t
