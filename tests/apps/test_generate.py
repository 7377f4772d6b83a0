"""Decoding with a (quantized) KV cache: cache vs full forward, KV quantization, q/k rotation, the generation loop,
recipes with `kv_cache:`, and `jq generate` on a tiny GGUF model."""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jq
from jq.numbers import formats
from jq.numbers import kvcache
from jq.apps.cli import main as cli_main  # the test drives the CLI like a user; nothing in jq imports it
from jq.numbers.hadamard import Rotation
from jq.numbers.kvcache import KVCacheConfig
from jq.apps import pipeline
from jq.models.llama.config import LlamaConfig
from jq.apps.generate import check_lengths, generate, generate_timed
from jq.models.llama.model import cache_bytes_per_token, init_cache, init_params, make_decode, make_forward, qk_rotation
from jqtest.llama import tiny_cfg, tiny_checkpoint, write_gguf

REPO = Path(__file__).resolve().parents[2]
CFG = LlamaConfig.tiny()  # 2 layers, 4 query heads over 2 kv heads, head_dim 8, vocab 64


@pytest.fixture(scope="module")
def params():
    """Seed 5: a random model whose greedy continuations of `tokens[:, :6]` have a clear top-1 margin."""
    return jax.jit(functools.partial(init_params, CFG))(jax.random.key(5))


@pytest.fixture(scope="module")
def tokens():
    return jax.random.randint(jax.random.key(1), (2, 12), 0, CFG.vocab_size)


def hadamard_np(n: int) -> np.ndarray:
    """Sylvester Hadamard / sqrt(n), built here independently of jq."""
    h = np.array([[1.0]])
    while h.shape[0] < n:
        h = np.kron(np.array([[1.0, 1.0], [1.0, -1.0]]), h)
    return (h / np.sqrt(n)).astype(np.float32)


@functools.lru_cache(maxsize=None)
def forward(kv=None):
    """Jitted full-sequence forward of CFG (one per KV config, shared by the tests)."""
    return jax.jit(make_forward(CFG, kv_cache=kv))


@functools.lru_cache(maxsize=None)
def decode_fns(kv=None):
    prefill, step = make_decode(CFG, kv_cache=kv)
    return jax.jit(prefill), jax.jit(step)


def decode_logits(params, seq, prompt_len: int, kv=None, chunks: int = 1) -> np.ndarray:
    """Teacher-forced cached decoding of seq [B, L]: prefill of prompt_len tokens (in `chunks` equal pieces), then
    one decode step per remaining token. -> logits [B, L, V] (positions 0..L-1)."""
    prefill, step = decode_fns(kv)
    cache = init_cache(CFG, seq.shape[0], seq.shape[1], kv)
    out = []
    bounds = np.linspace(0, prompt_len, chunks + 1).astype(int)
    for a, b in zip(bounds[:-1], bounds[1:]):
        lg, cache = prefill(params, cache, seq[:, a:b], a)
        out.append(lg)
    for i in range(prompt_len, seq.shape[1]):
        lg, cache = step(params, cache, seq[:, i], i)
        out.append(lg[:, None])
    return np.asarray(jnp.concatenate(out, axis=1))


def rel_rms(a, ref) -> float:
    ref = np.asarray(ref)
    spread = np.sqrt(np.mean((ref - ref.mean(-1, keepdims=True)) ** 2))
    return float(np.sqrt(np.mean((np.asarray(a) - ref) ** 2)) / spread)


# ------------------------------------------------------------------------------------------- cache vs forward


def test_float_cache_decode_matches_full_forward_at_every_position(params, tokens):
    full = np.asarray(forward()(params, tokens))
    # prefill in two chunks (positions 0-2, then 3-5), then 6 decode steps
    np.testing.assert_allclose(decode_logits(params, tokens, 6, chunks=2), full, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kv", [KVCacheConfig("int4", group_size=4),
                                KVCacheConfig("int8", symmetric=True, rotate=True),
                                KVCacheConfig("int4", keys="channel", key_group=4),
                                KVCacheConfig("int4", keys="channel", key_group=8, rotate=True)],
                         ids=lambda k: k.describe())
