"""SentencePiece BPE vocabularies (GGUF `tokenizer.ggml.model == "llama"`, e.g. Gemma, Llama 2) as `tokenizers` BPE.

SentencePiece's BPE has no merge list: it starts from the characters of the (whitespace-escaped) text and
repeatedly joins the adjacent pair whose concatenation is the vocabulary piece with the highest score (leftmost
first on ties); characters it cannot place become `<0xXX>` byte pieces. `derive_merges` turns that rule into a
ranked merge list — every split of a piece into two mergeable pieces, ranked by the piece's score — which a
`tokenizers` BPE model with `byte_fallback=True` then applies identically. User-defined pieces (`\\n`, runs of
spaces, HTML tags …) are never merged by SentencePiece, so they become added tokens matched before the model;
control pieces (`<bos>`, `<start_of_turn>` …) become special added tokens, which — like Hugging Face and llama.cpp,
and unlike SentencePiece itself — are recognised when they appear literally in the text.
"""

from __future__ import annotations

from collections.abc import Sequence

import tokenizers
from tokenizers import decoders, models, normalizers, pre_tokenizers

# SentencePiece piece types (sentencepiece_model.proto), which GGUF's tokenizer.ggml.token_type copies.
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
SPACE = "\u2581"  # "▁": how SentencePiece writes a space inside pieces
_MERGEABLE = (NORMAL, UNUSED)  # SentencePiece's merge candidates; user-defined symbols are frozen


def piece_strings(tokens: Sequence[str], types: Sequence[int]) -> list[str]:
    """The pieces as SentencePiece holds them: llama.cpp's converter writes user-defined pieces with plain spaces
    ("  " for "▁▁"), so those spaces become "▁" again; every other piece is unchanged."""
    return [t.replace(" ", SPACE) if k == USER_DEFINED else t for t, k in zip(tokens, types)]


def derive_merges(pieces: Sequence[str], scores: Sequence[float], types: Sequence[int]) -> list[tuple[str, str]]:
    """The merge list that makes a `tokenizers` BPE model encode like SentencePiece BPE with these pieces.

    For each normal (or unused) piece, every split into two normal / unused pieces is a merge; merges are ranked by
    the joined piece's score, highest first (then by the piece's id and the cut position, to be deterministic).
    """
    index: dict[str, int] = {}
    for i, (p, k) in enumerate(zip(pieces, types)):
        if k in _MERGEABLE:
            index.setdefault(p, i)
    merges = []
    for piece, _ in sorted(index.items(), key=lambda item: (-float(scores[item[1]]), item[1])):
        merges.extend((piece[:cut], piece[cut:]) for cut in range(1, len(piece))
                      if piece[:cut] in index and piece[cut:] in index)
    return merges


def sentencepiece_bpe(
    tokens: Sequence[str],
    scores: Sequence[float],
    types: Sequence[int],
    *,
    add_space_prefix: bool,
    unk_id: int | None = None,
) -> tokenizers.Tokenizer:
    """A `tokenizers.Tokenizer` that encodes and decodes like the SentencePiece BPE model of these pieces.

    `tokens`, `scores`, `types` are GGUF's `tokenizer.ggml.tokens` / `scores` / `token_type`. Spaces become "▁";
    `add_space_prefix` (SentencePiece's add_dummy_prefix) also puts one "▁" before the text. BOS / EOS are the
    caller's (a post-processor); the ids are the GGUF ids.
    """
    if not len(tokens) == len(scores) == len(types):
        raise ValueError(f"SentencePiece vocabulary: {len(tokens)} tokens but {len(scores)} scores and "
                         f"{len(types)} token types; the GGUF's tokenizer.ggml.* arrays must have one entry per token")
    pieces = piece_strings(tokens, types)
    if not any(k == BYTE for k in types):
        raise ValueError("SentencePiece vocabulary without byte pieces (<0x00>..<0xFF>, token_type 6): only "
                         "byte-fallback vocabularies are supported")
    vocab: dict[str, int] = {}
    for i, p in enumerate(pieces):
        vocab.setdefault(p, i)
    unk = pieces[unk_id] if unk_id is not None and 0 <= unk_id < len(pieces) else None
    backend = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=derive_merges(pieces, scores, types),
                                              unk_token=unk, fuse_unk=True, byte_fallback=True))
    backend.normalizer = normalizers.Replace(" ", SPACE)
    steps = [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_space_prefix:
        backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement=SPACE, prepend_scheme="first", split=False)
        steps.append(decoders.Strip(" ", 1, 0))
    backend.decoder = decoders.Sequence(steps)
    # Control pieces are matched in the raw text; user-defined ones in the normalized text ("▁▁" matches "  "),
    # as SentencePiece's prefix matcher sees them.
    backend.add_tokens([
        tokenizers.AddedToken(p, special=(k == CONTROL), normalized=(k == USER_DEFINED))
        for p, k in zip(pieces, types) if k in (CONTROL, USER_DEFINED)
    ])
    return backend
