"""Model families are plug-ins: a toy family defined entirely in this file — config, linen module, GGUF names,
calibration blocks — registered with one call, then loaded, evaluated, quantized (RTN and calibrated GPTQ),
converted and refused where it lacks a capability, through the same commands the Llama family uses."""

from __future__ import annotations

import dataclasses
import json

import flax.linen as nn
import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jq
from jq.apps.cli import main as cli_main
from jq.calibration.sequential import BlockSpec
from jq.models import family as registry
from jq.models.family import ModelFamily, TensorMap, register_family
from jqtest.llama import MERGES, SPECIALS, TOKENS

# ------------------------------------------------------------------------------- the toy family, complete


@dataclasses.dataclass(frozen=True)
class ToyConfig:
    vocab_size: int
    dim: int
    n_layers: int
    max_seq_len: int = 64


class ToyBlock(nn.Module):
    cfg: ToyConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        h = nn.gelu(nn.Dense(2 * self.cfg.dim, use_bias=False, dtype=self.dtype, name="up")(x))
        return x + nn.Dense(self.cfg.dim, use_bias=False, dtype=self.dtype, name="down")(h)


class ToyLM(nn.Module):
    cfg: ToyConfig
    dtype: jnp.dtype = jnp.float32
    kv_cache: object = None

    @nn.compact
    def __call__(self, tokens):
        x = nn.Embed(self.cfg.vocab_size, self.cfg.dim, name="embed")(tokens).astype(self.dtype)
        for i in range(self.cfg.n_layers):
            x = ToyBlock(self.cfg, self.dtype, name=f"layers_{i}")(x)
        return nn.Dense(self.cfg.vocab_size, use_bias=False, name="head")(x).astype(jnp.float32)


def toy_shapes(c: ToyConfig) -> dict[str, tuple[int, ...]]:
    shapes = {"embed/embedding": (c.vocab_size, c.dim), "head/kernel": (c.dim, c.vocab_size)}
    for i in range(c.n_layers):
        shapes |= {f"layers_{i}/up/kernel": (c.dim, 2 * c.dim), f"layers_{i}/down/kernel": (2 * c.dim, c.dim)}
    return shapes


def toy_gguf_tensor(name: str, c: ToyConfig) -> TensorMap:
    parts = name.split(".")
    if name == "token_embd.weight":
        return TensorMap("embed/embedding")
    if name == "output.weight":
        return TensorMap("head/kernel", transpose=True)
    if len(parts) == 4 and parts[0] == "blk" and parts[2] in ("ffn_up", "ffn_down"):
        return TensorMap(f"layers_{parts[1]}/{parts[2][4:]}/kernel", transpose=True)
    raise ValueError(f"unexpected GGUF tensor {name!r} for a toylm model")


def toy_blocks(c: ToyConfig, dtype=jnp.float32) -> BlockSpec:
    return BlockSpec(module=ToyBlock(c, dtype), names=tuple(f"layers_{i}" for i in range(c.n_layers)),
                     embed=lambda params, tokens: jnp.take(jnp.asarray(params["embed"]["embedding"]), tokens, axis=0),
                     stages=(("up/kernel",), ("down/kernel",)))


TOY = ModelFamily(
    name="toylm", config_type=ToyConfig, module=ToyLM, expected_shapes=toy_shapes, gguf_architectures=("toylm",),
    config_from_gguf=lambda meta, names: ToyConfig(len(meta["tokenizer.ggml.tokens"]),
                                                   int(meta["toylm.embedding_length"]), int(meta["toylm.block_count"])),
    gguf_tensor=toy_gguf_tensor, block_spec=toy_blocks)


# ---------------------------------------------------------------------------------------------------- tests