def test_quantized_cache_decode_equals_fake_quant_forward(params, tokens, kv):
    """The full forward quantize-dequantizes k/v exactly as the cache stores them (prefill / perplexity == decode)."""
    fq = np.asarray(forward(kv)(params, tokens))
    np.testing.assert_allclose(decode_logits(params, tokens, 6, kv, chunks=2), fq, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kv", [KVCacheConfig("int8"), KVCacheConfig("int4"), KVCacheConfig("int4", symmetric=True),
                                KVCacheConfig("int8", group_size=4, scale_dtype="float32")], ids=lambda k: k.describe())
def test_cache_write_then_read_is_the_fake_quant_bit_for_bit(kv):
    x = jax.random.normal(jax.random.key(2), (2, 5, 3, 8)) * 3.0

    @jax.jit
    def run(x):
        cache = kvcache.empty_kv((2, 9, 3, 8), kv)
        cache = kvcache.write_kv(cache, x[:, :3], 0, kv)
        cache = kvcache.write_kv(cache, x[:, 3:], 3, kv)
        return kvcache.read_kv(cache, kv), kvcache.fake_quant_kv(x, kv)

    got, fq = run(x)
    np.testing.assert_array_equal(np.asarray(got[:, :5]), np.asarray(fq))
    np.testing.assert_array_equal(np.asarray(got[:, 5:]), 0.0)


# ------------------------------------------------------------------------------------------- KV quantization


@pytest.mark.parametrize("fmt,sym,group", [("int8", False, None), ("int4", False, None), ("int4", False, 4),
                                           ("int4", True, None), ("int8", True, 2)])
