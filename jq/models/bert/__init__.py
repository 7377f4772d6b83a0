"""The BERT family (sentence encoders such as all-MiniLM-L6-v2): config, linen module, Hugging Face weight names and
WordPiece batching, registered as one `ModelFamily`. An encoder: no perplexity, generation or calibrated recipes."""

from jq.models.bert.model import Bert, BertConfig, expected_shapes
from jq.models.bert.weights import BertTokenizer, hf_tensor, load_bert
from jq.models.family import ModelFamily, register_family

__all__ = ["FAMILY", "Bert", "BertConfig", "BertTokenizer", "load_bert"]


def _module(cfg: BertConfig, dtype=None, kv_cache=None) -> Bert:
    if kv_cache is not None:
        raise ValueError("a BERT encoder has no KV cache; drop the recipe's kv_cache section")
    return Bert(cfg)


FAMILY = register_family(ModelFamily(
    name="bert",
    config_type=BertConfig,
    module=_module,
    expected_shapes=expected_shapes,
    hf_model_types=("bert",),
    config_from_hf=lambda hf, source: BertConfig.from_hf_config(hf, source=source),
    hf_tensor=hf_tensor,
    causal_lm=False,
))
