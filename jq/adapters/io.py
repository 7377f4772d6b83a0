"""Adapters on disk: an adapters tree is a plain tree of float arrays, saved in jq's checkpoint format
(docs/FORMAT.md) with its `LoraConfig` in the metadata, beside the base checkpoint it was trained on."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

from jq.adapters.lora import LoraConfig

__all__ = ["save", "load"]


def save(directory: str | os.PathLike, adapters: dict, cfg: LoraConfig, *, meta: dict[str, Any] | None = None,
         overwrite: bool = False) -> Path:
    """Write `adapters` and `cfg` to `directory` (a new jq checkpoint); returns its path."""
    from jq import checkpoint

    return checkpoint.save(directory, adapters, meta={**(meta or {}), "lora": dataclasses.asdict(cfg)},
                           overwrite=overwrite)


def load(directory: str | os.PathLike) -> tuple[dict, LoraConfig]:
    """(adapters, LoraConfig) from a directory `save` wrote; refuses a checkpoint without a LoRA config."""
    from jq import checkpoint

    tree, jqm = checkpoint.load(directory)
    lora = (jqm.get("meta") or {}).get("lora")
    if not isinstance(lora, dict):
        raise ValueError(f"{directory}: a jq checkpoint without 'lora' metadata is not an adapters checkpoint "
                         "(was it written by jq.adapters.save?)")
    return tree, LoraConfig(**lora)
