"""Models for jq: a Flax linen Llama decoder and BERT sentence encoder, GGUF / Hugging Face loaders, tokenizers,
perplexity, embedding fidelity, model resolution."""

from jq.models.bert import Bert, BertConfig
from jq.models.bert_loader import load_bert
from jq.models.config import LlamaConfig
from jq.models.eval import perplexity
from jq.models.gguf_loader import load_gguf
from jq.models.hf_loader import load_hf
from jq.models.hub import load_model, resolve_model
from jq.models.llama import Llama, init_params, make_forward
from jq.models.tokenizer import Tokenizer

__all__ = [
    "LlamaConfig", "Llama", "init_params", "make_forward", "load_gguf", "load_hf", "load_model", "resolve_model",
    "perplexity", "Tokenizer", "Bert", "BertConfig", "load_bert",
]