@pytest.fixture
def toy(tmp_path):
    register_family(TOY)  # the one registration line
    cfg = ToyConfig(len(TOKENS), 32, 2)
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(str(tmp_path / "toy.gguf"), "toylm")
    w.add_block_count(cfg.n_layers)
    w.add_embedding_length(cfg.dim)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(TOKENS)
    w.add_token_types([3 if t in SPECIALS else 1 for t in TOKENS])
    w.add_token_merges(MERGES)
    w.add_eos_token_id(0)
    w.add_tensor("token_embd.weight", rng.normal(0, 0.5, (cfg.vocab_size, cfg.dim)).astype(np.float32))
    for i in range(cfg.n_layers):
        w.add_tensor(f"blk.{i}.ffn_up.weight", rng.normal(0, 0.2, (2 * cfg.dim, cfg.dim)).astype(np.float32))
        w.add_tensor(f"blk.{i}.ffn_down.weight", rng.normal(0, 0.2, (cfg.dim, 2 * cfg.dim)).astype(np.float32))
    w.add_tensor("output.weight", rng.normal(0, 0.2, (cfg.vocab_size, cfg.dim)).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    text = tmp_path / "text.txt"
    text.write_text("the cat sat on the mat, 12 cats at the hat. " * 80)
    yield tmp_path / "toy.gguf", text
    registry._FAMILIES.pop("toylm")


def test_a_toy_family_loads_evaluates_quantizes_and_converts_through_the_commands(toy, tmp_path, capsys):
    model, text = toy
    m = jq.models.load_model(model)
    assert m.family is TOY and m.cfg == ToyConfig(len(TOKENS), 32, 2)
    assert m.params["layers_1"]["up"]["kernel"].shape == (32, 64) and m.tokenizer.encode("the cat")
    base = ["eval", "--model", str(model), "--text", str(text), "--window", "32", "--windows", "4", "--json"]
    assert cli_main(base) == 0
    float_ppl = json.loads(capsys.readouterr().out)["perplexity"]
    w8 = tmp_path / "w8.yaml"
    w8.write_text("name: w8\nrules:\n  - pattern: '.*kernel'\n    format: int8\n")
    assert cli_main(base + ["--recipe", str(w8)]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["family"] == "toylm" and abs(r["perplexity"] / float_ppl - 1) < 0.02 and r["linear_bits_per_weight"] < 9
    gptq = tmp_path / "gptq.yaml"
    gptq.write_text("name: g\nrules:\n  - pattern: '.*(up|down)/kernel'\n    method: gptq\n    format: int4\n"
                    "    symmetric: false\n    group_size: 16\n")
    calib = ["--calib", str(text), "--calib-samples", "4", "--calib-len", "32"]
    assert cli_main(base + ["--recipe", str(gptq)] + calib) == 0  # calibrated, block by block, from its BlockSpec
    assert np.isfinite(json.loads(capsys.readouterr().out)["perplexity"])
    assert cli_main(["convert", "--in", str(model), "--recipe", str(w8), "--out", str(tmp_path / "c")]) == 0
    capsys.readouterr()
    meta = jq.checkpoint.read_meta(tmp_path / "c")
    assert meta["meta"]["model_family"] == "toylm" and meta["meta"]["model_config"]["dim"] == 32
    # what the family does not declare is refused by name, not by a traceback
    assert cli_main(["generate", "--model", str(model), "--prompt", "the cat", "--max-new", "2"]) == 2
    assert "model family 'toylm' has no make_decode, which generation with a KV cache needs" in capsys.readouterr().err
    rot = tmp_path / "rot.yaml"
    rot.write_text("name: rot\nrotation: {seed: 0}\nrules:\n  - pattern: '.*kernel'\n    format: int8\n")
    assert cli_main(base + ["--recipe", str(rot)]) == 2
    assert "model family 'toylm' has no rotate" in capsys.readouterr().err


def test_the_registry_refuses_clashes_and_names_what_it_knows(toy):
    with pytest.raises(ValueError, match="model family 'toylm' is already registered"):
        register_family(TOY)
    with pytest.raises(ValueError, match=r"claims \['toylm'\], which family 'toylm' already has"):
        register_family(dataclasses.replace(TOY, name="other", config_type=dict))
    with pytest.raises(ValueError, match=r"unsupported GGUF architecture 'gpt9': jq reads \[.*'llama'.*'toylm'\]"):
        registry.family_for_gguf("gpt9")
    with pytest.raises(ValueError, match=r"unsupported Hugging Face model_type \(in config.json\) 'qwen9'"):
        registry.family_for_hf("qwen9")
    assert registry.family_of(ToyConfig(4, 4, 1)) is TOY and registry.get_family("llama").causal_lm
    with pytest.raises(ValueError, match="ToyBlock is the config of no registered model family"):
        registry.family_of(ToyBlock(ToyConfig(4, 4, 1)))


def test_a_family_module_runs_quantized_without_changes(toy):
    m = jq.models.load_model(toy[0])
    q = jq.quantize_params(m.params, jq.load_recipe("rtn_w8"))
    ids = jnp.asarray([m.tokenizer.encode("the cat sat on the mat")])
    model = m.family.module(m.cfg)
    got = jax.jit(lambda p, x: jq.apply(model, {"params": p}, x))(q, ids)
    want = model.apply({"params": jq.dequantize_params(q)}, ids)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-4)