def test_kv_quantization_error_within_half_a_step_and_codes_in_range(fmt, sym, group):
    kv = KVCacheConfig(fmt, group_size=group, symmetric=sym, scale_dtype="float32")
    x = jax.random.normal(jax.random.key(3), (1, 7, 2, 8)) * 2.0 + 0.5
    q = jax.jit(lambda x: kvcache.quantize_kv(x, kv))(x)
    n = 8 // (group or 8)
    assert q["scale"].shape == (1, 7, 2, n) and ("zero" in q) == (not sym)
    assert q["codes"].shape == (1, 7, 2, 4 if fmt == "int4" else 8)
    step = np.repeat(np.asarray(q["scale"]), 8 // n, axis=-1)
    err = np.abs(np.asarray(jax.jit(lambda q: kvcache.dequantize_kv(q, kv))(q)) - np.asarray(x))
    assert np.all(err <= step / 2 * (1 + 1e-5) + 1e-6)
    codes = np.asarray(formats.unpack(q["codes"], 4, 8, signed=sym) if fmt == "int4" else q["codes"]).astype(int)
    bits = int(fmt[3:])
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if sym else (0, 2**bits - 1)
    assert codes.min() >= lo and codes.max() <= hi and codes.max() - codes.min() >= (2**bits) // 2


def test_int4_cache_packs_with_jq_formats_and_needs_a_head_dim_divisible_by_8():
    """One packing in the library: the cache's int4 codes are `formats.pack(codes, 4)`, low nibble first."""
    kv = KVCacheConfig("int4", symmetric=False, scale_dtype="float32")
    x = jax.random.normal(jax.random.key(4), (1, 3, 2, 16))
    q = kvcache.quantize_kv(x, kv)
    codes = formats.unpack(q["codes"], 4, 16)
    np.testing.assert_array_equal(np.asarray(formats.pack(codes, 4)), np.asarray(q["codes"]))
    np.testing.assert_array_equal(np.asarray(q["codes"][..., 0]), np.asarray(codes[..., 0] | (codes[..., 1] << 4)))
    with pytest.raises(ValueError, match="needs a head_dim divisible by 8, got 12; use int8"):
        kvcache.quantize_kv(jnp.ones((1, 1, 1, 12)), kv)


def test_int4_and_int8_logit_error_is_bounded(params, tokens):
    full = forward()(params, tokens)
    e8 = rel_rms(forward(KVCacheConfig("int8"))(params, tokens), full)
    e4 = rel_rms(forward(KVCacheConfig("int4"))(params, tokens), full)
    assert 0 < e8 < 0.02 and e8 < e4 < 0.25, (e8, e4)


def test_cache_memory_per_token():
    smol = LlamaConfig(vocab_size=49152, dim=576, n_layers=30, n_heads=9, n_kv_heads=3, hidden_dim=1536, head_dim=64)
    assert cache_bytes_per_token(smol, None, jnp.bfloat16) == 23040
    assert cache_bytes_per_token(smol, KVCacheConfig("int8")) == 2 * 30 * 3 * (64 + 2 + 1)
    assert cache_bytes_per_token(smol, KVCacheConfig("int4", group_size=64)) == 6300
    assert cache_bytes_per_token(smol, KVCacheConfig("int4", group_size=32, symmetric=True)) == 2 * 30 * 3 * (32 + 4)
    cache = init_cache(CFG, 1, 10, KVCacheConfig("int4", group_size=4))
    nbytes = sum(x.nbytes for x in jax.tree_util.tree_leaves(cache))
    assert nbytes == 10 * cache_bytes_per_token(CFG, KVCacheConfig("int4", group_size=4))


def test_kv_config_errors_name_the_value():
    with pytest.raises(ValueError, match="'int3'.*int8.*int4"):
        KVCacheConfig("int3")
    with pytest.raises(ValueError, match="group_size must be a positive integer"):
        KVCacheConfig("int8", group_size=0)
    with pytest.raises(ValueError, match="group_size 3 does not divide head_dim 8"):
        init_cache(CFG, 1, 4, KVCacheConfig("int8", group_size=3))
    with pytest.raises(ValueError, match="Hadamard"):
        qk_rotation(KVCacheConfig("int8", rotate=True), 6)


# -------------------------------------------------------------------------------------------------- rotation


def test_qk_rotation_leaves_float_attention_unchanged(params, tokens):
    full = np.asarray(forward()(params, tokens))
    for kv in (KVCacheConfig(None, rotate=True),                       # the plain Hadamard rotation
               KVCacheConfig(None, rotate="hadamard(seed=3)")):        # a randomized one (signs from a seed)
        np.testing.assert_allclose(np.asarray(forward(kv)(params, tokens)), full, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(decode_logits(params, tokens, 6, kv, chunks=2), full, rtol=1e-4, atol=1e-4)
    assert KVCacheConfig(None, rotate="hadamard(seed=3)").rotation == Rotation(seed=3)
    q4 = np.asarray(forward(KVCacheConfig("int4"))(params, tokens))
    q4r = np.asarray(forward(KVCacheConfig("int4", rotate=True))(params, tokens))
    assert np.abs(q4r - q4).max() > 1e-4  # with a quantized cache the rotation changes what is rounded (it is live)
    with pytest.raises(ValueError, match="kv_cache rotate"):
        KVCacheConfig("int8", rotate="had")


def test_hadamard_rotation_spreads_an_outlier_channel_of_the_keys():
    h = hadamard_np(64).astype(np.float32)
    k = np.array(jax.random.normal(jax.random.key(5), (1, 32, 2, 64)))
    k[..., 7] += 40.0  # one outlier channel, as in real keys
    fq = jax.jit(lambda x: kvcache.fake_quant_kv(x, KVCacheConfig("int4")))
    plain = np.abs(np.asarray(fq(k)) - k).mean()
    rot = np.abs(np.asarray(fq(k @ h)) @ h.T - k).mean()
    assert rot < 0.5 * plain, (rot, plain)


# ------------------------------------------------------------------------------------------------ generation


def test_int8_cache_greedy_tokens_equal_float_cache(params, tokens):
    """On a tiny random model whose greedy path has a clear margin: the int8 logit error along the float path is
    checked to be below half the top-1/top-2 margin (so equal tokens are implied), then the tokens compared."""
    prompt = tokens[:, :6]
    ref = np.asarray(generate(CFG, params, prompt, 6))
    assert ref.shape == (2, 6) and len(set(ref.ravel().tolist())) >= 3
    seq = jnp.concatenate([prompt, jnp.asarray(ref)], axis=1)
    lf = np.asarray(forward()(params, seq))[:, 5:-1]
    l8 = np.asarray(forward(KVCacheConfig("int8"))(params, seq))[:, 5:-1]  # == the int8 cache (tested above)
    np.testing.assert_array_equal(lf.argmax(-1), ref)
    top2 = np.sort(lf, axis=-1)[..., -2:]
    assert np.all(np.abs(l8 - lf).max(-1) < (top2[..., 1] - top2[..., 0]) / 2)
    np.testing.assert_array_equal(np.asarray(generate(CFG, params, prompt, 6, kv=KVCacheConfig("int8"))), ref)


def test_quantized_weights_generate_through_jq_ops(params, monkeypatch):
    recipe = jq.recipe_from_dict({"name": "w4", "rules": [{"pattern": ".*kernel", "format": "int4",
                                                           "symmetric": False, "group_size": 8}]})
    q = jq.quantize_params(params, recipe)
    assert isinstance(q["layers_0"]["attn"]["q_proj"]["kernel"], jq.QTensor)
    calls = []
    orig = jq.ops.qdot_general
    monkeypatch.setattr(jq.ops, "qdot_general", lambda *a, **k: calls.append(1) or orig(*a, **k))
    prompt = jnp.arange(5, dtype=jnp.int32)[None]
    r = generate_timed(CFG, q, prompt, 6, KVCacheConfig("int8"))
    assert len(calls) == 2 * 7 * CFG.n_layers  # traced once for prefill, once for the decode loop body
    assert r.tokens.shape == (1, 6) and r.prefill_seconds > 0 and r.decode_tokens_per_s > 0
    assert r.compile_seconds > 0 and r.cache_bytes_per_token == cache_bytes_per_token(CFG, KVCacheConfig("int8"))


def test_codebook_weights_generate_the_tokens_of_their_dequantized_model(params):
    recipe = jq.recipe_from_dict({"name": "cb", "rules": [{"pattern": ".*kernel", "method": "higgs",
                                                           "format": "cb4x2", "granularity": "channel"}]})
    q = jq.quantize_params(params, recipe)
    assert q["layers_0"]["mlp"]["down_proj"]["kernel"].fmt == "cb4x2"
    prompt = jnp.arange(5, dtype=jnp.int32)[None]
    got = generate_timed(CFG, q, prompt, 6, KVCacheConfig("int8")).tokens
    want = generate_timed(CFG, jq.dequantize_params(q), prompt, 6, KVCacheConfig("int8")).tokens
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_sampling_eos_and_batch(params, tokens):
    prompt = tokens[:, :6]
    greedy = np.asarray(generate(CFG, params, prompt, 6))
    # EOS = row 1's second token: row 1 stops there and is padded with EOS; row 0 goes on unless it also hits it
    eos = int(greedy[1, 1])
    out = np.asarray(generate(CFG, params, prompt, 6, eos_id=eos))
    stop = [int(np.argmax(r == eos)) if (r == eos).any() else 6 for r in greedy]
    assert out.shape == (2, min(6, max(stop) + 1))
    for r, s_ in enumerate(stop):
        np.testing.assert_array_equal(out[r, : s_ + 1], greedy[r, : s_ + 1])
        assert np.all(out[r, s_ + 1:] == eos)
    a = generate(CFG, params, prompt, 6, temperature=1.0, key=jax.random.key(1))
    b = generate(CFG, params, prompt, 6, temperature=1.0, key=jax.random.key(1))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert np.asarray(a).min() >= 0 and np.asarray(a).max() < CFG.vocab_size and np.any(np.asarray(a) != greedy)


def test_generation_length_errors():
    with pytest.raises(ValueError, match=r"max_new must be an integer >= 1.*got 0"):
        check_lengths(CFG, 4, 0)
    with pytest.raises(ValueError, match=r"prompt has 20 tokens, longer than max_len=10.*--max-len"):
        check_lengths(CFG, 20, 1, max_len=10)
    with pytest.raises(ValueError, match=r"prompt 8 \+ max_new 5 tokens need 12 cache rows.*max_len=10"):
        check_lengths(CFG, 8, 5, max_len=10)
    with pytest.raises(ValueError, match="max_seq_len=128"):
        check_lengths(CFG, 100, 40)
    assert check_lengths(CFG, 8, 5) == 12


# ---------------------------------------------------------------------------------------------------- recipes


def test_generate_on_params_sharded_over_an_explicit_mesh(params, tokens):
    """Params placed on a `jax.make_mesh` mesh (Explicit axes by default; `jq.checkpoint.load(mesh=...)` places
    them so too) with column-parallel kernels generate the same tokens as unsharded ones (the model's reshapes
    would otherwise demand an output sharding each)."""
    from jax.sharding import NamedSharding, PartitionSpec as P

    from jq.apps.generate import explicit_mesh

    q = jq.quantize_params(params, jq.load_recipe(REPO / "configs" / "rtn_w8.yaml"))
    mesh = jax.make_mesh((4,), ("model",), devices=jax.devices()[:4])
    assert mesh.axis_types == (jax.sharding.AxisType.Explicit,)

    def place(path, x):  # a kernel's codes and scales split along the output axis, the rest replicated
        split = "kernel" in jax.tree_util.keystr(path) and x.ndim == 2 and x.shape[-1] % 4 == 0
        return jax.device_put(x, NamedSharding(mesh, P(None, "model") if split else P()))

    placed = jax.tree_util.tree_map_with_path(place, q)
    assert placed["layers_0"]["mlp"]["up_proj"]["kernel"].codes.sharding.spec == P(None, "model")
    assert explicit_mesh(placed) is mesh and explicit_mesh(q) is None
    want = np.asarray(generate(CFG, q, tokens[:, :6], 5))
    np.testing.assert_array_equal(np.asarray(generate(CFG, placed, tokens[:, :6], 5)), want)
    np.testing.assert_array_equal(generate_timed(CFG, placed, tokens[:, :6], 5).tokens, want)


def test_kv_recipes_parse_and_stay_hashable():
    for name, fmt, group in (("kv8", "int8", None), ("kv4_g64", "int4", 64), ("rtn_w4_g128_kv4", "int4", 64)):
        r = jq.load_recipe(f"configs/{name}.yaml")
        assert (r.kv_cache.format, r.kv_cache.group_size, r.kv_cache.symmetric) == (fmt, group, False)
        assert len(r.rules) == (1 if name.startswith("rtn") else 0)
        hash(r)
    assert jq.load_recipe("configs/rtn_w4_g128.yaml").kv_cache is None


@pytest.mark.parametrize("kv,match", [
    ({"format": "int8", "bits": 8}, r"kv_cache: unknown field\(s\) \['bits'\]"),
    ({"group_size": 32}, "missing field 'format'"),
    ({"format": "fp8"}, "'fp8' is not supported"),
    ({"format": "int4", "rotate": "yes"}, "rotate must be true, false, 'hadamard' or 'hadamard\\(seed=N\\)', got 'yes'"),
    ("int8", "'kv_cache' must be a mapping"),
])
def test_bad_kv_cache_recipe_errors(kv, match):
    with pytest.raises(ValueError, match=match):
        jq.recipe_from_dict({"rules": [], "kv_cache": kv}, source="r.yaml")


def test_empty_rules_need_a_kv_cache():
    with pytest.raises(ValueError, match="only a recipe with a 'kv_cache' mapping may have rules"):
        jq.recipe_from_dict({"rules": []})
    assert jq.recipe_from_dict({"kv_cache": {"format": "int4"}}).rules == ()


# -------------------------------------------------------------------------------------------------------- CLI


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    d = tmp_path_factory.mktemp("gen")
    cfg = tiny_cfg(tie=True)
    write_gguf(d / "tiny.gguf", cfg, tiny_checkpoint(cfg))
    (d / "w4kv4.yaml").write_text("name: w4kv4\nrules:\n  - pattern: '.*kernel'\n    format: int4\n"
                                  "    symmetric: false\n    group_size: 16\nkv_cache:\n  format: int4\n"
                                  "  group_size: 4\n")
    (d / "kv4.yaml").write_text("name: kv4\nrules: []\nkv_cache:\n  format: int4\n")
    (d / "text.txt").write_text("the cat sat on the mat and the hat, " * 40)
    return d


def test_cli_generate_prints_text_and_tokens_per_second(tiny_gguf, capsys):
    model = str(tiny_gguf / "tiny.gguf")
    assert cli_main(["generate", "--model", model, "--prompt", "the cat", "--max-new", "6", "--recipe",
                     str(tiny_gguf / "w4kv4.yaml")]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) >= 2 and "prefill: " in out[-1] and "decode: " in out[-1] and "tok/s" in out[-1]
    assert "compile" in out[-1] and "weights: w4kv4" in out[-1] and "KV cache: int4 asym g4, 80 B/token, " in out[-1]
    assert "MB allocated" in out[-1]
    assert cli_main(["generate", "--model", model, "--prompt", "the cat", "--max-new", "6", "--kv", "int4",
                     "--kv-keys", "channel:32"]) == 0
    assert "KV cache: int4 asym keys per channel /32, " in capsys.readouterr().out.strip().splitlines()[-1]


def save_quantized(out, model: str, recipe_path) -> None:
    """What `jq quantize --out` writes (without its slow per-leaf report): jq.checkpoint, else jq.serialize."""
    import dataclasses

    m = pipeline.load(model)
    recipe = jq.load_recipe(recipe_path)
    q = jq.quantize_params(m.params, recipe)
    meta = {"model": m.source, "model_config": dataclasses.asdict(m.cfg)}
    try:
        from jq import checkpoint
    except ModuleNotFoundError:
        from jq import serialize

        serialize.save(out, q, meta)
    else:
        checkpoint.save(out, q, recipe=recipe, meta=meta)


def test_cli_generate_from_a_quantized_directory(tiny_gguf, capsys):
    model, out = str(tiny_gguf / "tiny.gguf"), str(tiny_gguf / "q")
    save_quantized(out, model, tiny_gguf / "w4kv4.yaml")
    assert cli_main(["generate", "--model", model, "--quantized", out, "--prompt", "the cat", "--max-new", "6",
                     "--json"]) == 0
    r = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert r["new_tokens"] <= 6 and r["recipe"] == out and isinstance(r["text"], str)
    assert r["kv_cache"] == "int4 asym g4"  # the KV cache of the recipe stored with the checkpoint
    assert r["decode_tokens_per_s"] is None or r["decode_tokens_per_s"] > 0


def test_cli_eval_with_a_kv_only_recipe(tiny_gguf, capsys):
    args = ["eval", "--model", str(tiny_gguf / "tiny.gguf"), "--text", str(tiny_gguf / "text.txt"), "--window", "32",
            "--windows", "2", "--json"]
    assert cli_main(args) == 0
    f = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert cli_main(args + ["--recipe", str(tiny_gguf / "kv4.yaml")]) == 0
    q = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert q["kv_cache"] == "int4 asym" and q["linear_bits_per_weight"] == 32.0
    assert np.isfinite(q["perplexity"]) and q["perplexity"] != f["perplexity"]


@pytest.mark.parametrize("extra,match", [
    (["--max-new", "0"], "--max-new must be >= 1, got 0"),
    (["--max-len", "2"], r"longer than max_len=2"),
    (["--recipe", "configs/kv8.yaml", "--quantized", "somewhere"], "--recipe and --quantized cannot be combined"),
    (["--kv-rotate"], "add --kv int8|int4"),
])
def test_cli_generate_bad_input_is_a_clear_error(tiny_gguf, capsys, extra, match):
    args = ["generate", "--model", str(tiny_gguf / "tiny.gguf"), "--prompt", "the cat sat on the mat"]
    assert cli_main(args + extra) == 2
    err = capsys.readouterr().err
    assert "jq generate: error:" in err
    assert re.search(match, err), err


# ------------------------------------------------------------------------------------------------------- slow


@pytest.mark.slow
def test_smollm2_int8_cache_greedy_tokens_equal_float():
    m = pipeline.load("smollm2-135m")
    ids = m.tokenizer.encode("The capital of France is Paris. The capital of Italy is")
    ref = np.asarray(generate(m.cfg, m.params, ids, 12))
    np.testing.assert_array_equal(np.asarray(generate(m.cfg, m.params, ids, 12, kv=KVCacheConfig("int8"))), ref)
