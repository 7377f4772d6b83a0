"""Low-rank adapters on frozen (quantized) bases, as pytree transforms that work on any model `jq.interop` runs:

- `lora`: LoRA / QLoRA adapters as data — `init`, `combine` (base + adapters → `LowRank` leaves the forward applies
  beside the packed matmul), `split`, `merge` (to float), `trainable_mask`; `LoraConfig` says which leaves and how.
- `loftq`: LoftQ — quantized base and adapters initialised together (alternating quantization and SVD).
- `qalora`: QA-LoRA — group-pooled adapters whose merge only moves zero points: the merged model is integer.
- `lorc`: LoRC / HQQ+ — a post-training low-rank compensation of the quantization error (activation-weighted SVD).
- `peqa`: PEQA — fine-tune only the scales of a frozen integer model.
- `io`: adapters saved and loaded beside their base checkpoint; `check_routes`: every adapter sits beside a matmul.

Training uses `jq.qat.make_train_step` with the adapters (or PEQA's scales) as the trained tree and the base as a
frozen argument; `jq qat --lora RANK` runs it on a model (see `jq.apps.finetune`).
"""

from jq.adapters import io, loftq, lorc, peqa, qalora
from jq.adapters.routes import check_routes
from jq.adapters.lora import (LoraConfig, combine, count, init, merge, only_adapters, split, targets,
                              trainable_mask)

__all__ = ["LoraConfig", "check_routes", "combine", "count", "init", "io", "loftq", "lorc", "merge", "only_adapters", "peqa",
           "qalora", "split", "targets", "trainable_mask"]
