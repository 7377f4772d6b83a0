"""Hugging Face pre-quantized checkpoints as jq QTensors, exactly as shipped, and back (docs/HF_QUANT.md): one module
per format — `gptq` (AutoGPTQ / GPTQModel), `awq` (AutoAWQ GEMM), `compressed` (llm-compressor's compressed-tensors
`pack-quantized`) — each with `to_qtensor` / `from_qtensor` and its quantization_config reader / writer, the shared
bit streams and unsigned view (`common`), and whole directories (`directory`, used by
`jq.models.io.safetensors.open_hf`)."""

from jq.models.io.hfq import awq, compressed, gptq
from jq.models.io.hfq.directory import QUANT_METHODS, quant_method, quantized_params

__all__ = ["awq", "compressed", "gptq", "QUANT_METHODS", "quant_method", "quantized_params"]
