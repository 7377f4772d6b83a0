"""SentencePiece BPE vocabularies from GGUF metadata (`tokenizer.ggml.model == "llama"`, e.g. Gemma 3).

The tiny vocabulary's expected ids were worked out by hand from SentencePiece's rule (join the adjacent pair whose
piece scores highest) and checked against the `sentencepiece` package on the same pieces; the real Gemma 3 ids
(slow test) are what `sentencepiece` gives for a ModelProto built from the GGUF's pieces.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from jq.models.io import spm
from jq.models.io.tokenizer import Tokenizer

PERSUASION = Path("/work/shared/data/austen/persuasion.txt")

# ids: 0-3 specials, 4-259 <0x00>..<0xFF>, then the pieces below (in order, from 260).
PIECES = [("a", -1.0, 1), ("b", -2.0, 1), ("c", -3.0, 1), ("▁", -4.0, 1), ("bc", -5.0, 1), ("ab", -6.0, 1),
          ("▁a", -8.0, 1), ("▁b", -9.0, 1), ("\n", -1000.0, 4), ("  ", -1000.0, 4), ("<eot>", -1000.0, 3)]
A, B, C, SP, BC, AB, SP_A, SP_B, NL, TWO_SPACES, EOT = range(260, 271)


def _meta(**over: object) -> dict:
    meta = {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": ["<pad>", "<eos>", "<bos>", "<unk>"] + [f"<0x{b:02X}>" for b in range(256)]
        + [p for p, _, _ in PIECES],
        "tokenizer.ggml.scores": [0.0] * 260 + [s for _, s, _ in PIECES],
        "tokenizer.ggml.token_type": [3, 3, 3, 2] + [6] * 256 + [k for _, _, k in PIECES],
        "tokenizer.ggml.bos_token_id": 2, "tokenizer.ggml.eos_token_id": 1, "tokenizer.ggml.unknown_token_id": 3,
        "tokenizer.ggml.add_bos_token": False, "tokenizer.ggml.add_space_prefix": False,
    }
    meta.update(over)
    return meta


def test_merges_follow_piece_scores():
    meta = _meta()
    pieces = spm.piece_strings(meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"])
    assert pieces[TWO_SPACES] == "▁▁" and pieces[NL] == "\n"  # user-defined spaces back in SentencePiece's form
    merges = spm.derive_merges(pieces, meta["tokenizer.ggml.scores"], meta["tokenizer.ggml.token_type"])
    assert merges == [("b", "c"), ("a", "b"), ("▁", "a"), ("▁", "b")]  # user-defined "▁▁" is never a merge


@pytest.mark.parametrize("text, ids", [
    ("abc", [A, BC]),             # "bc" (-5) beats "ab" (-6): not left to right
    (" ab", [SP, AB]),            # "ab" (-6) beats "▁a" (-8)
    ("a bc", [A, SP, BC]),
    ("ba", [B, A]),               # "ba" is no piece
    ("é", [4 + 0xC3, 4 + 0xA9]),  # unseen character: its UTF-8 bytes
    ("a  b", [A, TWO_SPACES, B]),  # user-defined "▁▁" matched whole, never merged
    ("a   b", [A, TWO_SPACES, SP_B]),
    ("a\nb", [A, NL, B]),
    ("a<eot>", [A, EOT]),         # control tokens are recognised in the text (as Hugging Face / llama.cpp do)
])
def test_tiny_vocabulary_encodes_like_sentencepiece(text, ids):
    assert Tokenizer.from_gguf_metadata(_meta()).encode(text) == ids


def test_round_trip_bos_and_space_prefix():
    tok = Tokenizer.from_gguf_metadata(_meta(**{"tokenizer.ggml.add_bos_token": True}))
    assert (tok.bos_id, tok.eos_id) == (2, 1)
    assert tok.encode("ab") == [2, AB] and tok.encode("ab", add_special_tokens=False) == [AB]
    for text in ["abc a bc", "é 😀 中文", "  lead and trail  ", "a\n\nb\t", "<eot> x", ""]:
        ids = tok.encode(text, add_special_tokens=False)
        assert tok.decode(ids) == text
        assert tok.decode(tok.encode(text), skip_special_tokens=True) == text.replace("<eot>", "")
    assert tok.decode([2, AB]) == "<bos>ab"

    prefixed = Tokenizer.from_gguf_metadata(_meta(**{"tokenizer.ggml.add_space_prefix": True}))
    assert prefixed.encode("ab") == [SP, AB] and prefixed.decode([SP, AB]) == "ab"
    assert prefixed.encode("a b") == [SP_A, SP_B]


def test_bad_vocabularies_are_refused():
    with pytest.raises(ValueError, match="unsupported GGUF tokenizer model 'bert'.*'gpt2'.*'llama'"):
        Tokenizer.from_gguf_metadata(_meta(**{"tokenizer.ggml.model": "bert"}))
    meta = _meta()
    del meta["tokenizer.ggml.scores"]
    with pytest.raises(ValueError, match="without tokenizer.ggml.scores"):
        Tokenizer.from_gguf_metadata(meta)
    with pytest.raises(ValueError, match="271 tokens but 270 scores"):
        Tokenizer.from_gguf_metadata(_meta(**{"tokenizer.ggml.scores": [0.0] * 270}))
    no_bytes = _meta(**{"tokenizer.ggml.token_type": [3, 3, 3, 2] + [1] * 256 + [k for _, _, k in PIECES]})
    with pytest.raises(ValueError, match="without byte pieces"):
        Tokenizer.from_gguf_metadata(no_bytes)


@pytest.mark.slow
def test_gemma3_vocabulary_matches_sentencepiece():
    from jq.models.io.gguf import open_reader
    from jq.models.io.hub import resolve_model

    reader = open_reader(resolve_model("gemma3-270m"))
    meta = {k: f.contents() for k, f in reader.fields.items() if k.startswith("tokenizer.")}
    tok = Tokenizer.from_gguf_metadata(meta)
    assert tok.vocab_size == 262144 and (tok.bos_id, tok.eos_id) == (2, 1)
    # The ids below are what sentencepiece gives for the same pieces.
    assert tok.encode("Hello world") == [2, 9259, 1902]
    known = {" Hello": [26352], "  two  spaces  ": [138, 13498, 138, 35220, 138],
             "Captain Wentworth's": [69072, 185780, 236789, 236751], "😀": [242398], "中文": [55041]}
    for text, ids in known.items():
        assert tok.encode(text, add_special_tokens=False) == ids, text
    assert tok.encode("<start_of_turn>user\n", add_special_tokens=False) == [105, 2364, 107]
    if PERSUASION.is_file():
        text = PERSUASION.read_text(encoding="utf-8")
        ids = tok.encode(text, add_special_tokens=False)
        assert len(ids) == 111588 and ids[:12] == [29860, 212194, 109, 2003, 108, 65897, 146616, 108, 236769,
                                                   236770, 236828, 236770]
        paragraph = text[20000:23000]
        assert tok.decode(tok.encode(paragraph), skip_special_tokens=True) == paragraph
        assert tok.decode(ids) == text
