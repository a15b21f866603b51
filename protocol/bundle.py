"""The bundle: one deterministic zip holding a compiled model and everything needed to trust and run it.

Layout (schema 1):
    manifest.json        what the model is, where it came from, and the sha256 of every other member
    model.onnx|.tflite   the compiled model
    reference.json       drift baseline: binned summaries of inputs and outputs on calibration/eval data
    selftest.npz         golden inputs and expected outputs, checked on the device before switching

Invariants:
- Writing is deterministic: same members -> same bytes (fixed timestamps, modes, order, compression).
- Writing is atomic: a bundle file either exists complete or not at all.
- Reading trusts nothing: it refuses unknown schemas, unexpected or unsafe member names, links,
  members larger than `MAX_MEMBER_BYTES` (checked while inflating, not from the header) and any
  member whose sha256 or size differs from the manifest.
"""

from __future__ import annotations

import hashlib
import io
import json
import lzma
import os
import stat
import tempfile
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgeops.protocol.errors import EdgeopsError

SCHEMA_VERSION = 1
SUFFIX = ".edgeops"
MANIFEST = "manifest.json"
MODEL_FILES = ("model.onnx", "model.tflite")
ALLOWED_MEMBERS = (MANIFEST, "reference.json", "selftest.npz", *MODEL_FILES)
MAX_MEMBER_BYTES = 2 * 1024**3
MAX_MANIFEST_BYTES = 1024**2
_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)
# What zipfile raises on damaged archives besides BadZipFile: a corrupt deflate, bzip2 or lzma stream
# (zlib.error, OSError, EOFError, LZMAError), an unknown compression method (NotImplementedError), the
# encryption flag (RuntimeError), a name flagged UTF-8 that is not (UnicodeDecodeError, a ValueError).
_CORRUPT_ZIP = (zipfile.BadZipFile, zlib.error, lzma.LZMAError, OSError, EOFError, NotImplementedError,
                RuntimeError, ValueError)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def deterministic_zip(members: dict[str, bytes]) -> bytes:
    """Zip members in name order with fixed metadata, so equal inputs give equal bytes."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name in sorted(members):
            info = zipfile.ZipInfo(name, date_time=_ZIP_EPOCH)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = (stat.S_IFREG | 0o644) << 16
            info.create_system = 3
            archive.writestr(info, members[name], compresslevel=9)
    return buffer.getvalue()


def npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    """An .npz (readable by numpy.load) built deterministically, unlike numpy.savez."""
    members = {}
    for name, array in arrays.items():
        out = io.BytesIO()
        np.save(out, np.ascontiguousarray(array), allow_pickle=False)
        members[f"{name}.npy"] = out.getvalue()
    return deterministic_zip(members)


def canonical_json(data: Any) -> bytes:
    return (json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode()


def fsync_dir(path: Path) -> None:
    """Make a rename or a new file in `path` durable: without it a power cut can undo the rename."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write via a temporary file in the same folder and rename, so readers never see half a file,
    and fsync file and folder, so after a power cut the file is either the old one or the new one.
    The file never exists with a looser mode than `mode` (the temporary file starts at 0600)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def bundle_filename(name: str, version: str, profile: str) -> str:
    return f"{name}-{version}-{profile}{SUFFIX}"


def build_bundle(manifest: dict[str, Any], members: dict[str, bytes]) -> bytes:
    """Return the bundle's bytes, with the hash and size of each member recorded in the manifest."""
    for name in members:
        if name not in ALLOWED_MEMBERS or name == MANIFEST:
            raise ValueError(f"not a bundle member: {name}")
    manifest = dict(manifest, schema=SCHEMA_VERSION)
    manifest["files"] = {name: {"sha256": sha256_bytes(data), "size": len(data)} for name, data in members.items()}
    return deterministic_zip({MANIFEST: canonical_json(manifest), **members})


@dataclass(frozen=True)
class Bundle:
    """A bundle whose members all matched the manifest when it was read."""

    path: Path
    manifest: dict[str, Any]
    members: dict[str, bytes]

    @property
    def model_bytes(self) -> bytes:
        return self.members[self.manifest["model"]["file"]]

    def selftest(self) -> dict[str, np.ndarray]:
        with np.load(io.BytesIO(self.members["selftest.npz"]), allow_pickle=False) as data:
            return {key: data[key] for key in data.files}

    def reference(self) -> dict[str, Any]:
        return json.loads(self.members["reference.json"])


def _refuse(path: Path, reason: str) -> EdgeopsError:
    return EdgeopsError(f"refusing bundle {path}: {reason}")


def _read_member(path: Path, archive: zipfile.ZipFile, info: zipfile.ZipInfo, limit: int) -> bytes:
    """Inflate at most `limit` bytes; a member that inflates past it is refused (zip bombs)."""
    try:
        with archive.open(info) as fh:
            data = fh.read(limit + 1)
    except _CORRUPT_ZIP as exc:
        raise _refuse(path, f"member {info.filename!r} is corrupt ({exc})") from None
    if len(data) > limit:
        raise _refuse(path, f"member {info.filename} is larger than {limit} bytes")
    return data


