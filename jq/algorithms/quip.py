"""QuIP#-style lattice quantization (Tseng et al. 2024, "QuIP#: Even Better LLM Quantization with Hadamard
Incoherence and Lattice Codebooks"): incoherent weights rounded 8 at a time to the E8P lattice codebook with
block-LDL error feedback.

1. incoherence: the weights must look Gaussian. Rotate each layer's input axis by a randomized Hadamard
   (`rotate: hadamard` on the rule, online x·Q) and/or the residual stream (`rotation:` in the recipe, QuaRot).
2. scales: each group of rows (`group_size`, or all K per channel) and column gets the scale RMS / GAIN (float16),
   GAIN stretching unit-RMS Gaussian weights onto the codebook at least error (`jq.numbers.lattice.GAIN`).
3. BlockLDLQ: rows are fixed 8 at a time, each column's 8 weights (divided by its scale) rounded to the nearest
   E8P entry (`e8p`: one 16-bit code, 2 bits per weight; `e8p3` / `e8p2`: a second stage on the residual from E8's
   shell of roots / from E8P again, 3 / 4 bits; `e8p5` / `e8p6`: a third stage, 5 / 6 bits), and the
   error is fed into the rows not yet fixed through the inverse Hessian — GPTQ with vector rounding
   (`jq.algorithms.codebook_feedback`), which is what BlockLDLQ's LDL form computes.
4. refit (optional): the scales refitted to the layer objective tr((W − Ŵ)ᵀ H (W − Ŵ)) with the codes fixed.

Bits per weight = 2 (`e8p`), 3 (`e8p3`), 4 (`e8p2`), 5 (`e8p5`) or 6 (`e8p6`) + 16 / R (R = group_size, or K per
channel); nothing else is stored.
Not here: QuIP#'s fine-tuning of the remaining float parameters.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from jq.algorithms.codebook_feedback import damped, feedback_assign, hessian_or_identity, inverse_hessian_factor
from jq.algorithms.gptvq import refit_group_scales
from jq.algorithms.registry import register_method
from jq.algorithms.stats import LayerStats
from jq.numbers import codebook as cbk
from jq.numbers import lattice
from jq.numbers.qtensor import Layout, QTensor
from jq.numbers.scheme import Scheme

__all__ = ["QuIP", "quip"]


@cbk.on_leading_matrix
def quip(w: jnp.ndarray, scheme: Scheme, layout: Layout, stats: LayerStats | dict | None = None, *,
         damp: float = 0.01, refit: bool = True) -> QTensor:
    """Quantize a kernel w [K, N] to the E8P lattice (`e8p`, `e8p3`, `e8p2`, `e8p5`, `e8p6`: 2-6 bits per weight)
    with block-LDL error feedback.

    Args:
      stats: `LayerStats` with `hessian` [K, K]; None (a layer no calibration token reached) rounds with H = I
        (plain nearest-entry rounding).
      damp: relative damping of the Hessian (as GPTQ).
      refit: refit each column's scales to the layer objective once the codes are fixed.
    Returns a QTensor with codes [K / 8, N, *trailing] as `lattice.storage` gives them (uint16 for e8p, uint32 for
    e8p2, uint8 bytes [K / 8, N, 3 / 5 / 6] for e8p3 / e8p5 / e8p6) and float16 scales [G, N].
    """
    f = scheme.fmt
    cbk.check_shared_layout(f, layout, "quip", fitted=False, kind="lattice")
    stats = LayerStats.coerce(stats)
    K, N = layout.shape
    rows, bits = cbk.rows_per_group(layout), f.bits
    w32 = jnp.asarray(w, jnp.float32)
    h = hessian_or_identity(stats, K)

    def scales_of(_, wb):  # the group's scales [N] from its current (error-updated) rows
        s = cbk.as_stored(cbk.rms_scales(wb, axis=0) / lattice.GAIN[bits])
        return s, s

    def round_step(wv, s, _):  # nearest entries of the 8 rows wv [8, N] in units of the column scales s [N]
        codes, v = lattice.quantize((wv / s).T, bits)
        return codes, v.T * s

    dtype, trailing = lattice.storage(bits)
    codes, scale, _ = feedback_assign(w32, inverse_hessian_factor(h, damp), lattice.VEC, rows, scales_of, round_step,
                                      index_dtype=dtype, index_shape=trailing)  # [K/8, N, *trailing], [G, N]
    if refit:
        v = jnp.transpose(lattice.decode(codes, bits), (0, 2, 1)).reshape(K, N)  # [K/8, N, 8] → [K, N]
        scale = cbk.as_stored(refit_group_scales(w32, damped(h, damp), v, scale))
    q = QTensor(codes=codes, scale=scale.reshape(layout.scale_shape).astype(jnp.float16), fmt=scheme.format,
                layout=layout, symmetric=True, dtype=jnp.dtype(w.dtype).name, policy=scheme.policy)
    q.check("quip QTensor")
    return q


@dataclasses.dataclass(frozen=True)
class QuIP:
    """QuIP#-style lattice quantization as a method record (`method: quip`, options `damp`, `refit`)."""

    damp: float = 0.01
    refit: bool = True

    def __post_init__(self):
        if not isinstance(self.refit, bool):
            raise ValueError(f"method 'quip': option 'refit' has value {self.refit!r}; use true or false")
        if not isinstance(self.damp, (int, float)) or isinstance(self.damp, bool) or not self.damp > 0:
            raise ValueError(f"method 'quip': option 'damp' has value {self.damp!r}; use a positive ratio (0.01)")

    def quantize(self, w: jnp.ndarray, scheme: Scheme, layout: Layout,
                 stats: LayerStats | dict | None = None) -> QTensor:
        """`quip` of the kernel w [K, N]."""
        return quip(w, scheme, layout, stats, damp=float(self.damp), refit=self.refit)


register_method("quip", QuIP, needs_calibration=True)
