"""`load_model`: a model file, directory or known name -> a `LoadedModel` of whichever registered family it holds."""

from __future__ import annotations

import os

from jq.models.family import LoadedModel
from jq.models.io.gguf import load_gguf
from jq.models.io.hub import resolve_model
from jq.models.io.safetensors import load_hf

__all__ = ["load_model"]


def load_model(name_or_path: str | os.PathLike[str], native: bool = False) -> LoadedModel:
    """Resolve a `.gguf` file, a Hugging Face directory or a known name (`jq.models.io.hub.KNOWN_MODELS`, fetched
    once) and read it: the family comes from the file (GGUF `general.architecture`, HF `model_type`). With
    `native`, a GGUF file's legacy block types load as the QTensors they are (`jq.models.io.gguf_native`)."""
    path = resolve_model(name_or_path)
    m = load_hf(path) if path.is_dir() else load_gguf(path, native)
    m.source = str(path)
    return m
