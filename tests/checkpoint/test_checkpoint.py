"""The Orbax checkpoint format (jq.checkpoint): exact round trips, sharded restore, streaming conversion from Orbax /
Hugging Face / GGUF sources, interrupted writes, and clear refusals of bad input."""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint.experimental.v1 as ocp
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jq
from jq import checkpoint as ck
from jq.apps.convert import convert
from jq.checkpoint import writer
from jq.checkpoint.format import sealed
from jq.tree.recipe import recipe_from_dict, recipe_to_dict
from jqtest.checkpoints import _leftovers, _same
from jqtest.llama import tiny_cfg, tiny_checkpoint, write_gguf, write_hf

W4 = {"name": "w4", "rules": [{"pattern": ".*kernel", "format": "int4", "symmetric": False, "group_size": 16}]}


def _params():
    k1, k2, k3 = jax.random.split(jax.random.key(1), 3)
    w = jax.random.normal(k1, (64, 24), jnp.float32)
    return {"a": {"kernel": w, "bias": jnp.arange(24, dtype=jnp.bfloat16)},
            "b": {"kernel": w[:32] * 3}, "c": {"kernel": w.T},
            "d": {"kernel": jax.random.normal(k2, (32, 48), jnp.float32)},
            "e": {"kernel": jax.random.normal(k3, (4, 8, 16), jnp.float32)},
            "f": {"kernel": w[:48], "count": jnp.int32(7)}}


def _cfg() -> jq.QuantConfig:
    return jq.QuantConfig(name="mixed", rules=(
        jq.Rule("a/kernel", jq.Scheme("int3", symmetric=False, group_size=16)),
        jq.Rule("b/kernel", jq.Scheme("fp8_e4m3", scale_dtype="bfloat16", act="int8")),
        jq.Rule("c/kernel", jq.Scheme("nf4", group_size=16, pad=True, restricted=False)),
        jq.Rule("d/kernel", jq.Scheme("int4", group_size=16, flat_groups=True, act="int4", act_clip="gaussian")),
        jq.Rule("e/kernel", jq.Scheme("int8", granularity="tensor", axes=(0, 1))),
        jq.Rule("f/kernel", jq.Scheme("int4", symmetric=False, group_size=16, scale_dtype="float32")),
    ))


def _quantized():
    params = _params()
    q = jq.quantize_params(params, _cfg())
    # every optional field: an act-order permutation and a rotation name
    f = q["f"]["kernel"]
    q["f"]["kernel"] = dataclasses.replace(f, perm=jnp.arange(f.shape[0], dtype=jnp.int32)[::-1],
                                           policy=jq.numbers.qtensor.ExecPolicy("hadamard(seed=3)", "int8", 0.9, 6.0))
    return params, q


# ----------------------------------------------------------------------------------------------- round trips


def test_save_load_round_trip_is_bit_exact_with_recipe_and_meta(tmp_path):
    params, q = _quantized()
    out = ck.save(tmp_path / "q", q, recipe=_cfg(), meta={"note": "x"})
    back, meta = ck.load(out)
    _same(q, back)
    assert isinstance(back["a"]["kernel"].codes, jax.Array)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                 jq.dequantize_params(back), jq.dequantize_params(q))
    assert meta["format"] == ck.FORMAT and meta["format_version"] == ck.FORMAT_VERSION
    assert meta["jq_version"] == jq.__version__ and meta["meta"] == {"note": "x"}
    assert recipe_from_dict(meta["recipe"]) == _cfg()
    assert meta["paths"] == [p for p, _ in jq.leaf_paths(q)]
    assert meta["leaves"]["d/kernel"]["layout"]["flat"] is True
    assert ck.read_meta(out) == meta
    # a plain Orbax reader sees the documented layout: one checkpoint per leaf, a QTensor {codes, scale, zero[, perm]}
    raw = ocp.load(out / "arrays" / meta["leaves"]["f/kernel"]["item"])
    assert set(raw) == {"codes", "scale", "zero", "perm"}
    np.testing.assert_array_equal(raw["codes"], np.asarray(q["f"]["kernel"].codes))
    raw = ocp.load(out / "arrays" / meta["leaves"]["a/bias"]["item"])
    np.testing.assert_array_equal(raw["value"], np.asarray(params["a"]["bias"]))
    assert meta["leaves"]["a/bias"]["item"] == "00000-a.bias"
    assert _leftovers(tmp_path, "q") == ["q"]  # no staging directory or lock left behind