def _check_member_name(path: Path, info: zipfile.ZipInfo) -> None:
    name = info.filename
    if name.startswith("/") or "\\" in name or ".." in name.split("/") or ":" in name:
        raise _refuse(path, f"unsafe member name {name!r} (path traversal)")
    mode = info.external_attr >> 16
    if mode and not stat.S_ISREG(mode):
        raise _refuse(path, f"member {name!r} is not a regular file (link or device)")
    if name not in ALLOWED_MEMBERS:
        raise _refuse(path, f"unexpected member {name!r}")


def read_bundle(path: str | Path) -> Bundle:
    """Open and fully verify a bundle; raise EdgeopsError saying why it is refused."""
    path = Path(path)
    with _open(path) as archive:
        names, manifest = _manifest(path, archive)
        members = {}
        for name, expected in manifest["files"].items():
            if name not in names:
                raise _refuse(path, f"member {name} listed in the manifest is missing")
            size = expected.get("size") if isinstance(expected, dict) else None
            if not isinstance(size, int) or not 0 <= size <= MAX_MEMBER_BYTES:
                raise _refuse(path, f"member {name} has an invalid or oversize declared size")
            try:
                data = _read_member(path, archive, archive.getinfo(name), size)
            except (zipfile.BadZipFile, OSError, EOFError) as exc:
                raise _refuse(path, f"member {name} is corrupt ({exc})") from None
            if len(data) != size or sha256_bytes(data) != expected.get("sha256"):
                raise _refuse(path, f"member {name} does not match its sha256 in the manifest (tampered?)")
            members[name] = data
        extra = set(names) - set(members) - {MANIFEST}
        if extra:
            raise _refuse(path, f"members not covered by the manifest: {', '.join(sorted(extra))}")
        _check_complete(path, manifest)
    return Bundle(path=path, manifest=manifest, members=members)


def read_manifest(path: str | Path) -> dict[str, Any]:
    """A bundle's manifest, checked on its own without inflating the other members: what the bundle
    claims to be. Only `read_bundle` verifies that the members are what the manifest says."""
    path = Path(path)
    with _open(path) as archive:
        return _manifest(path, archive)[1]


def _open(path: Path) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(path)
    except FileNotFoundError:
        raise EdgeopsError(f"bundle {path} does not exist") from None
    except _CORRUPT_ZIP as exc:
        raise _refuse(path, f"not a bundle (not a zip file: {exc})") from None


def _manifest(path: Path, archive: zipfile.ZipFile) -> tuple[list[str], dict[str, Any]]:
    """(member names, manifest) after checking every member's name and type and the manifest's shape."""
    infos = archive.infolist()
    names = [info.filename for info in infos]
    for info in infos:
        _check_member_name(path, info)
    if len(set(names)) != len(names):
        raise _refuse(path, "duplicate member names")
    if MANIFEST not in names:
        raise _refuse(path, "no manifest.json")
    try:
        manifest = json.loads(_read_member(path, archive, archive.getinfo(MANIFEST), MAX_MANIFEST_BYTES))
    except (ValueError, zipfile.BadZipFile) as exc:
        raise _refuse(path, f"manifest.json is not valid JSON ({exc})") from None
    _check_manifest(path, manifest)
    return names, manifest


def _check_manifest(path: Path, manifest: Any) -> None:
    if not isinstance(manifest, dict):
        raise _refuse(path, "manifest.json is not an object")
    schema = manifest.get("schema")
    if schema != SCHEMA_VERSION:
        raise _refuse(
            path, f"unknown schema version {schema!r} (this edgeops reads {SCHEMA_VERSION}; upgrade edgeops?)"
        )
    for key in ("name", "version", "profile", "model", "files", "inputs", "outputs", "runtime"):
        if key not in manifest:
            raise _refuse(path, f"manifest has no '{key}'")
    files = manifest["files"]
    model = manifest["model"]
    if not isinstance(files, dict) or not isinstance(model, dict) or model.get("file") not in MODEL_FILES:
        raise _refuse(path, "manifest 'model' or 'files' is malformed")
    for name in files:
        if name not in ALLOWED_MEMBERS or name == MANIFEST:
            raise _refuse(path, f"manifest lists unexpected member {name!r}")
    if model["file"] not in files:
        raise _refuse(path, f"manifest does not cover the model file {model['file']}")


def _check_complete(path: Path, manifest: dict[str, Any]) -> None:
    """After the members verified: everything a device needs is there and the manifest agrees with itself."""
    files, model = manifest["files"], manifest["model"]
    for required in ("reference.json", "selftest.npz"):
        if required not in files:
            raise _refuse(path, f"manifest does not cover {required}")
    if files[model["file"]] != {"sha256": model.get("sha256"), "size": model.get("size")}:
        raise _refuse(path, "manifest's model hash or size disagrees with its file list")
    if not isinstance(manifest.get("selftest"), dict):
        raise _refuse(path, "manifest has no selftest section")
