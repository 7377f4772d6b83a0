"""`Tokenizer`: text <-> token ids, from a Hugging Face `tokenizer.json` or from a GGUF vocabulary (byte-level BPE or
SentencePiece BPE)."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, processors

# llama.cpp token types (gguf.TokenType, = SentencePiece's): CONTROL (special, e.g. <|im_start|>), USER_DEFINED (added).
from jq.models.io.spm import CONTROL, USER_DEFINED, sentencepiece_bpe

# tokenizer.ggml.pre -> the pre-tokenizer of the original Hugging Face tokenizer.json.
_BYTE_LEVEL = lambda: pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)  # noqa: E731
_PRE_TOKENIZERS = {
    "default": _BYTE_LEVEL,
    "gpt2": _BYTE_LEVEL,
    "smollm": lambda: pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), _BYTE_LEVEL()]),
}


class Tokenizer:
    """Wraps a `tokenizers.Tokenizer`; `encode` adds BOS/EOS exactly as the model's own tokenizer would."""

    def __init__(self, backend: tokenizers.Tokenizer, bos_id: int | None, eos_id: int | None) -> None:
        self.backend = backend
        self.bos_id = bos_id
        self.eos_id = eos_id

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """text -> ids; `add_special_tokens` applies the model's BOS/EOS convention (e.g. none for SmolLM2)."""
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """ids -> text; special tokens such as `<|im_start|>` are kept unless `skip_special_tokens`."""
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    @classmethod
    def from_file(cls, path: str | Path, bos_id: int | None = None, eos_id: int | None = None) -> Tokenizer:
        """Load a `tokenizer.json`; BOS/EOS ids default to those named in a sibling `tokenizer_config.json`."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no tokenizer file at {path}")
        backend = tokenizers.Tokenizer.from_file(str(path))
        cfg_path = path.with_name("tokenizer_config.json")
        cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}

        def token_id(entry: Any) -> int | None:
            content = entry.get("content") if isinstance(entry, dict) else entry
            return backend.token_to_id(content) if isinstance(content, str) else None

        bos_id = bos_id if bos_id is not None else token_id(cfg.get("bos_token"))
        eos_id = eos_id if eos_id is not None else token_id(cfg.get("eos_token"))
        return cls(backend, bos_id, eos_id)

    @classmethod
    def from_gguf_metadata(cls, meta: Mapping[str, Any]) -> Tokenizer:
        """Build from GGUF `tokenizer.ggml.*` values (decoded to Python lists / scalars).

        `tokenizer.ggml.model` "gpt2" is byte-level BPE (merges in the file; the pre-tokenizer follows
        `tokenizer.ggml.pre`); "llama" is SentencePiece BPE (scores, byte fallback, `add_space_prefix`; see
        `jq.models.io.spm`). CONTROL tokens become special added tokens; BOS is prepended only when
        `tokenizer.ggml.add_bos_token` is true (and EOS appended when `add_eos_token` is true).
        """
        kind = meta.get("tokenizer.ggml.model")
        if kind == "gpt2":
            backend = _byte_level_bpe(meta)
        elif kind == "llama":
            missing = [k for k in ("tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type")
                       if k not in meta]
            if missing:
                raise ValueError(f"GGUF SentencePiece vocabulary without {', '.join(missing)}; the file is incomplete")
            unk = meta.get("tokenizer.ggml.unknown_token_id")
            backend = sentencepiece_bpe(
                list(meta["tokenizer.ggml.tokens"]), list(meta["tokenizer.ggml.scores"]),
                [int(k) for k in meta["tokenizer.ggml.token_type"]],
                add_space_prefix=bool(meta.get("tokenizer.ggml.add_space_prefix", True)),
                unk_id=None if unk is None else int(unk),
            )
        else:
            raise ValueError(
                f"unsupported GGUF tokenizer model {kind!r}: supported are 'gpt2' (byte-level BPE) and 'llama' "
                "(SentencePiece BPE); load the model from a Hugging Face directory with a tokenizer.json instead"
            )
        bos_id = meta.get("tokenizer.ggml.bos_token_id")
        eos_id = meta.get("tokenizer.ggml.eos_token_id")
        add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", False)) and bos_id is not None
        add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False)) and eos_id is not None
        if add_bos or add_eos:
            name = lambda i: backend.id_to_token(int(i))
            special = list({name(i): int(i) for i, on in ((bos_id, add_bos), (eos_id, add_eos)) if on}.items())
            prefix = f"{name(bos_id)}:0 " if add_bos else ""
            suffix = f" {name(eos_id)}:0" if add_eos else ""
            backend.post_processor = processors.TemplateProcessing(
                single=f"{prefix}$A:0{suffix}", pair=f"{prefix}$A:0{suffix} $B:1", special_tokens=special
            )
        return cls(backend, None if bos_id is None else int(bos_id), None if eos_id is None else int(eos_id))


def _byte_level_bpe(meta: Mapping[str, Any]) -> tokenizers.Tokenizer:
    """The backend of a GGUF "gpt2" vocabulary: byte-level BPE with the file's merges and pre-tokenizer."""
    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre not in _PRE_TOKENIZERS:
        raise ValueError(
            f"unsupported GGUF pre-tokenizer tokenizer.ggml.pre={pre!r}; supported: {sorted(_PRE_TOKENIZERS)}"
        )
    tokens: list[str] = list(meta["tokenizer.ggml.tokens"])
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
    types = list(meta.get("tokenizer.ggml.token_type", [1] * len(tokens)))

    backend = tokenizers.Tokenizer(
        models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False, byte_fallback=False)
    )
    backend.pre_tokenizer = _PRE_TOKENIZERS[pre]()
    backend.decoder = decoders.ByteLevel()
    added = [
        tokenizers.AddedToken(t, special=(k == CONTROL), normalized=False)
        for t, k in zip(tokens, types) if k in (CONTROL, USER_DEFINED)
    ]
    backend.add_tokens(added)
    return backend
