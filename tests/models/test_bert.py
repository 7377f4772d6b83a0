"""The Flax BERT encoder against a plain-NumPy BERT, the safetensors / tokenizer.json loader, quantized encoders,
the embedding-fidelity metrics, and the real all-MiniLM-L6-v2 (slow)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import jax
import numpy as np
import pytest
from safetensors.numpy import save_file
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

import jq
from jq.apps import embeddings as embed_eval
from jq.models.bert.model import Bert, BertConfig, encode, expected_shapes, make_encoder
from jq.models.bert.weights import load_bert
from jq.models.llama.config import LlamaConfig

CFG = BertConfig.tiny(vocab_size=20)
WORDS = ["the", "cat", "sat", "on", "mat", "dog", "ran", "far", "a", "big", "red", "##s"]
PERSUASION = Path("/work/shared/data/austen/persuasion.txt")

# ----------------------------------------------------------------------------------------------- NumPy reference


def hf_weights(cfg: BertConfig, seed: int = 0) -> dict[str, np.ndarray]:
    """Random HF-named BERT weights ((out, in) linears), plus the buffers and pooler a real checkpoint carries."""
    rng = np.random.default_rng(seed)
    d, h = cfg.hidden_size, cfg.intermediate_size

    def r(*shape, std=0.2):
        return (rng.standard_normal(shape) * std).astype(np.float32)

    w = {"embeddings.word_embeddings.weight": r(cfg.vocab_size, d, std=1.0),
         "embeddings.position_embeddings.weight": r(cfg.max_position_embeddings, d, std=0.5),
         "embeddings.token_type_embeddings.weight": r(cfg.type_vocab_size, d, std=0.5),
         "embeddings.LayerNorm.weight": 1 + r(d, std=0.1), "embeddings.LayerNorm.bias": r(d, std=0.1),
         "embeddings.position_ids": np.arange(cfg.max_position_embeddings, dtype=np.int64)[None],
         "pooler.dense.weight": r(d, d), "pooler.dense.bias": r(d)}
    for i in range(cfg.num_hidden_layers):
        p = f"encoder.layer.{i}."
        for name in ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense"):
            w[p + name + ".weight"], w[p + name + ".bias"] = r(d, d), r(d, std=0.1)
        w[p + "intermediate.dense.weight"], w[p + "intermediate.dense.bias"] = r(h, d), r(h, std=0.1)
        w[p + "output.dense.weight"], w[p + "output.dense.bias"] = r(d, h), r(d, std=0.1)
        for ln in ("attention.output.LayerNorm", "output.LayerNorm"):
            w[p + ln + ".weight"], w[p + ln + ".bias"] = 1 + r(d, std=0.1), r(d, std=0.1)
    return w


def np_encode(cfg: BertConfig, w: dict[str, np.ndarray], ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Reference BERT + mean pooling + L2 normalisation on HF-named weights in float64. ids, mask: [B, T] -> [B, D]."""
    w = {k: v.astype(np.float64) for k, v in w.items()}
    erf = np.vectorize(math.erf)

    def ln(x, p):
        mu = x.mean(-1, keepdims=True)
        var = ((x - mu) ** 2).mean(-1, keepdims=True)
        return (x - mu) / np.sqrt(var + cfg.layer_norm_eps) * w[p + ".weight"] + w[p + ".bias"]

    def lin(x, p):
        return x @ w[p + ".weight"].T + w[p + ".bias"]

    out = []
    for seq, m in zip(ids, mask):
        t, nh, hd = len(seq), cfg.num_attention_heads, cfg.head_dim
        x = w["embeddings.word_embeddings.weight"][seq] + w["embeddings.position_embeddings.weight"][:t] \
            + w["embeddings.token_type_embeddings.weight"][0]
        x = ln(x, "embeddings.LayerNorm")
        for i in range(cfg.num_hidden_layers):
            p = f"encoder.layer.{i}."
            q, k, v = (lin(x, p + f"attention.self.{n}").reshape(t, nh, hd) for n in ("query", "key", "value"))
            s = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(hd)
            s = np.where(m[None, None, :] > 0, s, -np.inf)
            pr = np.exp(s - s.max(-1, keepdims=True))
            pr /= pr.sum(-1, keepdims=True)
            a = np.einsum("hqk,khd->qhd", pr, v).reshape(t, nh * hd)
            x = ln(x + lin(a, p + "attention.output.dense"), p + "attention.output.LayerNorm")
            u = lin(x, p + "intermediate.dense")
            x = ln(x + lin(0.5 * u * (1 + erf(u / np.sqrt(2))), p + "output.dense"), p + "output.LayerNorm")
        pooled = (x * m[:, None]).sum(0) / m.sum()
        out.append(pooled / np.linalg.norm(pooled))
    return np.stack(out)


