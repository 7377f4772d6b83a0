"""jq.apps.finetune (`jq qat`) on a tiny model: a smoke run to a converted checkpoint, distillation from the float
model with its evaluation curve, a start from a calibrated PTQ result (and resuming it without re-running the PTQ),
and a rotated QAT recipe trained from the rotated GPTQ result; bad flags refused by name."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest

import jq
from jq import checkpoint, qat
from jq.apps import finetune as script
from jq.apps import pipeline
from jq.apps.finetune_setup import training_model
from jq.models.llama.model import Llama
from jq.numbers.qtensor import QTensor


def test_finetune_script_smoke_on_a_tiny_model(tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("It is a truth universally acknowledged, that a single man in possession of a good fortune, "
                      "must be in want of a wife. " * 20)
    out = tmp_path / "q"
    rc = script.main(["--model", "tiny", "--steps", "2", "--seq-len", "32", "--batch-size", "8", "--corpus",
                      str(corpus), "--out", str(out), "--ckpt-dir", str(tmp_path / "ckpt"), "--no-progress"])
    assert rc == 0
    tree, meta = checkpoint.load(out)
    assert meta["recipe"]["name"] == "qat_w4_g128"
    assert isinstance(tree["layers_0"]["attn"]["q_proj"]["kernel"], QTensor)
    assert qat.Checkpointer(tmp_path / "ckpt").latest_step() == 2
    assert '"last_loss"' in capsys.readouterr().out


def test_finetune_script_distills_from_the_float_model(tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("Emma Woodhouse, handsome, clever, and rich, with a comfortable home and happy disposition. " * 20)
    common = ["--model", "tiny", "--steps", "2", "--seq-len", "32", "--batch-size", "4", "--corpus", str(corpus),
              "--no-progress"]
    assert script.main(common + ["--distill", "1", "--distill-temperature", "2", "--eval-windows", "2",
                                 "--eval-window", "16", "--eval-every", "1"]) == 0
    cap = capsys.readouterr()
    out = json.loads(cap.out.strip().splitlines()[-1])
    assert out["distill"] == {"alpha": 1.0, "temperature": 2.0} and out["first_loss"] > 0
    assert [p["step"] for p in out["curve"]] == [1] and out["curve"][0]["perplexity"] > 1  # step 2 is "eval"
    assert f"step 1: perplexity {out['curve'][0]['perplexity']:.3f} (2 × 16 tokens" in cap.err  # logged when measured
    assert out["eval"]["windows"] == 2
    with pytest.raises(ValueError, match="--eval-every 1 needs --eval-windows"):
        script.main(common + ["--eval-every", "1"])
    with pytest.raises(ValueError, match="with --float it would distill the float model from itself"):
        script.main(common + ["--distill", "1", "--float"])
    with pytest.raises(ValueError, match="--distill 2.0 must lie in"):
        script.main(common + ["--distill", "2"])
    with pytest.raises(ValueError, match="--distill-temperature -1.0 must be > 0"):
        script.main(common + ["--distill", "1", "--distill-temperature", "-1"])


def test_finetune_starts_from_a_calibrated_ptq_result(tmp_path, capsys):
    """--init-recipe: AWQ + GPTQ (act-order, static groups) on the corpus, then QAT on the same grid from it."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("Anne Elliot walked along the Cobb at Lyme, and Captain Wentworth followed her. " * 30)
    recipe = tmp_path / "qat.yaml"
    recipe.write_text("rules:\n  - pattern: '.*kernel'\n    method: qat\n    options: {lsq: true}\n"
                      "    format: int4\n    symmetric: false\n    group_size: 16\n")
    ptq = tmp_path / "ptq.yaml"
    ptq.write_text("name: awq_gptq_tiny\nrules:\n  - pattern: '.*kernel'\n    transforms: [awq]\n    method: gptq\n"
                   "    format: int4\n    symmetric: false\n    group_size: 16\n"
                   "    options: {act_order: true, static_groups: true}\n")
    rc = script.main(["--model", "tiny", "--steps", "1", "--seq-len", "32", "--batch-size", "4", "--corpus",
                      str(corpus), "--recipe", str(recipe), "--init-recipe", str(ptq), "--calib-samples", "4",
                      "--calib-len", "32", "--calib-seed", "5", "--calib-sampling", "stream", "--no-progress"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["init_recipe"]["name"] == "awq_gptq_tiny" and out["steps"] == 1
    assert out["init_recipe"]["calibration"] == {"files": [str(corpus)], "samples": 4, "length": 32, "seed": 5,
                                                 "sampling": "stream"}
    # resuming such a run restores the trained state and skips the PTQ (which would only be overwritten)
    ckpt = ["--ckpt-dir", str(tmp_path / "ckpt")]
    args = ["--model", "tiny", "--seq-len", "32", "--batch-size", "4", "--corpus", str(corpus), "--recipe",
            str(recipe), "--init-recipe", str(ptq), "--calib-samples", "4", "--calib-len", "32", "--no-progress"]
    assert script.main(args + ckpt + ["--steps", "1"]) == 0
    capsys.readouterr()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(script, "ptq_start", lambda *a: pytest.fail("PTQ ran on resume"))
        assert script.main(args + ckpt + ["--steps", "2", "--resume"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["init_recipe"] == {"name": "awq_gptq_tiny", "resumed_at_step": 1}
    assert qat.Checkpointer(tmp_path / "ckpt").latest_step() == 2
    bad = tmp_path / "bad.yaml"  # act-order with groups formed in the pass stores a permutation: refused by name
    bad.write_text(ptq.read_text().replace("static_groups: true", "static_groups: false"))
    common = ["--model", "tiny", "--steps", "1", "--seq-len", "32", "--batch-size", "4", "--corpus", str(corpus),
              "--recipe", str(recipe), "--calib-samples", "4", "--calib-len", "32", "--no-progress"]
    with pytest.raises(ValueError, match="layers_0/.*kernel: the PTQ weight is not on the QAT recipe's grid: perm"):
        script.main(common + ["--init-recipe", str(bad)])
    with pytest.raises(ValueError, match="--init-recipe starts QAT from a PTQ result; it has no meaning with --float"):
        script.main(common + ["--init-recipe", str(ptq), "--float"])
    rotated = tmp_path / "rotated.yaml"
    rotated.write_text("rotation: {seed: 1}\nrules:\n  - pattern: '.*kernel'\n    format: int4\n")
    with pytest.raises(ValueError, match=r"--init-recipe .*rotated\.yaml: its rotation section .* differs from the "
                                         r"QAT recipe's \(None\)"):
        script.main(common + ["--init-recipe", str(rotated)])


def test_finetune_trains_the_rotated_model_from_a_rotated_ptq_result(tmp_path, capsys):
    """A QAT recipe with a rotation section (QuaRot-style, down_proj in its online-Hadamard basis) trains the rotated
    model from the rotated GPTQ result: step 0 is the PTQ model, and the saved checkpoint is a rotated quantized
    model (its config, its rotated down_proj) that `jq eval` reads."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("Captain Wentworth wrote the letter while Anne spoke with Captain Harville by the window. " * 30)
    grid = "    format: int4\n    symmetric: false\n    group_size: 16\n    zero_point: float\n"
    qat_rules = ("rotation: {seed: 1}\nrules:\n  - pattern: '.*down_proj/kernel'\n    method: qat\n    rotate: hadamard\n"
                 f"    options: {{lsq: true}}\n{grid}  - pattern: '.*kernel'\n    method: qat\n    options: {{lsq: true}}\n{grid}")
    recipe = tmp_path / "qat_rot.yaml"
    recipe.write_text(qat_rules)
    ptq = tmp_path / "ptq_rot.yaml"
    ptq.write_text("name: quarot_gptq_tiny\n" + qat_rules.replace("method: qat", "method: gptq").replace(
        "{lsq: true}", "{refit: true}"))
    out_dir = tmp_path / "q"
    common = ["--model", "tiny", "--seq-len", "32", "--batch-size", "4", "--corpus", str(corpus), "--recipe",
              str(recipe), "--calib-samples", "4", "--calib-len", "32", "--eval-windows", "2", "--eval-window", "16",
              "--no-progress"]
    assert script.main(common + ["--steps", "0", "--init-recipe", str(ptq), "--out", str(out_dir)]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["eval"]["perplexity"] == pytest.approx(out["init_recipe"]["eval"]["perplexity"], rel=1e-5)
    tree, meta = checkpoint.load(out_dir)
    assert meta["meta"]["model_config"]["tie_embeddings"] is False  # the rotated model unties the head
    assert str(tree["layers_0"]["mlp"]["down_proj"]["kernel"].policy.rotation) == "hadamard"
    assert tree["layers_0"]["mlp"]["up_proj"]["kernel"].policy.rotation is None
    # the float model rotated by the same section computes the same function as the unrotated one
    m = training_model("tiny", 0)
    mcfg, params = m.cfg, m.params
    rot = pipeline.rotated(m, jq.load_recipe(recipe))
    ids = jnp.arange(16, dtype=jnp.int32)[None] * 7 % 256
    np.testing.assert_allclose(np.asarray(Llama(rot.cfg).apply({"params": rot.params}, ids)),
                               np.asarray(Llama(mcfg).apply({"params": params}, ids)), rtol=1e-4, atol=1e-4)
    assert script.main(common + ["--steps", "2", "--init-recipe", str(ptq)]) == 0  # and it trains
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["last_loss"] > 0
    other = tmp_path / "ptq_rot2.yaml"
    other.write_text(ptq.read_text().replace("seed: 1", "seed: 2"))
    with pytest.raises(ValueError, match=r"ptq_rot2\.yaml: its rotation section .*seed=2.* differs from the QAT "
                                         r"recipe's .*seed=1"):
        script.main(common + ["--steps", "1", "--init-recipe", str(other)])
