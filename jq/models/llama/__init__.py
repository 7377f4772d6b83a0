"""The Llama family (Llama, SmolLM, Mistral-style decoders): config, linen module, weight names, calibration blocks,
QuaRot rotation, SmoothAttention and KV-cache decoding, registered as one `ModelFamily`."""

from jq.models.family import ModelFamily, register_family
from jq.models.llama.blocks import block_spec
from jq.models.llama.config import LlamaConfig
from jq.models.llama.model import Llama, cache_bytes_per_token, init_cache, init_params, make_decode, make_forward
from jq.models.llama.rotate import rotate
from jq.models.llama.smooth import smooth_attention
from jq.models.llama.weights import expected_shapes, gguf_tensor, hf_tensor

__all__ = ["FAMILY", "LlamaConfig", "Llama", "init_params", "make_forward", "init_cache", "make_decode"]


def _config_from_gguf(meta, tensor_names) -> LlamaConfig:
    tokens = meta.get("tokenizer.ggml.tokens")
    return LlamaConfig.from_gguf_metadata(meta, vocab_size=len(tokens) if tokens is not None else None,
                                          has_output="output.weight" in tensor_names)


FAMILY = register_family(ModelFamily(
    name="llama",
    config_type=LlamaConfig,
    module=Llama,
    expected_shapes=expected_shapes,
    gguf_architectures=("llama",),
    config_from_gguf=_config_from_gguf,
    gguf_tensor=gguf_tensor,
    hf_model_types=("llama",),
    config_from_hf=lambda hf, source: LlamaConfig.from_hf_config(hf),
    hf_tensor=hf_tensor,
    block_spec=block_spec,
    rotate=rotate,
    smooth_attention=smooth_attention,
    init_cache=init_cache,
    make_decode=make_decode,
    cache_bytes_per_token=cache_bytes_per_token,
    derived_fields=("tie_embeddings",),
))