def write_tokenizer(path: Path) -> None:
    """A tiny BERT-style WordPiece tokenizer.json; its stored padding (fixed 12) must be replaced by the loader."""
    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", *WORDS])}
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]",
                                                       special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    tok.enable_padding(pad_id=0, pad_token="[PAD]", length=12)
    tok.save(str(path))


def write_model(directory: Path, weights: dict[str, np.ndarray], prefix: str = "", pooling: bool = True) -> Path:
    """An HF / sentence-transformers directory: config.json, model.safetensors, tokenizer.json, 1_Pooling."""
    directory.mkdir(parents=True, exist_ok=True)
    hf = {"model_type": "bert", "hidden_act": "gelu", "vocab_size": CFG.vocab_size, "hidden_size": CFG.hidden_size,
          "num_hidden_layers": CFG.num_hidden_layers, "num_attention_heads": CFG.num_attention_heads,
          "intermediate_size": CFG.intermediate_size, "max_position_embeddings": CFG.max_position_embeddings,
          "type_vocab_size": CFG.type_vocab_size, "layer_norm_eps": CFG.layer_norm_eps}
    (directory / "config.json").write_text(json.dumps(hf))
    save_file({prefix + k: v for k, v in weights.items()}, str(directory / "model.safetensors"))
    write_tokenizer(directory / "tokenizer.json")
    if pooling:
        (directory / "1_Pooling").mkdir(exist_ok=True)
        (directory / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_mean_tokens": True,
                                                                          "pooling_mode_cls_token": False}))
    return directory


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(config, float params, tokenizer, HF weights) of a tiny BERT loaded from a written directory."""
    w = hf_weights(CFG)
    cfg, params, tok = load_bert(write_model(tmp_path_factory.mktemp("bert"), w))
    return cfg, params, tok, w


TEXTS = ["The cat sat on the mat.", "A big red dog ran far", "cats", "the dog sat on a big red mat, the cat ran far"]

# ------------------------------------------------------------------------------------------------ forward, loader


def test_flax_encoder_matches_numpy_reference_with_padding(tiny):
    cfg, params, tok, w = tiny
    ids, mask = tok(TEXTS)
    assert mask.sum(1).min() < ids.shape[1]  # the batch has padding
    got = np.asarray(jax.jit(lambda p, i, m: encode(Bert(cfg), p, i, m))(params, ids, mask))
    want = np_encode(cfg, w, ids, mask)
    np.testing.assert_allclose(got, want, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-6)
    # padding does not change a sentence's embedding: each text alone (no padding) gives the same vector
    for i, text in enumerate(TEXTS):
        alone = np.asarray(make_encoder(cfg)(params, *tok([text])))[0]
        np.testing.assert_allclose(alone, got[i], atol=2e-5)


@pytest.mark.parametrize("prefix", ["", "bert."])
def test_loader_round_trip(tmp_path, prefix):
    w = hf_weights(CFG, seed=1)
    cfg, params, tok = load_bert(write_model(tmp_path, w, prefix=prefix))
    assert cfg == CFG
    assert set(p for p, _ in jq.leaf_paths(params)) == set(expected_shapes(cfg))
    np.testing.assert_array_equal(params["embeddings"]["word"]["embedding"], w["embeddings.word_embeddings.weight"])
    np.testing.assert_array_equal(params["embeddings"]["norm"]["scale"], w["embeddings.LayerNorm.weight"])
    layer0, layer1 = params["layers_0"], params["layers_1"]
    np.testing.assert_array_equal(layer1["attn"]["key"]["kernel"], w["encoder.layer.1.attention.self.key.weight"].T)
    np.testing.assert_array_equal(layer0["mlp"]["up"]["kernel"], w["encoder.layer.0.intermediate.dense.weight"].T)
    np.testing.assert_array_equal(layer1["mlp_norm"]["bias"], w["encoder.layer.1.output.LayerNorm.bias"])
    assert all(x.dtype == np.float32 for _, x in jq.leaf_paths(params))


def test_tokenizer_pads_to_the_batch_not_to_the_file_setting(tiny):
    _, _, tok, _ = tiny
    ids, mask = tok(["the cat sat", "cats"])
    assert ids.dtype == mask.dtype == np.int32 and ids.shape == (2, 16)  # longest 5 tokens, rounded up to 16
    assert ids[0, :5].tolist() == [2, 4, 5, 6, 3] and ids[1, :4].tolist() == [2, 5, 15, 3]  # cat + ##s
    assert mask.sum(1).tolist() == [5, 4] and (ids[mask == 0] == 0).all()
    long_ids, long_mask = tok([" ".join(["cat"] * 40)])
    assert long_ids.shape == (1, 16) and long_mask.all() and long_ids[0, -1] == 3  # truncated to max_length, [SEP] kept
    with pytest.raises(TypeError, match="list of texts"):
        tok("the cat")


# ------------------------------------------------------------------------------------------------ bad input


def test_missing_tensor_names_file_and_key(tmp_path):
    w = hf_weights(CFG)
    del w["encoder.layer.1.attention.self.value.bias"]
    d = write_model(tmp_path, w)
    with pytest.raises(ValueError, match=r"missing weight for parameter layers_1/attn/value/bias"):
        load_bert(d)


def test_misshaped_and_unexpected_tensors_and_bad_configs(tmp_path):
    w = hf_weights(CFG)
    w["encoder.layer.0.output.dense.weight"] = w["encoder.layer.0.output.dense.weight"].T.copy()
    with pytest.raises(ValueError, match=r"model\.safetensors: tensor 'encoder\.layer\.0\.output\.dense\.weight' "
                                         r"has shape \(64, 32\), expected \(32, 64\)"):
        load_bert(write_model(tmp_path / "a", w))
    w = {**hf_weights(CFG), "encoder.layer.2.output.dense.bias": np.zeros(32, np.float32)}
    with pytest.raises(ValueError, match=r"unexpected tensor 'encoder\.layer\.2\.output\.dense\.bias'.*2 layers"):
        load_bert(write_model(tmp_path / "b", w))
    d = write_model(tmp_path / "c", hf_weights(CFG))
    (d / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_cls_token": True}))
    with pytest.raises(ValueError, match=r"1_Pooling/config\.json.*pooling_mode_cls_token"):
        load_bert(d)
    with pytest.raises(ValueError, match=r"my/config\.json: hidden_act 'gelu_new'"):
        BertConfig.from_hf_config({"model_type": "bert", "hidden_act": "gelu_new"}, source="my/config.json")
    with pytest.raises(ValueError, match=r"missing field\(s\) \['num_hidden_layers'"):
        BertConfig.from_hf_config({"vocab_size": 5, "hidden_size": 8, "num_attention_heads": 2, "intermediate_size": 8})
    with pytest.raises(ValueError, match="load_bert"):  # the Llama loader points BERT directories to load_bert
        LlamaConfig.from_hf_config({"model_type": "bert"})
    with pytest.raises(ValueError, match="multiple of num_attention_heads"):
        BertConfig(vocab_size=5, hidden_size=10, num_hidden_layers=1, num_attention_heads=4, intermediate_size=8)


def test_bad_directories_configs_and_inputs_name_the_problem(tmp_path, tiny):
    from jq.models.bert.weights import BertTokenizer

    cfg, params, _, _ = tiny
    f = tmp_path / "llama.gguf"
    f.write_bytes(b"")
    with pytest.raises(ValueError, match=r"llama\.gguf: a BERT model is a directory"):
        load_bert(f)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no config\.json in .*empty: not a Hugging Face model directory"):
        load_bert(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match=r"no tokenizer file at .*missing\.json"):
        BertTokenizer.from_file(tmp_path / "missing.json")
    with pytest.raises(ValueError, match=r"c\.json: model_type 'roberta' is not supported \(only 'bert'\)"):
        BertConfig.from_hf_config({"model_type": "roberta"}, source="c.json")
    with pytest.raises(ValueError, match=r"position_embedding_type 'relative_key' is not supported"):
        BertConfig.from_hf_config({"position_embedding_type": "relative_key"})
    with pytest.raises(ValueError, match=r"BertConfig\.num_hidden_layers must be positive, got 0"):
        BertConfig(vocab_size=5, hidden_size=8, num_hidden_layers=0, num_attention_heads=2, intermediate_size=8)
    with pytest.raises(ValueError, match=r"max_length must be >= 2 and pad_to_multiple_of >= 1, got 1, 16"):
        BertTokenizer(Tokenizer(models.WordPiece({"[PAD]": 0, "[UNK]": 1}, unk_token="[UNK]")), max_length=1)
    with pytest.raises(ValueError, match=r"src: no pad token '\[PAD\]' in the vocabulary"):
        BertTokenizer(Tokenizer(models.WordPiece({"[UNK]": 0}, unk_token="[UNK]")), source="src")
    too_long = np.zeros((1, cfg.max_position_embeddings + 1), np.int32)
    with pytest.raises(ValueError, match=r"sequence length 17 exceeds max_position_embeddings=16; truncate"):
        Bert(cfg).apply({"params": params}, too_long, np.ones_like(too_long))


# ------------------------------------------------------------------------------------------------ quantized


def test_quantized_encoder_runs_unmodified_and_int8_is_closer_than_int3(tiny):
    cfg, params, tok, _ = tiny
    ids, mask = tok(TEXTS)
    enc = make_encoder(cfg)
    ref = np.asarray(enc(params, ids, mask))
    cos = {}
    for name, recipe in [("int8", jq.load_recipe("rtn_w8.yaml")),
                         ("int3", jq.QuantConfig.simple(jq.Scheme("int3", symmetric=False)))]:
        q = jq.quantize_params(params, recipe)
        kernels = [p for p, x in jq.leaf_paths(q) if isinstance(x, jq.QTensor)]
        assert len(kernels) == 6 * cfg.num_hidden_layers and all(p.endswith("kernel") for p in kernels)
        got = np.asarray(enc(q, ids, mask))
        # the QTensor kernels reach the matmuls: the same as running on the dequantized weights
        np.testing.assert_allclose(got, np.asarray(enc(jq.dequantize_params(q), ids, mask)), atol=1e-5)
        cos[name] = embed_eval.row_cosine(ref, got).mean()
    assert 0.999 < cos["int8"] < 1.0 and cos["int3"] < cos["int8"]
    assert 1 - cos["int3"] > 10 * (1 - cos["int8"])


# ------------------------------------------------------------------------------------------------ metrics


def test_metrics_on_identical_rotated_and_permuted_embeddings():
    rng = np.random.default_rng(0)
    e = rng.standard_normal((40, 16))
    same = embed_eval.fidelity(e, 3.0 * e)  # scale does not matter
    assert same == pytest.approx({"mean_cosine": 1.0, "min_cosine": 1.0, "spearman": 1.0, "top1_agreement": 1.0,
                                  "sentences": 40})
    rot, _ = np.linalg.qr(rng.standard_normal((16, 16)))
    turned = embed_eval.fidelity(e, e @ rot)  # a rotation moves every vector but keeps all pairwise similarities
    assert turned["mean_cosine"] < 0.5 and turned["spearman"] == pytest.approx(1.0)
    assert turned["top1_agreement"] == 1.0
    perm = np.roll(np.arange(40), 1)
    shuffled = embed_eval.fidelity(e, e[perm])
    assert shuffled["top1_agreement"] < 0.2 and abs(shuffled["spearman"]) < 0.3
    noisy = embed_eval.fidelity(e, e + 0.3 * rng.standard_normal(e.shape))
    assert 0.9 < noisy["mean_cosine"] < 1 and noisy["min_cosine"] < noisy["mean_cosine"] and noisy["spearman"] < 1


def test_rankdata_and_spearman_handle_ties():
    x = np.array([3.0, 1.0, 3.0, 2.0, 3.0])
    np.testing.assert_array_equal(embed_eval.rankdata(x), [4.0, 1.0, 4.0, 2.0, 4.0])
    assert embed_eval.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert embed_eval.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(1)
    a, b = rng.integers(0, 5, 50).astype(float), rng.integers(0, 5, 50).astype(float)
    assert embed_eval.spearman(a, b) == pytest.approx(stats.spearmanr(a, b).statistic, abs=1e-12)


def test_nearest_neighbours_skip_self_and_metric_errors():
    sim = np.array([[1.0, 0.2, 0.9], [0.2, 1.0, 0.5], [0.9, 0.5, 1.0]])
    assert embed_eval.nearest_neighbours(sim).tolist() == [2, 2, 0]
    with pytest.raises(ValueError, match=r"same shape, got \(3, 4\) and \(3, 5\)"):
        embed_eval.row_cosine(np.ones((3, 4)), np.ones((3, 5)))
    with pytest.raises(ValueError, match="at least 3 sentences"):
        embed_eval.fidelity(np.eye(2), np.eye(2))
    with pytest.raises(ValueError, match="row 1 is all zeros"):
        embed_eval.row_cosine(np.eye(3) * [[1], [0], [1]], np.eye(3))
    with pytest.raises(ValueError, match=r"non-finite embedding value at index \(0, 1\)"):
        embed_eval.pairwise_cosine(np.array([[1.0, np.nan], [0.0, 1.0]]))
    with pytest.raises(ValueError, match="constant"):
        embed_eval.spearman([1, 1, 1], [1, 2, 3])


def test_paired_difference_sees_a_consistent_small_gain_and_not_noise():
    rng = np.random.default_rng(2)
    base = rng.uniform(0.9, 1.0, 500)
    better = embed_eval.paired_difference(base + 0.001, base)  # tiny, but on every sentence
    assert better["mean_diff"] == pytest.approx(0.001) and better["ci_low"] > 0 and better["a_better"] == 1.0
    e = rng.normal(0, 0.01, 500)
    noise = embed_eval.paired_difference(base + e, base + e[::-1])  # differences of mean 0, half each way
    assert noise["ci_low"] < 0 < noise["ci_high"] and noise["a_better"] == noise["b_better"] == 0.5
    flags = embed_eval.paired_difference(np.array([1, 1, 0, 1]), np.array([1, 0, 0, 0]))
    assert flags["mean_diff"] == 0.5 and flags["a_better"] == 0.5 and flags["b_better"] == 0.0
    with pytest.raises(ValueError, match="equal length"):
        embed_eval.paired_difference(np.ones(3), np.ones(4))


def test_split_sentences_keeps_sentences_of_the_asked_length():
    text = "Chapter 1\n\n\nIt was a truth universally\nacknowledged.  Short one!  \"Was it not, my dear Anne?\" " \
           "said he.\n\nOne two three four five six seven eight nine ten."
    assert embed_eval.split_sentences(text, min_words=3, max_words=8) == [
        "It was a truth universally acknowledged.", "\"Was it not, my dear Anne?\""]
    assert embed_eval.split_sentences(text, min_words=10, max_words=10) == [
        "One two three four five six seven eight nine ten."]
    with pytest.raises(ValueError, match="min_words"):
        embed_eval.split_sentences(text, min_words=5, max_words=4)


# ------------------------------------------------------------------------------------------------ real model


@pytest.mark.slow
def test_minilm_paraphrases_unit_norm_and_int8_fidelity():
    from jq.models.bert.model import embed_texts
    from jq.models.io.hub import resolve_model

    directory = resolve_model("minilm-l6")
    cfg, params, tok = load_bert(directory)
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size) == (6, 384, 30522)
    enc = make_encoder(cfg)
    pair = ["A man is playing a guitar.", "Someone plays the guitar.", "The stock market fell sharply today."]
    e = np.asarray(enc(params, *tok(pair)))
    np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1.0, atol=1e-5)
    assert e[0] @ e[1] > 0.6 and e[0] @ e[1] > e[0] @ e[2] + 0.4
    sentences = embed_eval.split_sentences(PERSUASION.read_text(encoding="utf-8"))[:32]
    ref = embed_texts(enc, params, tok, sentences, batch_size=32)
    q = jq.quantize_params(params, jq.load_recipe("rtn_w8.yaml"))
    got = embed_texts(enc, q, tok, sentences, batch_size=32)
    assert embed_eval.fidelity(ref, got)["mean_cosine"] > 0.99
