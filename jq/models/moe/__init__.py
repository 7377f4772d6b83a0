"""The mixture-of-experts family (Mixtral / Qwen-MoE style decoders): config, linen module with stacked experts,
per-expert calibration blocks and expert parallelism, registered as one `ModelFamily` named "moe".

No GGUF or Hugging Face readers: no MoE weights are available offline, so models of this family are built in
memory (`MoeLM(cfg)`, `init_params`) and run through `jq.apps.pipeline` as a `LoadedModel`. No rotation and no
KV-cache decoding either (the family record says so, and commands that need them refuse it by name).

Quantizing: stacked expert weights [E, K, N] contract axis 1 (groups per expert, never across experts) with any
recipe; the router stays float (routers are in `jq.tree.recipe.DEFAULT_IGNORE`; a rule with `force: true` quantizes
it). Calibrated recipes get per-expert statistics from the tokens routed to each expert.
"""

from __future__ import annotations

from jq.models.family import ModelFamily, register_family
from jq.models.moe.blocks import block_spec
from jq.models.moe.config import MoeConfig, expected_shapes
from jq.models.moe.model import MoE, MoeLM, init_params, make_forward, route
from jq.models.moe.parallel import shard_experts

__all__ = ["FAMILY", "MoeConfig", "MoeLM", "MoE", "route", "init_params", "make_forward", "block_spec",
           "shard_experts", "expected_shapes"]

FAMILY = register_family(ModelFamily(
    name="moe",
    config_type=MoeConfig,
    module=MoeLM,
    expected_shapes=expected_shapes,
    causal_lm=True,
    block_spec=block_spec,
))
