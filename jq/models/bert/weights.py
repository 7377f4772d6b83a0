"""Load a Hugging Face / sentence-transformers BERT directory (config.json, safetensors, tokenizer.json) into the
fp32 parameter tree of `jq.models.bert.model.Bert`, and its WordPiece tokenizer as padded int32 batches."""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tokenizers

from jq.models.bert.model import BertConfig, expected_shapes
from jq.models.family import TensorMap

__all__ = ["BertTokenizer", "hf_names", "hf_tensor", "load_bert"]

# Parameter path under layers_N (of jq.models.bert.model.Bert) -> Hugging Face name under "encoder.layer.N."
_LAYER = {
    "attn/query": "attention.self.query", "attn/key": "attention.self.key", "attn/value": "attention.self.value",
    "attn/out": "attention.output.dense", "attn_norm": "attention.output.LayerNorm",
    "mlp/up": "intermediate.dense", "mlp/down": "output.dense", "mlp_norm": "output.LayerNorm",
}
_EMBED = {"embeddings/word": "embeddings.word_embeddings", "embeddings/position": "embeddings.position_embeddings",
          "embeddings/token_type": "embeddings.token_type_embeddings", "embeddings/norm": "embeddings.LayerNorm"}
_LEAF = {"kernel": "weight", "embedding": "weight", "scale": "weight", "bias": "bias"}
# Tensors a BERT checkpoint may carry that the encoder does not use: the position-id buffer, the pooler (unused by
# sentence-transformers) and pre-training heads.
_UNUSED = ("embeddings.position_ids", "pooler.", "cls.")
_PREFIX = "bert."  # BertFor* checkpoints nest the encoder under "bert."


def hf_names(cfg: BertConfig) -> dict[str, tuple[str, bool]]:
    """Parameter path of `Bert(cfg)` -> (Hugging Face tensor name without a "bert." prefix, is a linear weight to
    transpose from (out, in) to (in, out))."""
    out = {}
    for path in expected_shapes(cfg):
        module, leaf = path.rsplit("/", 1)
        if module.startswith("layers_"):
            layer, rest = module.split("/", 1)
            hf_module = f"encoder.layer.{layer.removeprefix('layers_')}.{_LAYER[rest]}"
        else:
            hf_module = _EMBED[module]
        out[path] = (f"{hf_module}.{_LEAF[leaf]}", leaf == "kernel")
    return out


@functools.lru_cache(maxsize=8)
def _by_name(cfg: BertConfig) -> dict[str, TensorMap]:
    return {name: TensorMap(path, transpose=linear) for path, (name, linear) in hf_names(cfg).items()}


def hf_tensor(name: str, cfg: BertConfig) -> TensorMap | None:
    """A Hugging Face tensor name -> where it goes in `Bert(cfg)`: with or without the "bert." prefix, old
    TF-converted LayerNorm gamma / beta as weight / bias; None for the position-id buffer, the pooler and
    pre-training heads; ValueError for a tensor this encoder does not know."""
    canon = name.removeprefix(_PREFIX).replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta",
                                                                                              "LayerNorm.bias")
    if canon in _by_name(cfg):
        return _by_name(cfg)[canon]
    if canon.startswith(_UNUSED):
        return None
    raise ValueError(f"unexpected tensor {name!r} for a BERT encoder of {cfg.num_hidden_layers} layers; is this a "
                     "BERT checkpoint, and does its config.json match it?")


def _check_pooling(directory: Path) -> None:
    """sentence-transformers' pooling must be the mean over tokens, which `jq.models.bert.model.encode` computes."""
    pooling = directory / "1_Pooling" / "config.json"
    if pooling.is_file():
        p = json.loads(pooling.read_text())
        modes = sorted(k for k, v in p.items() if k.startswith("pooling_mode") and v)
        if modes != ["pooling_mode_mean_tokens"]:
            raise ValueError(f"{pooling}: pooling modes {modes} are not supported; jq.models.bert.model.encode computes "
                             "only the mean over tokens (pooling_mode_mean_tokens)")


