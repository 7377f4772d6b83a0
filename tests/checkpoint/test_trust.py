"""Checkpoints a user can trust: relative paths, a load that never returns damaged numbers (a fuzz over every
stored file), an --overwrite that replaces only a checkpoint and keeps the old one until the new one commits, and a
real full disk reported in one line."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import orbax.checkpoint.experimental.v1 as ocp
import pytest

import jq
from jq import checkpoint as ck
from jq.apps.convert import convert
from jq.apps.cli import main as cli_main
from jqtest.checkpoints import _leftovers, _same

REPO = Path(__file__).resolve().parents[2]


def _small():
    rng = np.random.default_rng(0)
    params = {"a": {"kernel": rng.standard_normal((64, 24)).astype(np.float32), "bias": np.arange(24, dtype=np.float32)},
              "b": {"kernel": rng.standard_normal((32, 16)).astype(np.float32)},
              "big": {"kernel": rng.standard_normal((256, 256)).astype(np.float32)}}  # data in files of its own
    cfg = jq.QuantConfig(name="m", rules=(jq.Rule("a/kernel", jq.Scheme("int4", symmetric=False, group_size=16)),
                                          jq.Rule("b/kernel", jq.Scheme("fp8_e4m3"))))
    return params, jq.quantize_params(params, cfg), cfg


# ------------------------------------------------------------------------------------------------ relative paths


def test_relative_paths_work_for_every_read_and_write(tmp_path, monkeypatch):
    """Orbax wants absolute paths; jq takes what users type (`out/w4`, `float_dir`) from any working directory."""
    params, q, cfg = _small()
    monkeypatch.chdir(tmp_path)
    assert ck.save("out/w4", q, recipe=cfg) == tmp_path / "out" / "w4"
    _same(q, ck.load("out/w4")[0])
    assert ck.verify("out/w4")["leaves"] == 4 and "a" in ck.abstract_tree("out/w4")
    ocp.save(tmp_path / "float_dir", params)
    out = convert("float_dir", cfg, "out/conv", progress=False)
    _same(q, ck.load(out)[0])
    monkeypatch.chdir(tmp_path / "out")
    assert cli_main(["inspect", "w4"]) == 0
    assert cli_main(["convert", "--in", "../float_dir", "--recipe", "rtn_w8", "--out", "w8"]) == 0
    assert ck.read_meta("w8")["recipe"]["name"] == "rtn_w8"


# --------------------------------------------------------------------------------------------- damage on load


def _damages(data: bytes) -> dict[str, bytes | None]:
    """Ways one stored file can be damaged: cut in half, one byte flipped, one digit changed (so that JSON stays
    JSON: a shape, a group size, a CRC), deleted."""
    flipped = bytearray(data or b"x")
    flipped[len(flipped) // 2] ^= 0xFF
    out = {"truncated": data[: len(data) // 2], "flipped": bytes(flipped), "deleted": None}
    digits = [i for i, c in enumerate(data) if 48 <= c <= 57]
    if digits:
        i = digits[len(digits) // 2]
        out["digit"] = data[:i] + bytes([48 + (data[i] - 48 + 3) % 10]) + data[i + 1:]
    return out


def test_load_returns_the_exact_tree_or_names_the_damage_for_every_stored_file(tmp_path):
    """Fuzz: truncate / flip / change / delete each stored file of a small checkpoint in turn. `load` must return
    the original tree bit for bit (Orbax does not read every file it keeps) or raise an error naming the leaf or the
    metadata file — never return different numbers."""
    _, q, cfg = _small()
    src = ck.save(tmp_path / "src", q, recipe=cfg)
    # every file of a QTensor leaf (codes / scale / zero) and of a float leaf with a data file of its own, and the
    # metadata: the other leaves' files are of the same kinds
    keep = ("arrays/00001-a.kernel", "arrays/00003-big.kernel")
    files = sorted(p.relative_to(src) for p in src.rglob("*")
                   if p.is_file() and (p.parent == src or str(p.relative_to(src)).startswith(keep)))
    assert len(files) >= 20 and Path(ck.META_FILE) in files
    seen = {"same": 0, "refused": 0}
    for n, rel in enumerate(files):
        for how, damaged in _damages((src / rel).read_bytes()).items():
            d = tmp_path / f"c{n}-{how}"
            shutil.copytree(src, d)
            if damaged is None:
                (d / rel).unlink()
            else:
                (d / rel).write_bytes(damaged)
            try:
                tree, meta = ck.load(d)
            except (ck.CheckpointError, FileNotFoundError) as e:
                msg = str(e)
                assert "leaf '" in msg or ck.META_FILE in msg, (rel, how, msg)
                seen["refused"] += 1
            else:
                _same(q, tree)
                assert meta["recipe"] == ck.read_meta(src)["recipe"], (rel, how)
                seen["same"] += 1
            shutil.rmtree(d)
    assert seen["refused"] > 30 and seen["same"] > 10, seen


def test_load_verifies_crcs_by_default_and_says_how_to_opt_out(tmp_path):
    _, q, _ = _small()
    d = ck.save(tmp_path / "q", q)
    data = max((p for p in (d / "arrays").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0x01  # one bit inside the big leaf's data
    data.write_bytes(bytes(raw))
    got = ck.load(d, verify=False)[0]["big"]["kernel"]  # what the check is there for: other numbers, no error
    assert not np.array_equal(np.asarray(got), np.asarray(q["big"]["kernel"]))
    with pytest.raises(ck.CheckpointError, match=r"leaf 'big/kernel'.*(CRC-32 .* differs.*verify=False|cannot be read)"):
        ck.load(d)
    from jq.apps import pipeline

    with pytest.raises(ck.CheckpointError, match="leaf 'big/kernel'"):
        pipeline.load_quantized(d)


def test_edited_metadata_is_caught_by_its_own_crc_and_an_old_checkpoint_without_one_still_loads(tmp_path):
    _, q, _ = _small()
    d = ck.save(tmp_path / "q", q)
    meta = json.loads((d / ck.META_FILE).read_text())
    assert meta["format_version"] == "1.3" and isinstance(meta["header_crc32"], int)
    edited = json.loads(json.dumps(meta))
    edited["leaves"]["a/kernel"]["symmetric"] = True  # still valid JSON, still a plausible layout
    (d / ck.META_FILE).write_text(json.dumps(edited))
    with pytest.raises(ck.CheckpointError, match="jq_checkpoint.json: CRC-32 .* of the metadata differs"):
        ck.load(d)
    old = {k: v for k, v in meta.items() if k != "header_crc32"}
    old["format_version"] = "1.0"  # as the previous jq wrote it
    (d / ck.META_FILE).write_text(json.dumps(old))
    _same(q, ck.load(d)[0])


# ------------------------------------------------------------------------------------------------- --overwrite


def test_overwrite_replaces_only_a_checkpoint(tmp_path):
    _, q, _ = _small()
    f = tmp_path / "file"
    f.write_text("keep me")
    with pytest.raises(FileExistsError, match="file is a file, not a jq checkpoint"):
        ck.save(f, q, overwrite=True)
    assert f.read_text() == "keep me"
    notes = tmp_path / "mine"
    notes.mkdir()
    (notes / "notes.txt").write_text("keep me too")
    with pytest.raises(FileExistsError, match=r"mine is a directory that is not a jq checkpoint \(it holds notes.txt\)"):
        ck.save(notes, q, overwrite=True)
    assert (notes / "notes.txt").read_text() == "keep me too"
    empty = tmp_path / "empty"
    empty.mkdir()
    _same(q, ck.load(ck.save(empty, q))[0])  # an empty directory holds nothing to lose
    assert _leftovers(tmp_path, "file") == ["file"] and _leftovers(tmp_path, "mine") == ["mine"]


def test_a_commit_interrupted_between_its_renames_gets_the_old_checkpoint_back(tmp_path):
    _, q, _ = _small()
    d = ck.save(tmp_path / "q", q)
    os.rename(d, tmp_path / ".q.jq-old")  # the process died after setting the old one aside
    with pytest.warns(UserWarning, match="interrupted while replacing this checkpoint; the old checkpoint was put back"):
        with pytest.raises(FileExistsError, match="already exists"):
            ck.save(d, {"x": {"kernel": jnp.ones((2, 2))}})
    _same(q, ck.load(d)[0])


def test_a_committed_overwrite_reports_success_when_the_old_copy_cannot_be_removed(tmp_path, monkeypatch):
    _, q, _ = _small()
    d = ck.save(tmp_path / "q", q)
    real = shutil.rmtree

    def stuck(p, *a, **k):
        if str(p).endswith(".jq-old"):
            raise OSError(errno.EBUSY, "Device or resource busy")
        return real(p, *a, **k)

    monkeypatch.setattr(shutil, "rmtree", stuck)
    with pytest.warns(UserWarning, match=r"wrote .*q, but the checkpoint it replaced could not be removed"):
        assert ck.save(d, {"x": {"kernel": jnp.ones((2, 2))}}, overwrite=True) == d
    assert ck.read_meta(d)["paths"] == ["x/kernel"]


def test_cli_checks_the_destination_before_any_work(tmp_path, capsys):
    f = tmp_path / "taken"
    f.write_text("keep me")
    # the model does not even exist: the destination is refused first, in a second instead of after the work
    for argv in (["quantize", "--model", str(tmp_path / "none.gguf"), "--recipe", "rtn_w8", "--out", str(f),
                  "--overwrite"],
                 ["convert", "--in", str(tmp_path / "none.gguf"), "--recipe", "rtn_w8", "--out", str(f), "--overwrite"]):
        assert cli_main(argv) == 2
        err = capsys.readouterr().err
        assert "taken is a file, not a jq checkpoint" in err, err
    assert f.read_text() == "keep me"


# ---------------------------------------------------------------------------------------------------- full disk


_FULL_DISK = """
import numpy as np, jq, orbax.checkpoint.experimental.v1 as ocp, sys
rng = np.random.default_rng(0)
ocp.save(sys.argv[1], {f"l{i}": {"kernel": rng.standard_normal((256, 256)).astype(np.float32)} for i in range(4)})
"""


def test_a_real_full_disk_gives_one_clear_message_and_keeps_the_old_checkpoint(tmp_path):
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=300k", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("needs a small tmpfs (mount, as root) to fill a real disk")
    try:
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        subprocess.run([sys.executable, "-c", _FULL_DISK, str(tmp_path / "float")], check=True, env=env)
        cmd = [sys.executable, "-m", "jq.apps.cli", "convert", "--in", str(tmp_path / "float"), "--recipe", "rtn_w8",
               "--out", str(mnt / "w8")]
        first = subprocess.run(cmd, capture_output=True, text=True, env=env)
        assert first.returncode == 2
        err = first.stderr.strip().splitlines()
        assert "Traceback" not in first.stderr and len(err) <= 6, first.stderr  # progress lines + one error line
        assert "no space left on device while" in err[-1] and "nothing was written at" in err[-1]
        assert sorted(p.name for p in mnt.iterdir()) == []
        small = {"x": {"kernel": np.ones((8, 8), np.float32)}}
        ck.save(mnt / "w8", small)
        again = subprocess.run(cmd + ["--overwrite"], capture_output=True, text=True, env=env)
        assert again.returncode == 2 and f"the existing checkpoint at {mnt / 'w8'} is unchanged" in again.stderr
        _same(small, ck.load(mnt / "w8")[0])
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


# ---------------------------------------------------------------------------------------------- old checkpoints

DATA = Path(__file__).resolve().parent / "data"


def test_a_checkpoint_written_by_an_earlier_jq_still_loads_bit_for_bit():
    """tests/checkpoint/data/checkpoint_v1_0 was written by jq at commit b4dc096 (format 1.0, before the metadata CRC and
    before the package moved around); its arrays are kept beside it in checkpoint_v1_0.npz."""
    d = DATA / "checkpoint_v1_0"
    meta = ck.read_meta(d)
    assert meta["format_version"] == "1.0" and "header_crc32" not in meta
    tree, _ = ck.load(d)
    ck.verify(d)
    want = np.load(DATA / "checkpoint_v1_0.npz")
    attn = tree["attn"]["kernel"]
    assert isinstance(attn, jq.QTensor) and attn.fmt == "int4" and not attn.symmetric and attn.perm is not None
    assert tree["mlp"]["kernel"].fmt == "fp8_e4m3" and tree["head"]["kernel"].layout.padded == 48
    for key in want.files:
        path, _, field = key.replace("|", "/").partition(":")
        leaf = dict(jq.leaf_paths(tree))[path]
        got = np.asarray(getattr(leaf, field) if field else leaf)
        if got.dtype.kind not in "iuf" or got.dtype.name.startswith(("float8", "bfloat")):
            got = got.view(np.uint8)
        np.testing.assert_array_equal(got, want[key], err_msg=key)
    assert np.isfinite(np.asarray(attn.dequantize())).all()
