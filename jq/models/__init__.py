"""Models for jq: a Flax linen Llama decoder and BERT sentence encoder, GGUF / Hugging Face loaders, tokenizers,
perplexity, embedding fidelity, model resolution."""

from jq.models.bert.model import Bert, BertConfig
from jq.models.bert.weights import load_bert
from jq.models.llama.config import LlamaConfig
from jq.models.io.gguf import load_gguf
from jq.models.io.safetensors import load_hf
from jq.models.io.hub import load_model, resolve_model
from jq.models.llama.model import Llama, init_params, make_forward
from jq.models.io.tokenizer import Tokenizer

__all__ = [
    "LlamaConfig", "Llama", "init_params", "make_forward", "load_gguf", "load_hf", "load_model", "resolve_model",
    "Tokenizer", "Bert", "BertConfig", "load_bert",
]