def test_float_orbax_checkpoint_converts_to_what_quantize_params_gives(tmp_path):
    params = {"params": {"layers": [{"kernel": jax.random.normal(jax.random.key(2), (64, 32))},
                                    {"kernel": jax.random.normal(jax.random.key(3), (32, 64))}],
                         "norm": {"scale": jnp.ones((32,), jnp.bfloat16)}}}
    ocp.save(tmp_path / "float", params)  # a plain float Orbax checkpoint, as training writes it
    out = convert(tmp_path / "float", W4, tmp_path / "q", progress=False)
    got, meta = ck.load(out, target=jq.quantize_params(params, recipe_from_dict(W4)))
    _same(jq.quantize_params(params, recipe_from_dict(W4)), got)  # the target's structure (the list) comes back
    assert meta["meta"]["source_format"] == "orbax" and meta["recipe"]["name"] == "w4"
    # back to float: a plain Orbax checkpoint equal to dequantize_params, readable without jq
    fl = convert(out, None, tmp_path / "deq", dequantize=True, progress=False)
    want = jq.dequantize_params(got)
    item = ck.read_meta(fl)["leaves"]["params/layers/1/kernel"]["item"]
    raw = ocp.load(fl / "arrays" / item)["value"]
    np.testing.assert_array_equal(raw, np.asarray(want["params"]["layers"][1]["kernel"]))
    assert ck.verify(fl)["quantized"] == 0
    # fake quantization from the float source gives the same floats
    fake, _ = ck.load(convert(tmp_path / "float", W4, tmp_path / "fake", dequantize=True, progress=False))
    np.testing.assert_array_equal(np.asarray(fake["params"]["layers"]["0"]["kernel"]),
                                  np.asarray(want["params"]["layers"][0]["kernel"]))


@pytest.mark.parametrize("kind", ["gguf", "hf"])
def test_gguf_and_hf_sources_stream_to_the_loader_result(tmp_path, kind):
    cfg = tiny_cfg(tie=False)
    ckpt = tiny_checkpoint(cfg, seed=3)
    src = tmp_path / ("m.gguf" if kind == "gguf" else "hf")
    write_gguf(src, cfg, ckpt) if kind == "gguf" else write_hf(src, cfg, ckpt, shards=2)
    out = convert(src, W4, tmp_path / "q", progress=False)
    from jq.models import load_model

    params = load_model(src).params
    got, meta = ck.load(out)
    _same(jq.quantize_params(params, recipe_from_dict(W4)), got)
    assert meta["meta"]["model_config"]["n_layers"] == 2 and meta["meta"]["source_format"] == kind


# ---------------------------------------------------------------------------------------------------- sharding


def test_sharded_restore_equals_unsharded_and_carries_the_shardings(tmp_path):
    _, q = _quantized()
    out = ck.save(tmp_path / "q", q)
    plain, _ = ck.load(out)
    mesh = jax.make_mesh((4, 2), ("x", "y"))
    specs = {"a": {"kernel": P(None, "y"), "bias": P("x")}, "c": {"kernel": P("x", "y")},
             "d": {"kernel": P("x")}, "f": {"kernel": P("x", "y")}}
    sharded, _ = ck.load(out, mesh=mesh, shardings=specs)
    _same(plain, sharded)
    a, c, f = sharded["a"]["kernel"], sharded["c"]["kernel"], sharded["f"]["kernel"]
    assert a.codes.sharding == NamedSharding(mesh, P(None, "y")) and a.scale.sharding == NamedSharding(mesh, P(None, "y"))
    assert sharded["a"]["bias"].sharding == NamedSharding(mesh, P("x"))
    assert c.codes.sharding == NamedSharding(mesh, P("x", "y"))   # codes (16, 64): both dims divide
    assert c.scale.sharding == NamedSharding(mesh, P(None, "y"))  # 2 groups do not divide over 4: replicated
    assert f.perm.sharding.is_fully_replicated
    assert sharded["d"]["kernel"].codes.sharding.is_fully_replicated  # flat groups are replicated
    assert sharded["b"]["kernel"].codes.sharding == NamedSharding(mesh, P())  # no spec: replicated on the mesh
    assert len(a.codes.addressable_shards) == 8 and a.codes.addressable_shards[0].data.shape == (24, 12)
    # a target tree carrying shardings (e.g. from jax.eval_shape + a sharding rule) places the arrays itself
    want = NamedSharding(mesh, P("x", None))
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=want if x.ndim == 2 and
                                                         x.shape[0] % 4 == 0 else NamedSharding(mesh, P())), q)
    by_target, _ = ck.load(out, target=target)
    assert by_target["b"]["kernel"].codes.sharding == want
    _same(plain, by_target)


