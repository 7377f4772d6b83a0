"""The Flax Llama against a plain-NumPy reference, and the GGUF / Hugging Face loaders against each other."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q

from jq.models.llama.config import LlamaConfig
from jq.models.io.gguf import load_gguf
from jq.models.io.safetensors import load_hf
from jq.models import load_model, resolve_model
from jq.models.llama.model import init_params, make_forward
from jq.models.io.tokenizer import Tokenizer

from jqtest.llama import (np_forward, TOKENS, tiny_cfg, llama_cpp_permute, tiny_checkpoint, write_gguf, write_hf, flat, TOKENS_IN)

# --------------------------------------------------------------------------------------------------------- model


def test_param_paths_match_the_documented_names():
    for tie in (True, False):
        paths = set(flat(init_params(tiny_cfg(tie), jax.random.key(0))))
        expected = {"embed/embedding", "final_norm/scale"} | ({"lm_head/kernel"} if not tie else set())
        for i in range(2):
            expected |= {f"layers_{i}/input_norm/scale", f"layers_{i}/post_attn_norm/scale"}
            expected |= {f"layers_{i}/attn/{p}/kernel" for p in ("q_proj", "k_proj", "v_proj", "o_proj")}
            expected |= {f"layers_{i}/mlp/{p}/kernel" for p in ("gate_proj", "up_proj", "down_proj")}
        assert paths == expected


@pytest.mark.parametrize("tie", [True, False])
def test_flax_forward_matches_numpy_reference(tie):
    cfg = tiny_cfg(tie)
    ckpt = tiny_checkpoint(cfg, seed=1)
    hf = {h: w for _, h, _, w in ckpt}
    params = {}
    from jq.models.llama.weights import hf_tensor
    from jq.tree.paths import set_path

    for name, w in hf.items():
        m = hf_tensor(name, cfg)
        set_path(params, m.path, m.apply(w))
    logits = np.asarray(jax.jit(make_forward(cfg))(params, jnp.asarray(TOKENS_IN[None])))[0]
    ref = np_forward(cfg, {k: v.astype(np.float64) for k, v in hf.items()}, TOKENS_IN)
    assert logits.shape == (len(TOKENS_IN), cfg.vocab_size) and logits.dtype == np.float32
    np.testing.assert_allclose(logits, ref, rtol=1e-4, atol=1e-4)


def test_causal_mask_future_tokens_do_not_change_earlier_logits():
    cfg = tiny_cfg(True)
    params = init_params(cfg, jax.random.key(3))
    fwd = jax.jit(make_forward(cfg))
    a = TOKENS_IN[None]
    b = a.copy()
    b[0, 7:] = (b[0, 7:] + 11) % cfg.vocab_size
    la, lb = np.asarray(fwd(params, jnp.asarray(a))), np.asarray(fwd(params, jnp.asarray(b)))
    np.testing.assert_array_equal(la[:, :7], lb[:, :7])
    assert np.abs(la[:, 7:] - lb[:, 7:]).max() > 1e-3


def test_bfloat16_compute_stays_close_to_fp32():
    cfg = tiny_cfg(True)
    params = init_params(cfg, jax.random.key(4))
    ids = jnp.asarray(TOKENS_IN[None])
    l32 = np.asarray(make_forward(cfg)(params, ids))
    l16 = make_forward(cfg, jnp.bfloat16)(params, ids)
    assert l16.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(l16), l32, atol=0.1 * np.abs(l32).max())


def test_config_rejects_bad_gqa():
    with pytest.raises(ValueError, match="multiple of n_kv_heads"):
        LlamaConfig(vocab_size=8, dim=24, n_layers=1, n_heads=3, n_kv_heads=2, hidden_dim=8, head_dim=8)


# ------------------------------------------------------------------------------------------------------ loaders


@pytest.mark.parametrize("tie", [True, False])
def test_gguf_and_hf_loaders_agree_and_match_reference(tmp_path, tie):
    cfg = tiny_cfg(tie)
    ckpt = tiny_checkpoint(cfg, seed=2)
    write_gguf(tmp_path / "m.gguf", cfg, ckpt)
    write_hf(tmp_path / "hf", cfg, ckpt)
    g, h = load_gguf(tmp_path / "m.gguf"), load_hf(tmp_path / "hf")
    gcfg, gparams, hcfg, hparams = g.cfg, g.params, h.cfg, h.params
    assert gcfg == hcfg == cfg and h.tokenizer is None and g.family.name == h.family.name == "llama"
    gflat, hflat = flat(gparams), flat(hparams)
    assert gflat.keys() == hflat.keys()
    for k in gflat:
        assert gflat[k].dtype == np.float32
        np.testing.assert_array_equal(gflat[k], hflat[k], err_msg=k)
    fwd = jax.jit(make_forward(cfg))
    ids = jnp.asarray(TOKENS_IN[None])
    np.testing.assert_array_equal(np.asarray(fwd(gparams, ids)), np.asarray(fwd(hparams, ids)))
    # The GGUF q/k rows really are llama.cpp's interleaved layout: an interleaved-RoPE reference on the raw
    # (permuted) weights gives the same logits as the rotate-half reference on the HF weights.
    hf = {h: w.astype(np.float64) for _, h, _, w in ckpt}
    permuted = {k: (llama_cpp_permute(v, cfg.n_heads) if "q_proj" in k else
                    llama_cpp_permute(v, cfg.n_kv_heads) if "k_proj" in k else v) for k, v in hf.items()}
    np.testing.assert_allclose(np_forward(cfg, permuted, TOKENS_IN, interleaved=True),
                               np_forward(cfg, hf, TOKENS_IN), rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(np.asarray(fwd(gparams, ids))[0], np_forward(cfg, hf, TOKENS_IN), rtol=1e-4, atol=1e-4)


def test_hf_loader_bf16_sharded(tmp_path):
    cfg = tiny_cfg(False)
    ckpt = tiny_checkpoint(cfg, seed=5)
    write_hf(tmp_path / "a", cfg, ckpt, shards=3, dtype=ml_dtypes.bfloat16)
    params = load_hf(tmp_path / "a").params
    got = flat(params)
    assert got["layers_1/attn/q_proj/kernel"].dtype == np.float32
    w = dict((h, w) for _, h, _, w in ckpt)["model.layers.1.self_attn.q_proj.weight"]
    np.testing.assert_array_equal(got["layers_1/attn/q_proj/kernel"], w.astype(ml_dtypes.bfloat16).astype(np.float32).T)


def test_hf_loader_errors_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_hf(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": 8, "hidden_size": 16,
                                                      "num_hidden_layers": 1, "num_attention_heads": 2,
                                                      "intermediate_size": 8}))
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        load_hf(tmp_path)


def test_unsupported_gguf_tensor_type_names_the_tensor(tmp_path):
    cfg = tiny_cfg(True)
    # F64 is a GGUF type the gguf package cannot dequantize (K-quants, i-quants and legacy quants it can)
    write_gguf(tmp_path / "m.gguf", cfg, tiny_checkpoint(cfg), override={"blk.1.ffn_up.weight": Q.F64})
    with pytest.raises(ValueError, match=r"blk\.1\.ffn_up\.weight.*F64.*Q8_0.*Q4_K"):
        load_gguf(tmp_path / "m.gguf")


def test_truncated_or_foreign_gguf_names_the_file_and_the_missing_bytes(tmp_path):
    cfg = tiny_cfg(True)
    full = tmp_path / "m.gguf"
    write_gguf(full, cfg, tiny_checkpoint(cfg))
    data = full.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: len(data) - 100])  # the tensor data ends early
    with pytest.raises(ValueError, match=rf"cut\.gguf: truncated GGUF file: its tensor table needs {len(data):,} "
                                         rf"bytes .*, found {len(data) - 100:,}"):
        load_gguf(cut)
    head = tmp_path / "head.gguf"
    head.write_bytes(data[:600])  # cut inside the metadata
    with pytest.raises(ValueError, match=r"head\.gguf: damaged or truncated GGUF file: its header .* does not parse "
                                         r"within its 600 bytes"):
        load_gguf(head)
    other = tmp_path / "other.gguf"
    other.write_bytes(b"PK\x03\x04" + data[4:])
    with pytest.raises(ValueError, match=r"other\.gguf: not a GGUF file \(it starts with b'PK"):
        load_gguf(other)


def test_unknown_gguf_architecture(tmp_path):
    cfg = tiny_cfg(True)
    write_gguf(tmp_path / "m.gguf", cfg, tiny_checkpoint(cfg), arch="gpt2")
    with pytest.raises(ValueError, match="architecture 'gpt2'"):
        load_gguf(tmp_path / "m.gguf")


def test_load_model_dispatches_on_file_or_directory(tmp_path):
    cfg = tiny_cfg(True)
    ckpt = tiny_checkpoint(cfg)
    write_gguf(tmp_path / "m.gguf", cfg, ckpt)
    write_hf(tmp_path / "hf", cfg, ckpt)
    assert resolve_model(tmp_path / "m.gguf") == tmp_path / "m.gguf"
    assert load_model(str(tmp_path / "m.gguf")).cfg == load_model(tmp_path / "hf").cfg == cfg
    with pytest.raises(ValueError, match="smollm2-135m"):
        resolve_model("no-such-model")


# ---------------------------------------------------------------------------------------------------- tokenizer


def gguf_tokenizer(tmp_path, **kw) -> Tokenizer:
    cfg = tiny_cfg(True)
    write_gguf(tmp_path / "t.gguf", cfg, tiny_checkpoint(cfg), **kw)
    return load_gguf(tmp_path / "t.gguf").tokenizer


def pieces(tok: Tokenizer, text: str) -> list[str]:
    return [tok.backend.id_to_token(i) for i in tok.encode(text)]


def test_gguf_tokenizer_bpe_specials_and_round_trip(tmp_path):
    tok = gguf_tokenizer(tmp_path)
    assert (tok.bos_id, tok.eos_id) == (1, 2)
    assert pieces(tok, "the cat") == ["t", "he", "Ġcat"]
    assert pieces(tok, "x 12") == ["x", "Ġ", "12"]
    ids = tok.encode("<|im_start|>the cat<|im_end|>")
    assert ids[0] == 1 and ids[-1] == 2
    for text in ["the cat sat on 12 mats.\n\n  Ünïcödé ✓", "<|im_start|>user\nhi<|im_end|>"]:
        assert tok.decode(tok.encode(text)) == text


def test_gguf_tokenizer_smollm_splits_digits_and_bos(tmp_path):
    tok = gguf_tokenizer(tmp_path, pre="smollm", add_bos=True)
    assert pieces(tok, "x 12") == ["<|im_start|>", "x", "Ġ", "1", "2"]
    assert tok.encode("x", add_special_tokens=False) == [TOKENS.index("x")]


def test_gguf_tokenizer_unknown_pre_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="'qwen2'"):
        gguf_tokenizer(tmp_path, pre="qwen2")


def test_tokenizer_json_round_trip(tmp_path):
    tok = gguf_tokenizer(tmp_path, pre="smollm")
    tok.backend.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<|im_start|>",
                                                                "eos_token": {"content": "<|im_end|>"}}))
    again = Tokenizer.from_file(tmp_path / "tokenizer.json")
    assert (again.bos_id, again.eos_id) == (1, 2)
    text = "<|im_start|>the 123 cat"
    assert again.encode(text) == tok.encode(text)
