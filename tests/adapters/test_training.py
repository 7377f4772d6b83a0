"""Adapter training on the tiny Llama: the sharded step equals the single-device step, the loss falls, the base's codes
stay bit-identical, a resume with other adapter shapes is refused naming the leaf, and `jq qat --lora / --qalora /
--peqa` run end to end (merged QA-LoRA output = trained adapters' output)."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jq
from jq import adapters as A
from jq import checkpoint
from jq import qat
from jq.apps import finetune
from jq.models.llama.config import LlamaConfig
from jq.models.llama.model import Llama, init_params
from jq.numbers.qtensor import QTensor
from jq.tree.paths import leaf_paths
from jq.numbers.scheme import Scheme

TINY = dataclasses.replace(LlamaConfig.tiny(vocab_size=64), n_layers=1)
SEQ, MICRO, ACCUM = 16, 8, 2


def _windows(n: int = 64) -> np.ndarray:
    rng = np.random.default_rng(3)
    start, step = rng.integers(0, 64, size=(n, 1)), rng.integers(1, 3, size=(n, 1))
    return ((start + step * np.arange(SEQ)) % 64).astype(np.int32)


@pytest.fixture(scope="module")
def setup():
    model = Llama(TINY)
    params = jax.jit(init_params, static_argnums=0)(TINY, jax.random.PRNGKey(0))
    base = jq.quantize_params(params, jq.QuantConfig.simple(Scheme("int4", group_size=16, symmetric=False)),
                              warn_unmatched=False)
    cfg = A.LoraConfig(rank=4, alpha=8)

    def loss_fn(ad, ids, base):
        logits = jq.interop.apply(model, {"params": A.combine(base, ad, cfg)}, ids)
        return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], ids[:, 1:]).mean()

    opt = optax.adam(1e-2)
    mesh = qat.make_mesh(data=2, fsdp=4)
    return {"model": model, "params": params, "base": base, "cfg": cfg, "opt": opt, "mesh": mesh,
            "adapters": A.init(base, cfg, jax.random.PRNGKey(1)),
            "step_mesh": qat.make_train_step(loss_fn, opt, mesh=mesh),
            "step_one": qat.make_train_step(loss_fn, opt, donate=False)}


def _run(step, state, base, n, mesh=None):
    batches = qat.WindowBatches(_windows(), MICRO, ACCUM)
    losses = []
    for _ in range(n):
        state, m = step(state, qat.shard_batch(next(batches), mesh), base)
        losses.append(float(m["loss"]))
    return state, losses


def test_sharded_adapter_step_equals_single_device_and_keeps_the_base(setup):
    mesh, base = setup["mesh"], setup["base"]
    codes = jax.tree_util.tree_map(np.asarray, base)
    qp = {"params": setup["adapters"], "quant": {}}
    s_mesh, l_mesh = _run(setup["step_mesh"], qat.init_train_state(qp, setup["opt"], mesh), qat.shard_tree(base, mesh),
                          6, mesh)
    s_one, l_one = _run(setup["step_one"], qat.init_train_state(qp, setup["opt"]), base, 6)
    np.testing.assert_allclose(l_mesh, l_one, rtol=1e-5)
    for a, b in zip(jax.tree_util.tree_leaves(s_mesh), jax.tree_util.tree_leaves(s_one)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
    assert l_one[-1] < l_one[0] - 0.1
    for a, b in zip(jax.tree_util.tree_leaves(base), jax.tree_util.tree_leaves(codes)):  # bit-identical base
        np.testing.assert_array_equal(np.asarray(a), b)
    assert A.count(s_one["params"]["params"]) == A.count(setup["adapters"]) < 0.2 * sum(
        x.size for x in jax.tree_util.tree_leaves(setup["params"]))


def test_resume_with_other_adapter_shapes_is_refused(setup, tmp_path):
    qp = {"params": setup["adapters"], "quant": {}}
    with qat.Checkpointer(tmp_path / "ck") as ck:
        ck.save(qat.init_train_state(qp, setup["opt"]))
    other = A.init(setup["base"], A.LoraConfig(rank=2), jax.random.PRNGKey(1))
    like = qat.init_train_state({"params": other, "quant": {}}, setup["opt"])
    with qat.Checkpointer(tmp_path / "ck") as ck, pytest.raises(ValueError, match=(
            r"params/params/.*/kernel/a is shape \(\d+, 4\) there but shape \(\d+, 2\) in this run")):
        ck.restore(like)


def _cli(tmp_path, *flags):
    recipe = tmp_path / "w4g16.yaml"
    recipe.write_text("name: w4g16\nrules:\n  - pattern: '.*kernel'\n    format: int4\n    symmetric: false\n"
                      "    group_size: 16\n")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("It is a truth universally acknowledged, that a single man in possession " * 40)
    argv = ["--model", "tiny", "--recipe", str(recipe), "--corpus", str(corpus), "--steps", "3", "--seq-len", "32",
            "--batch-size", "2", "--lr", "1e-2", "--no-progress", *flags]
    return argv


def test_cli_qlora_writes_base_and_adapters(tmp_path, capsys):
    assert finetune.main(_cli(tmp_path, "--lora", "2", "--lora-dropout", "0.1", "--out", str(tmp_path / "base"),
                              "--adapters-out", str(tmp_path / "ad"))) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["mode"] == "lora" and res["adapters"]["trainable_params"] > 0
    assert res["memory"]["train_state_bytes"] > 0 and res["memory"]["frozen_base_bytes"] > 0
    base, _ = checkpoint.load(tmp_path / "base")
    ad, cfg = A.io.load(tmp_path / "ad")
    assert cfg.rank == 2 and cfg.dropout == 0.1
    assert all(isinstance(x, QTensor) for p, x in leaf_paths(base) if p.endswith("proj/kernel"))
    assert float(sum(jnp.abs(x).sum() for x in jax.tree_util.tree_leaves(ad) if x.shape[0] == 2)) > 0  # b trained


def test_cli_qalora_writes_the_merged_integer_model(tmp_path, capsys):
    assert finetune.main(_cli(tmp_path, "--lora", "2", "--qalora", "--out", str(tmp_path / "merged"))) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["mode"] == "qalora"
    merged, _ = checkpoint.load(tmp_path / "merged")
    q = merged["layers_0"]["mlp"]["down_proj"]["kernel"]
    assert isinstance(q, QTensor) and q.zero.dtype == jnp.float32


def test_cli_peqa_and_loftq(tmp_path, capsys):
    assert finetune.main(_cli(tmp_path, "--peqa")) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["mode"] == "peqa" and res["adapters"]["trainable_params"] > 0
    for weighted in ((), ("--loftq-weighted", "--calib-samples", "4", "--calib-len", "16")):
        assert finetune.main(_cli(tmp_path, "--lora", "2", "--lora-init", "loftq", "--loftq-steps", "2",
                                  *weighted)) == 0
        res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        r = res["adapters"]["loftq_mean_relative_residual"]
        assert len(r) == 3 and r[1] < r[0] and res["adapters"]["loftq_weighted"] == bool(weighted)
    with pytest.raises(ValueError, match="needs --lora-init loftq"):
        finetune.main(_cli(tmp_path, "--lora", "2", "--loftq-weighted"))
    with pytest.raises(ValueError, match="pick one"):
        finetune.main(_cli(tmp_path, "--lora", "2", "--peqa"))
