"""The Gemma 3 family (text decoders: 270M, 1B): config, linen module, weight names, calibration blocks, QuaRot
rotation and KV-cache decoding, registered as one `ModelFamily`."""

from jq.models.family import ModelFamily, register_family
from jq.models.gemma3.blocks import block_spec
from jq.models.gemma3.config import Gemma3Config
from jq.models.gemma3.model import (Gemma3, cache_bytes_per_token, init_cache, init_params, make_decode,
                                    make_forward)
from jq.models.gemma3.rotate import rotate
from jq.models.gemma3.weights import expected_shapes, gguf_tensor, hf_tensor

__all__ = ["FAMILY", "Gemma3Config", "Gemma3", "init_params", "make_forward", "init_cache", "make_decode"]


def _config_from_gguf(meta, tensor_names) -> Gemma3Config:
    if "output.weight" in tensor_names:
        raise ValueError("this gemma3 GGUF has an untied output.weight; the Gemma 3 family ties its LM head")
    tokens = meta.get("tokenizer.ggml.tokens")
    return Gemma3Config.from_gguf_metadata(meta, vocab_size=len(tokens) if tokens is not None else None)


FAMILY = register_family(ModelFamily(
    name="gemma3",
    config_type=Gemma3Config,
    module=Gemma3,
    expected_shapes=expected_shapes,
    gguf_architectures=("gemma3",),
    config_from_gguf=_config_from_gguf,
    gguf_tensor=gguf_tensor,
    hf_model_types=("gemma3_text",),
    config_from_hf=lambda hf, source: Gemma3Config.from_hf_config(hf),
    hf_tensor=hf_tensor,
    block_spec=block_spec,
    rotate=rotate,
    init_cache=init_cache,
    make_decode=make_decode,
    cache_bytes_per_token=cache_bytes_per_token,
    derived_fields=("residual_rotation",),
))
