"""Checkpoints of (quantized) parameter trees in the documented format (docs/FORMAT.md): one Orbax checkpoint per
leaf plus `jq_checkpoint.json`. `format` holds what is on disk, `writer` the atomic streaming write, `reader` the
checked read, `sharding` how a sharded restore places each stored array. Conversion from GGUF / Hugging Face /
Orbax sources is an application (`jq.apps.convert`)."""

from jq.checkpoint.format import FORMAT, FORMAT_VERSION, META_FILE, CheckpointError
from jq.checkpoint.reader import abstract_tree, load, read_meta, verify
from jq.checkpoint.writer import check_destination, save

__all__ = ["FORMAT", "FORMAT_VERSION", "META_FILE", "CheckpointError", "save", "load", "read_meta", "abstract_tree",
           "verify", "check_destination"]
