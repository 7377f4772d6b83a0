"""Least-squares refit of group scales and zero points with the codes held fixed — the step GPTQ cannot take
itself, because it fixes a group's grid before its error feedback ends. A record (`LeastSquaresRefit`) that GPTQ
takes as its `refit` (the recipe option `refit: true`)."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from jax import lax

__all__ = ["refit_groups", "LeastSquaresRefit"]


def refit_groups(w0: jnp.ndarray, vals: jnp.ndarray, h: jnp.ndarray, mask: jnp.ndarray, g: int,
                 scale: jnp.ndarray, zero: jnp.ndarray | None, fit_zero: bool,
                 ridge: float = 1e-4) -> tuple[jnp.ndarray, jnp.ndarray | None]:
    """Least-squares refit of group scales (and float zero points) with the codes held fixed.

    With codes fixed, a dequantized group column is a·v + b·1 (v: the codes' grid values minus a fixed zero point,
    or the raw grid values when the zero point is refitted, b = −a·zero), linear in (a, b). The group parameters
    of one output column that minimise the layer objective tr((W − Ŵ)ᵀ H (W − Ŵ)) solve a [2G, 2G] system
    (G groups); all columns are solved at once. Across groups the parameters are coupled through H, which is
    what lets them absorb part of the rounding that GPTQ's feedback could not.

    Args (processing order, K rows = groups of g consecutive rows):
      w0: [K, N] original weights (padding rows zero); vals: [K, N] grid values of the codes (see above);
      h: [K, K] damped Hessian; mask: [K] 1 for real rows, 0 for padding; scale, zero: [G, N] current values;
      fit_zero: also fit b (float zero points); ridge: Levenberg–Marquardt pull toward the current values,
        relative to the system's diagonal (keeps near-singular groups where they were).
    Returns: (scale, zero) [G, N], zero None when `zero` is None; non-positive scales keep their old values.
    """
    K, N = vals.shape
    G = K // g
    f32 = jnp.float32
    v = vals * mask[:, None]
    seg = lambda x: x.reshape(G, g, *x.shape[1:]).sum(1)  # noqa: E731  per-group sums over rows
    hp = lambda a, b: jnp.matmul(a, b, precision=lax.Precision.HIGHEST)  # noqa: E731

    def one(j):  # the columns of the system for group j: H restricted to its rows, against every group
        hj = lax.dynamic_slice_in_dim(h, j * g, g, 1)  # [K, g]
        t = hp(hj, lax.dynamic_slice_in_dim(v, j * g, g, 0))  # [K, N]
        u = hj @ lax.dynamic_slice_in_dim(mask, j * g, g)  # [K]
        return seg(v * t), seg(t * mask[:, None]), seg(v * u[:, None]), seg(u * mask)

    maa, mba, mab, mbb = lax.map(one, jnp.arange(G))  # [G(j), G(i), N] ×3, [G(j), G(i)]
    hw = hp(h, w0)
    ra, rb = seg(v * hw), seg(hw * mask[:, None])  # [G, N]
    a0 = scale.astype(f32)
    if fit_zero:
        b0 = -a0 * zero
        m = jnp.concatenate([jnp.concatenate([maa, mab], 0),
                             jnp.concatenate([mba, jnp.broadcast_to(mbb[..., None], mba.shape)], 0)], 1)  # [2G, 2G, N]
        r, t0 = jnp.concatenate([ra, rb], 0), jnp.concatenate([a0, b0], 0)
    else:
        m, r, t0 = maa, ra, a0
    m = jnp.moveaxis(m, -1, 0).swapaxes(1, 2)  # [N, rows i, cols j]
    d = jnp.diagonal(m, axis1=1, axis2=2)  # [N, P]
    eps = ridge * jnp.maximum(d, 1e-30)
    theta = jnp.linalg.solve(m + eps[:, :, None] * jnp.eye(m.shape[-1], dtype=f32),
                             (r.T + eps * t0.T)[..., None])[..., 0].T  # [P, N]
    a = theta[:G]
    ok = jnp.isfinite(theta).all(0) & (a > 0).all(0)  # per column
    a_new = jnp.where(ok, a, a0)
    if not fit_zero:
        return a_new, zero
    return a_new, jnp.where(ok, -theta[G:] / jnp.where(ok, a, 1.0), zero)


@dataclasses.dataclass(frozen=True)
class LeastSquaresRefit:
    """Refit every group's scale (and float zero point) to the final codes by least squares against the damped
    Hessian (`refit_groups`); `ridge` pulls near-singular groups towards their current values."""

    ridge: float = 1e-4

    def refine(self, w0: jnp.ndarray, vals: jnp.ndarray, h: jnp.ndarray, mask: jnp.ndarray, g: int, scale: jnp.ndarray,
               zero: jnp.ndarray | None, fit_zero: bool) -> tuple[jnp.ndarray, jnp.ndarray | None]:
        """(scale, zero) [G, N] refitted; arguments as `refit_groups` (w0, vals [K, N], h [K, K], mask [K], scale,
        zero [G, N])."""
        return refit_groups(w0, vals, h, mask, g, scale, zero, fit_zero, self.ridge)
