"""Models for jq (layer 6): the `ModelFamily` record and its registry (`family`), one package per family
(`llama`, `gemma3`, `moe`, `bert`), generic readers apart from any family (`io`: GGUF, safetensors, tokenizers, the PyPI hub) and
`load_model`. Adding a family: a package like `llama/` that ends with `register_family(ModelFamily(...))`, and
one import line below."""

from jq.models import bert, gemma3, llama, moe  # noqa: F401  (each registers its family)
from jq.models.family import (LoadedModel, ModelFamily, TensorMap, families, family_for_gguf, family_for_hf, family_of,
                              get_family, register_family)
from jq.models.io.hub import resolve_model
from jq.models.io.tokenizer import Tokenizer
from jq.models.load import load_model

__all__ = ["LoadedModel", "ModelFamily", "TensorMap", "families", "family_for_gguf", "family_for_hf", "family_of",
           "get_family", "register_family", "load_model", "resolve_model", "Tokenizer"]