# ----------------------------------------------------------------------------------------------- interruption

_KILLED_CONVERT = """
import sys, time
from jq.apps.convert import convert
from jq.checkpoint import writer
real, n = writer._write_leaf, [0]
def slow(*a, **k):
    real(*a, **k)
    n[0] += 1
    if n[0] == 3:
        print("WROTE3", flush=True)
        time.sleep(600)
writer._write_leaf = slow
convert(sys.argv[1], sys.argv[2], sys.argv[3], progress=False)
"""


def test_killed_conversion_leaves_nothing_valid_and_a_rerun_completes(tmp_path):
    cfg = tiny_cfg(tie=True)
    write_gguf(tmp_path / "m.gguf", cfg, tiny_checkpoint(cfg))
    (tmp_path / "w4.yaml").write_text(json.dumps(W4))
    out = tmp_path / "q"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_CONVERT, str(tmp_path / "m.gguf"), str(tmp_path / "w4.yaml"),
                             str(out)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    try:
        assert proc.stdout.readline().strip() == "WROTE3"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert not out.exists()
    with pytest.raises(FileNotFoundError, match=str(out)):
        ck.load(out)
    staging = tmp_path / ".q.jq-tmp"
    assert staging.is_dir()  # the half-written session, hidden and not a checkpoint
    for p in [staging, *staging.iterdir()]:
        with pytest.raises((ck.CheckpointError, FileNotFoundError)):
            ck.load(p)
    done = convert(tmp_path / "m.gguf", tmp_path / "w4.yaml", out, progress=False)
    assert _leftovers(tmp_path, "q") == ["q"]
    ck.verify(done)
    from jq.models import load_model

    _same(jq.quantize_params(load_model(tmp_path / "m.gguf").params, recipe_from_dict(W4)), ck.load(done)[0])


def test_out_of_space_leaves_no_output_and_names_the_leaf(tmp_path, monkeypatch):
    _, q = _quantized()
    real, calls = writer._write_leaf, []

    def full(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*a, **k)

    monkeypatch.setattr(writer, "_write_leaf", full)
    with pytest.raises(OSError, match=r"no space left on device while writing leaf 'b/kernel'.*q") as e:
        ck.save(tmp_path / "q", q)
    assert e.value.errno == errno.ENOSPC
    assert _leftovers(tmp_path, "q") == []
    # an existing checkpoint survives a failed overwrite untouched
    monkeypatch.setattr(writer, "_write_leaf", real)
    ck.save(tmp_path / "q", q)
    calls.clear()
    monkeypatch.setattr(writer, "_write_leaf", full)
    with pytest.raises(OSError):
        ck.save(tmp_path / "q", {"z": {"kernel": jnp.ones((2, 2))}, **q}, overwrite=True)
    _same(q, ck.load(tmp_path / "q")[0])
    assert _leftovers(tmp_path, "q") == ["q"]