class BertTokenizer:
    """A WordPiece `tokenizer.json` -> padded batches: `tok(texts)` -> (ids, mask), int32 [B, T].

    Each text gets [CLS] ... [SEP] (the file's post-processor) and is truncated to `max_length` tokens; the batch
    is padded with the pad token to its longest text, rounded up to a multiple of `pad_to_multiple_of` (capped at
    `max_length`), so batches of similar texts share a shape. The padding / truncation stored in the file (often
    a fixed 128) is replaced by these settings.
    """

    def __init__(self, backend: tokenizers.Tokenizer, max_length: int = 128, pad_to_multiple_of: int = 16,
                 source: str = "tokenizer") -> None:
        if max_length < 2 or pad_to_multiple_of < 1:
            raise ValueError(f"max_length must be >= 2 and pad_to_multiple_of >= 1, got {max_length}, "
                             f"{pad_to_multiple_of}")
        pad = backend.padding or {}
        pad_token = pad.get("pad_token", "[PAD]")
        pad_id = backend.token_to_id(pad_token)
        if pad_id is None:
            raise ValueError(f"{source}: no pad token {pad_token!r} in the vocabulary")
        self.backend = backend
        self.max_length = max_length
        self.pad_to_multiple_of = pad_to_multiple_of
        self.pad_id = pad_id
        backend.enable_truncation(max_length)
        backend.no_padding()  # padding happens in __call__, where the batch's length is known

    @classmethod
    def from_file(cls, path: str | os.PathLike[str], max_length: int = 128,
                  pad_to_multiple_of: int = 16) -> BertTokenizer:
        """Load a `tokenizer.json` (see the class docstring for the padding and truncation applied)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no tokenizer file at {path}")
        return cls(tokenizers.Tokenizer.from_file(str(path)), max_length, pad_to_multiple_of, source=str(path))

    def __call__(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """texts -> (ids, mask) int32 [len(texts), T]; mask is 1 on real tokens (incl. [CLS]/[SEP]), 0 on padding."""
        if isinstance(texts, str):
            raise TypeError("BertTokenizer takes a list of texts, got one str; wrap it: tok([text])")
        enc = self.backend.encode_batch(list(texts))
        longest = max((len(e.ids) for e in enc), default=1)
        m = self.pad_to_multiple_of
        t = min(-(-longest // m) * m, self.max_length)
        ids = np.full((len(enc), t), self.pad_id, np.int32)
        mask = np.zeros((len(enc), t), np.int32)
        for i, e in enumerate(enc):
            ids[i, : len(e.ids)] = e.ids
            mask[i, : len(e.ids)] = 1
        return ids, mask


def load_bert(name_or_path: str | os.PathLike[str], max_length: int = 128
              ) -> tuple[BertConfig, dict[str, Any], BertTokenizer | None]:
    """A BERT directory or a known name (`minilm-l6`, see `jq.models.io.hub`) -> (config, fp32 params, tokenizer).

    The tokenizer (from tokenizer.json, truncating to `max_length`) is None when the directory has none. A
    sentence-transformers `1_Pooling/config.json`, when present, must ask for mean pooling.
    """
    from jq.models.io.hub import resolve_model
    from jq.models.io.safetensors import load_hf

    directory = resolve_model(name_or_path)
    if not directory.is_dir():
        raise ValueError(f"{directory}: a BERT model is a directory (config.json, model.safetensors, tokenizer.json)")
    _check_pooling(directory)
    m = load_hf(directory)
    if not isinstance(m.cfg, BertConfig):
        raise ValueError(f"{directory} holds a {m.family.name} model, not a BERT encoder")
    tok_path = directory / "tokenizer.json"
    tok = BertTokenizer.from_file(tok_path, max_length=min(max_length, m.cfg.max_position_embeddings)) \
        if tok_path.is_file() else None
    return m.cfg, m.params, tok
