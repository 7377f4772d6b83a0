"""Quantization-aware training: straight-through estimators in an ordinary Optax loop, learned step sizes (LSQ),
BitNet b1.58 ternary weights, sharded fine-tuning on a mesh, and conversion to the PTQ QTensor tree.

The maths. A recipe rule's scheme gives, per scale group, a step s and (asymmetric ints) a zero point z in code
units. Fake quantization is the PTQ round trip, computed by `Scheme.encode` / `Scheme.decode`:

    ŵ = (Q(w / s + z) − z) · s,      Q = round-and-clip to the format's codes (ints, fp8, fp4, NF4)

Q has zero derivative almost everywhere, so training uses straight-through estimators (STE):

- range from the data (RTN's range, recomputed every step; s, z constants for the gradient):
  `ste: identity` — ∂ŵ/∂w = 1 (Bengio et al. 2013); `ste: clipped` — ∂ŵ/∂w = 1[Q_n ≤ w/s + z ≤ Q_p].
- learned step size, LSQ (Esser et al. 2019, `lsq: true`): s (and z) are parameters. With v = w/s + z,
      ∂ŵ/∂w = 1[Q_n ≤ v ≤ Q_p]
      ∂ŵ/∂s = g · (round(v) − v)   inside,   g · (Q_n − z) below,   g · (Q_p − z) above
      ∂ŵ/∂z = −g · s · 1[outside]                      (LSQ+ offset, Bhalgat et al. 2020)
  with the gradient scale g = 1 / sqrt(N · Q_p), N the weights sharing s and Q_p the largest positive code.
  Forward values use s rounded to the scheme's scale dtype and z rounded to an integer (int zero points), both
  straight through, so the forward pass is exactly the model `convert` produces.
- activations (a scheme's `act`: "int8", "fp8_e4m3"): per-token abs-max fake quantization with ∂x̂/∂x = 1,
  the numbers `jq.ops` uses in the converted W8A8 / BitNet matmul.
- QuEST (Panferov et al. 2025, `ste: trust` with `range: gaussian` and `rotate: hadamard`; configs/quest_*.yaml):
  weights and activations quantized in the Hadamard-rotated basis, the weight range ±α*·rms (α* the Gaussian-MSE-
  optimal clip of the grid, `jq.numbers.ranges.gaussian_clip`), and the trust estimator
      ∂ŵ/∂w = 1[|ŵ − w| ≤ trust · s / 2]        (s the step; the same mask on activations, s per token)
  so values clipped far beyond the grid get no gradient (`act_ste: identity` keeps the mask to the weights).
- BitNet b1.58 (Ma et al. 2024): `format: int2, restricted: true` (codes {−1, 0, 1}), `range: absmean`
  (s = mean |W| per tensor) and `act: int8` — see configs/qat_bitnet_b158.yaml.

Every STE is value-exact: `stop_gradient(f(x)) + (x − stop_gradient(x))` (see `jq.qat.ste`).

Use (linen; NNX: `graphdef, state = nnx.split(model)` and `jq.qat.nnx_merge(graphdef, fq_state, cfg=cfg)`)::

    cfg = jq.load_recipe("configs/qat_w4_g128.yaml")
    qp = jq.qat.init(params, cfg)                         # {"params": float masters, "quant": learned scales}
    def loss_fn(qp, batch):
        p = jq.qat.fake_quantize(qp, cfg)                 # same tree as params
        return loss(jq.qat.apply(model, {"params": p}, batch["x"], cfg=cfg), batch["y"])
    opt_state = optimizer.init(qp)                        # any optax optimizer
    ...
    qparams = jq.qat.convert(qp, cfg)                     # == jq.quantize_params(params, cfg) without LSQ
    logits = jq.interop.apply(model, {"params": qparams}, x)

For QAT that recovers the float model rather than adapting to the training text, distill from it:
`jq.qat.distill_loss(student_logits, teacher_logits, labels, alpha)` with the teacher's params passed to the step
as a frozen argument (`step(state, batch, teacher_params)`).

`make_train_step` packages that loop, sharded over a (data, fsdp) mesh with gradient accumulation; `Checkpointer`
saves and resumes it with Orbax.
"""

from jq.qat import ste
from jq.qat.distill import distill_loss, kl_divergence
from jq.qat.ste import code_bounds, fake_quant, fake_quant_act, lsq_fake_quant, lsq_grad_scale
from jq.qat.train import (
    Checkpointer,
    WindowBatches,
    batch_sharding,
    init_train_state,
    make_mesh,
    make_train_step,
    maybe_initialize_distributed,
    param_spec,
    shard_batch,
    shard_tree,
    tree_shardings,
)
from jq.qat.activations import act_interceptor, apply, nnx_merge
from jq.qat.alignment import gradient_alignment
from jq.qat.tree import QAT_OPTIONS, LeafPlan, convert, decay_mask, fake_quantize, init, init_from, plan, qat_options

__all__ = [
    "QAT_OPTIONS", "Checkpointer", "LeafPlan", "WindowBatches", "act_interceptor", "apply", "batch_sharding",
    "code_bounds", "convert", "decay_mask", "distill_loss", "fake_quant", "fake_quant_act", "fake_quantize",
    "gradient_alignment", "init", "init_from", "init_train_state", "kl_divergence", "lsq_fake_quant",
    "lsq_grad_scale", "make_mesh", "make_train_step", "maybe_initialize_distributed", "nnx_merge", "param_spec",
    "plan", "qat_options", "shard_batch", "shard_tree", "ste", "tree_shardings",
]