def test_existing_output_needs_overwrite_and_a_second_writer_is_refused(tmp_path):
    _, q = _quantized()
    ck.save(tmp_path / "q", q)
    with pytest.raises(FileExistsError, match="overwrite"):
        ck.save(tmp_path / "q", q)
    ck.save(tmp_path / "q", {"only": {"kernel": jnp.ones((4, 4))}}, overwrite=True)
    assert ck.read_meta(tmp_path / "q")["paths"] == ["only/kernel"]
    import fcntl

    with open(tmp_path / ".r.jq-lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        with pytest.raises(RuntimeError, match="another process is writing"):
            ck.save(tmp_path / "r", q)


# ---------------------------------------------------------------------------------------------------- bad input


def _edit_meta(d: Path, fn, *, seal: bool = True) -> None:
    """Edit a checkpoint's metadata as another writer would (re-sealed with its CRC), or as damage would."""
    f = d / ck.META_FILE
    m = json.loads(f.read_text())
    fn(m)
    f.write_text(json.dumps(sealed(m) if seal else m))


def test_missing_foreign_plain_and_unfinished_directories_are_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"{tmp_path / 'nope'}: no such checkpoint"):
        ck.load(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ck.CheckpointError, match="empty is not a jq checkpoint: jq_checkpoint.json is missing"):
        ck.read_meta(tmp_path / "empty")
    ocp.save(tmp_path / "plain", {"w": np.ones((2, 2), np.float32)})
    with pytest.raises(ck.CheckpointError, match="without jq metadata.*jq convert"):
        ck.load(tmp_path / "plain")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ck.CheckpointError, match="is a file"):
        ck.verify(tmp_path / "file")


def test_newer_major_version_is_refused_and_a_newer_minor_read(tmp_path):
    _, q = _quantized()
    d = ck.save(tmp_path / "q", q)
    _edit_meta(d, lambda m: m.update(format_version="1.7", future_field=1))
    assert ck.read_meta(d)["format_version"] == "1.7"
    ck.load(d)
    _edit_meta(d, lambda m: m.update(format_version="5.0"))
    for fn in (ck.read_meta, ck.load, ck.verify):
        with pytest.raises(ck.CheckpointError, match=r"format version 5.0 is newer than this jq reads \(4.x"):
            fn(d)


def test_damaged_checkpoints_are_refused_naming_the_leaf(tmp_path):
    _, q = _quantized()
    d = ck.save(tmp_path / "q", q)
    # metadata and stored arrays disagree: a layout the scales do not fit, a dtype, a leaf the metadata lacks
    _edit_meta(d, lambda m: m["leaves"]["a/kernel"]["layout"].update(group_size=8))
    with pytest.raises(ck.CheckpointError, match=r"a/kernel.*scale shape \(4, 24\) != \(8, 24\)"):
        ck.load(d)
    _edit_meta(d, lambda m: (m["leaves"]["a/kernel"]["layout"].update(group_size=16),
                             m["leaves"]["a/bias"]["arrays"]["value"].update(dtype="float32")))
    with pytest.raises(ck.CheckpointError, match=r"leaf 'a/bias' is stored as bfloat16\[24\] but the metadata says "
                                                 r"float32\[24\]"):
        ck.load(d)
    _edit_meta(d, lambda m: (m["leaves"]["a/bias"]["arrays"]["value"].update(dtype="bfloat16"),
                             m["paths"].remove("c/kernel"), m["leaves"].pop("c/kernel")))
    ck.load(d)
    with pytest.raises(ck.CheckpointError, match="arrays/00003-c.kernel .*belongs to no leaf"):
        ck.verify(d)
    # garbage in the biggest data file: the CRC-32 (or the decoder) catches it and names the leaf
    big = np.random.default_rng(0).standard_normal((256, 256), np.float32)
    d2 = ck.save(tmp_path / "q2", {"big": {"kernel": big}, "small": {"kernel": big[:8]}})
    data = max((p for p in (d2 / "arrays").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    with open(data, "r+b") as fh:
        fh.seek(data.stat().st_size // 2)
        fh.write(b"\xff" * 16)
    with pytest.raises(ck.CheckpointError, match=r"q2: leaf 'big/kernel'.*(CRC-32|cannot be read)"):
        ck.verify(d2)
    with pytest.raises(ck.CheckpointError, match=r"q2: leaf 'big/kernel'.*(CRC-32|cannot be read)"):
        ck.load(d2)  # load checks what it reads, too
    # truncated: a leaf's arrays, a leaf's Orbax index, the metadata file
    import shutil

    shutil.rmtree(d2 / "arrays" / "00001-small.kernel" / "state")
    with pytest.raises(ck.CheckpointError, match=r"q2/arrays/00001-small.kernel \(leaf 'small/kernel'\) is not a "
                                                 r"readable Orbax checkpoint"):
        ck.load(d2, verify=False)
    shutil.rmtree(d2 / "arrays" / "00001-small.kernel")
    with pytest.raises(ck.CheckpointError, match=r"leaf 'small/kernel': its arrays directory .* is missing"):
        ck.abstract_tree(d2) and ck.verify(d2, read_data=False)
    (d2 / ck.META_FILE).write_text("{garbage")
    with pytest.raises(ck.CheckpointError, match="q2/jq_checkpoint.json is not valid JSON"):
        ck.read_meta(d2)
    (d2 / ck.META_FILE).unlink()
    with pytest.raises(ck.CheckpointError, match="jq_checkpoint.json is missing"):
        ck.load(d2)


def test_target_tree_mismatch_names_leaf_and_values(tmp_path):
    params, q = _quantized()
    d = ck.save(tmp_path / "q", q)
    bad = dict(q, a={**q["a"], "bias": jnp.zeros((24,), jnp.float32)})
    with pytest.raises(ck.CheckpointError, match=r"leaf 'a/bias' is bfloat16\[24\] in the checkpoint but float32\[24\]"):
        ck.load(d, target=bad)
    bad = dict(q, a={**q["a"], "bias": jnp.zeros((25,), jnp.bfloat16)})
    with pytest.raises(ck.CheckpointError, match=r"a/bias.*bfloat16\[24\].*bfloat16\[25\]"):
        ck.load(d, target=bad)
    with pytest.raises(ck.CheckpointError, match="leaf 'b/kernel' is a QTensor in the checkpoint but an array"):
        ck.load(d, target=dict(q, b=params["b"]))
    with pytest.raises(ck.CheckpointError, match=r"missing leaves \['g/kernel'\]"):
        ck.load(d, target=dict(q, g={"kernel": jnp.ones((2, 2))}))


def test_recipe_errors_leave_no_output(tmp_path):
    ocp.save(tmp_path / "float", {"layer": {"kernel": np.ones((32, 32), np.float32)}})
    nothing = {"name": "typo", "rules": [{"pattern": "layers/.*/kernal", "format": "int4", "group_size": 16}]}
    with pytest.raises(ValueError, match=r"recipe 'typo': no rule matches a quantizable leaf of .*float.*layer/kernel"):
        convert(tmp_path / "float", nothing, tmp_path / "q", progress=False)
    gptq = {"name": "g", "rules": [{"pattern": ".*kernel", "method": "gptq", "format": "int4", "group_size": 16}]}
    with pytest.raises(ValueError, match=r"needs calibration data.*\['gptq'\].*is an Orbax checkpoint"):
        convert(tmp_path / "float", gptq, tmp_path / "q", progress=False)
    with pytest.raises(ValueError, match="needs a recipe"):
        convert(tmp_path / "float", None, tmp_path / "q")
    with pytest.raises(FileNotFoundError, match="nope: no such file"):
        convert(tmp_path / "nope", W4, tmp_path / "q")
    assert _leftovers(tmp_path, "q") == []


def test_calibrated_recipe_runs_the_llama_model_first(tmp_path):
    cfg = tiny_cfg(tie=True)
    write_gguf(tmp_path / "m.gguf", cfg, tiny_checkpoint(cfg))
    gptq = {"name": "gptq", "rules": [{"pattern": ".*kernel", "method": "gptq", "format": "int4", "group_size": 16}]}
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 16), dtype=np.int32)
    out = convert(tmp_path / "m.gguf", gptq, tmp_path / "q", calib=tokens, progress=False)
    got, meta = ck.load(out)
    assert isinstance(got["layers_1"]["mlp"]["down_proj"]["kernel"], jq.QTensor)
    assert meta["meta"]["calibration"] == {"samples": 2, "length": 16, "files": None}
    assert meta["recipe"]["rules"][0]["method"] == "gptq"


def test_recipe_dict_round_trips_every_shipped_recipe():
    root = Path(__file__).resolve().parents[2] / "configs"
    for f in sorted(root.glob("*.yaml")):
        c = jq.load_recipe(f)
        assert recipe_from_dict(json.loads(json.dumps(recipe_to_dict(c))), str(f)) == c, f.name
