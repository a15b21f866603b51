"""The fleet's TUF repository in a directory: keys, signed metadata and content-addressed targets.

Layout (consistent snapshots, so a device can fetch every file by a name that never changes meaning):
    keys/<role>.pem               Ed25519 private keys (PKCS#8 PEM, mode 0600); root and targets may
                                  be exported and removed to keep them offline
    metadata/N.root.json          every root version, kept: devices walk the chain N -> N+1
    metadata/N.targets.json       bundles with length, sha256 and custom {model, version, profile}
    metadata/N.snapshot.json      the targets version in force
    metadata/timestamp.json       the only unversioned file: the snapshot version in force
    targets/<sha256>.<name>       the bundle bytes, stored under their hash

Invariants:
- Files are written bottom-up (target, targets, snapshot, timestamp), each atomically, so a device
  reading at any moment sees a complete, consistent repository.
- Versioned files are never rewritten; the latest version of a role is the highest N on disk.
- Nothing is signed with a key the current root does not trust for that role.
- A lifetime is never shortened: expiry times are rounded up to the next whole second.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.serialization import load_pem_private_key
from securesystemslib.signer import CryptoSigner
from tuf.api.metadata import Metadata, MetaFile, Root, Snapshot, TargetFile, Targets, Timestamp
from tuf.api.serialization.json import JSONSerializer

from edgeops.protocol import wire
from edgeops.protocol.bundle import atomic_write
from edgeops.protocol.errors import EdgeopsError

ROLES = (Root.type, Targets.type, Snapshot.type, Timestamp.type)
OFFLINE_ROLES = (Root.type, Targets.type)
NUMERIC_VERSION = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_SERIALIZER = JSONSerializer(compact=False)


@dataclass(frozen=True)
class Expiry:
    """How long each role's metadata stays valid after it is signed."""

    root: timedelta = timedelta(days=365)
    targets: timedelta = timedelta(days=90)
    snapshot: timedelta = timedelta(days=7)
    timestamp: timedelta = timedelta(days=1)


def _expires(lifetime: timedelta) -> datetime:
    """Now + lifetime, rounded up: TUF drops microseconds, which would otherwise shorten it."""
    when = datetime.now(timezone.utc) + lifetime
    return when + timedelta(microseconds=1_000_000 - when.microsecond) if when.microsecond else when


# ---------------------------------------------------------------------------------------------- keys

def _key_path(repo: Path, role: str) -> Path:
    return Path(repo) / "keys" / f"{role}.pem"


def _write_key(path: Path, pem: bytes) -> None:
    """Write a private key readable by its owner only, atomically, never through a looser mode."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    atomic_write(path, pem, mode=0o600)


def _load_signer(path: Path) -> CryptoSigner:
    try:
        return CryptoSigner(load_pem_private_key(Path(path).read_bytes(), password=None))
    except FileNotFoundError:
        raise EdgeopsError(f"key {path} does not exist") from None
    except (OSError, ValueError, TypeError) as exc:
        raise EdgeopsError(f"cannot load private key {path}: {exc}") from None


def _signer(repo: Path, role: str, key: Path | None, root: Root) -> CryptoSigner:
    """The signer for `role`: from `key` if given, else from keys/; refused unless root trusts it."""
    path = Path(key) if key is not None else _key_path(repo, role)
    if key is None and not path.exists():
        raise EdgeopsError(f"the {role} key is not in {path.parent} (kept offline?); pass its PEM file with --key")
    signer = _load_signer(path)
    if signer.public_key.keyid not in root.roles[role].keyids:
        raise EdgeopsError(f"{path} is not a {role} key trusted by root v{root.version} (rotated? use the current key)")
    return signer


def export_key(repo: Path, role: str, dest: Path, remove: bool = False) -> Path:
    """Copy an offline-capable key (root or targets) to `dest`; `remove` then deletes the online copy."""
    if role not in OFFLINE_ROLES:
        raise EdgeopsError(f"only the {' and '.join(OFFLINE_ROLES)} keys can be exported; {role} must stay online")
    dest = Path(dest)
    if dest.exists():
        raise EdgeopsError(f"{dest} already exists; choose a new file for the exported key")
    source = _key_path(repo, role)
    try:
        pem = source.read_bytes()
    except FileNotFoundError:
        raise EdgeopsError(f"the {role} key is not in {source.parent} (already exported and removed?)") from None
    _write_key(dest, pem)
    if remove:
        source.unlink()
    return dest


# ------------------------------------------------------------------------------------------ metadata

def _metadata_dir(repo: Path) -> Path:
    return Path(repo) / "metadata"


def _latest_version(repo: Path, role: str) -> int:
    pattern = re.compile(rf"^([0-9]+)\.{role}\.json$")
    versions = [int(m.group(1)) for p in _metadata_dir(repo).glob(f"*.{role}.json") if (m := pattern.match(p.name))]
    if not versions:
        raise EdgeopsError(f"{repo} is not a TUF repository (no {role} metadata); create it with `edgeops fleet init`")
    return max(versions)


def _load(repo: Path, role: str) -> Metadata[Any]:
    """The latest metadata of `role` as written by this module."""
    name = "timestamp.json" if role == Timestamp.type else f"{_latest_version(repo, role)}.{role}.json"
    return Metadata.from_bytes((_metadata_dir(repo) / name).read_bytes())


def _write(repo: Path, md: Metadata[Any], *signers: CryptoSigner) -> None:
    if md.signed.type == Timestamp.type:  # signed "not before" evidence for devices' clocks (agent/clock.py)
        md.signed.unrecognized_fields[wire.ISSUED_FIELD] = datetime.now(timezone.utc).strftime(wire.ISSUED_FORMAT)
    md.signatures.clear()
    for signer in signers:
        md.sign(signer, append=True)
    role = md.signed.type
    name = "timestamp.json" if role == Timestamp.type else f"{md.signed.version}.{role}.json"
    atomic_write(_metadata_dir(repo) / name, md.to_bytes(_SERIALIZER))


def _bump(md: Metadata[Any], lifetime: timedelta) -> None:
    md.signed.version += 1
    md.signed.expires = _expires(lifetime)


def init_repository(repo: Path, expiry: Expiry) -> None:
    """Create keys for the four roles and sign version 1 of each role's metadata."""
    repo = Path(repo)
    if _metadata_dir(repo).exists() and any(_metadata_dir(repo).iterdir()):
        raise EdgeopsError(f"{repo} already holds a TUF repository")
    for sub in ("metadata", "targets"):
        (repo / sub).mkdir(parents=True, exist_ok=True)
    signers = {role: CryptoSigner.generate_ed25519() for role in ROLES}
    for role, signer in signers.items():
        _write_key(_key_path(repo, role), signer.private_bytes)
    root = Root(expires=_expires(expiry.root), consistent_snapshot=True)
    for role, signer in signers.items():
        root.add_key(signer.public_key, role)
    _write(repo, Metadata(root), signers[Root.type])
    _write(repo, Metadata(Targets(expires=_expires(expiry.targets))), signers[Targets.type])
    _write(repo, Metadata(Snapshot(expires=_expires(expiry.snapshot))), signers[Snapshot.type])
    _write(repo, Metadata(Timestamp(expires=_expires(expiry.timestamp))), signers[Timestamp.type])


def refresh_online(repo: Path, expiry: Expiry) -> None:
    """Sign new snapshot and timestamp versions pointing at the latest targets (online keys only)."""
    repo = Path(repo)
    root = _load(repo, Root.type).signed
    snapshot, timestamp = _load(repo, Snapshot.type), _load(repo, Timestamp.type)
    _bump(snapshot, expiry.snapshot)
    snapshot.signed.meta["targets.json"] = MetaFile(version=_latest_version(repo, Targets.type))
    _write(repo, snapshot, _signer(repo, Snapshot.type, None, root))
    _bump(timestamp, expiry.timestamp)
    timestamp.signed.snapshot_meta = MetaFile(version=snapshot.signed.version)
    _write(repo, timestamp, _signer(repo, Timestamp.type, None, root))


def _check_custom(custom: dict[str, Any]) -> None:
    """Devices decide by these fields; refuse at push what every device would refuse at install."""
    for field in ("model", "version", "profile"):
        if not isinstance(custom.get(field), str) or not custom[field]:
            raise EdgeopsError(f"target metadata needs a non-empty string '{field}'")
    if not NUMERIC_VERSION.fullmatch(custom["version"]):
        raise EdgeopsError(f"version {custom['version']!r} must be numbers and dots (like 1.2.0) so devices can order releases")


def _store(repo: Path, name: str, data_path: Path) -> TargetFile:
    """Copy the file into targets/ under its sha256; the hash is of the stored copy, which cannot change."""
    if not wire.FETCH_PATH.fullmatch(f"targets/{'0' * 64}.{name}"):
        raise EdgeopsError(f"target name {name!r} must be 1-200 letters, digits, '.', '_' or '-'")
    if not Path(data_path).is_file():
        raise EdgeopsError(f"{data_path} is not a file")
    fd, tmp = tempfile.mkstemp(dir=repo / "targets", prefix=".incoming.", suffix=".part")
    try:
        with open(data_path, "rb") as src, os.fdopen(fd, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
            dst.flush()
            os.fsync(dst.fileno())
        target = TargetFile.from_file(name, tmp, ["sha256"])
        os.replace(tmp, repo / "targets" / f"{target.hashes['sha256']}.{name}")
    finally:
        Path(tmp).unlink(missing_ok=True)
    return target


def add_target(repo: Path, name: str, data_path: Path, custom: dict[str, Any], targets_key: Path | None = None,
               expiry: Expiry = Expiry()) -> TargetFile:
    """Sign a file into a new targets version as `name` (replacing any previous one), then snapshot, timestamp."""
    repo = Path(repo)
    _check_custom(custom)
    signer = _signer(repo, Targets.type, targets_key, _load(repo, Root.type).signed)
    target = _store(repo, name, data_path)
    target.unrecognized_fields["custom"] = dict(custom)
    targets = _load(repo, Targets.type)
    _bump(targets, expiry.targets)
    targets.signed.targets[name] = target
    _write(repo, targets, signer)
    refresh_online(repo, expiry)
    return target


def listed_targets(repo: Path) -> set[str]:
    """Names of the targets the latest targets metadata lists."""
    return set(_load(Path(repo), Targets.type).signed.targets)


def withdraw_targets(repo: Path, names: list[str], targets_key: Path | None = None, expiry: Expiry = Expiry()) -> list[str]:
    """Sign a targets version without `names` (the ones still listed; returned). A withdrawn bundle
    is what lets a device go back to the version it ran before (agent/service.py): an older version
    is never installed on an unsigned say-so. The stored files stay; devices no longer accept them."""
    repo = Path(repo)
    targets = _load(repo, Targets.type)
    gone = [name for name in names if name in targets.signed.targets]
    if not gone:
        return []
    signer = _signer(repo, Targets.type, targets_key, _load(repo, Root.type).signed)
    for name in gone:
        del targets.signed.targets[name]
    _bump(targets, expiry.targets)
    _write(repo, targets, signer)
    refresh_online(repo, expiry)
    return gone


def rotate_key(repo: Path, role: str, expiry: Expiry = Expiry(), root_key: Path | None = None) -> Path:
    """Replace the root or targets key and return the new private key's path (keys/<role>.pem).

    The new root version is signed by the current root key and, for a root rotation, by the new one
    too, so devices can verify the chain; the old key is removed from root. `root_key` is the current
    root key when it is kept offline; export the new key afterwards to keep it offline as well.
    """
    if role not in OFFLINE_ROLES:
        raise EdgeopsError(f"only the {' and '.join(OFFLINE_ROLES)} keys can be rotated here, not {role}")
    repo = Path(repo)
    root = _load(repo, Root.type)
    current_root = _signer(repo, Root.type, root_key, root.signed)
    new = CryptoSigner.generate_ed25519()
    pending = _key_path(repo, f"{role}.next")  # kept until the new root is on disk: losing it would brick
    _write_key(pending, new.private_bytes)
    for keyid in list(root.signed.roles[role].keyids):
        root.signed.revoke_key(keyid, role)
    root.signed.add_key(new.public_key, role)
    _bump(root, expiry.root)
    _write(repo, root, *([current_root, new] if role == Root.type else [current_root]))
    os.replace(pending, _key_path(repo, role))
    if role == Targets.type:
        targets = _load(repo, Targets.type)
        _bump(targets, expiry.targets)
        _write(repo, targets, new)
        refresh_online(repo, expiry)
    return _key_path(repo, role)


# ------------------------------------------------------------------------------------- serving files

def read_metadata(repo: Path, role_filename: str) -> bytes:
    """A metadata file as served to devices; an unversioned root/targets/snapshot name means the latest."""
    if not wire.FETCH_PATH.fullmatch(f"metadata/{role_filename}"):
        raise EdgeopsError(f"{role_filename!r} is not a metadata file name")
    role = role_filename.split(".")[-2]
    if role_filename == f"{role}.json" and role != Timestamp.type:
        role_filename = f"{_latest_version(repo, role)}.{role}.json"
    try:
        return (_metadata_dir(repo) / role_filename).read_bytes()
    except FileNotFoundError:
        raise EdgeopsError(f"no metadata {role_filename} in {repo}") from None


def read_target(repo: Path, target_path: str) -> bytes:
    """A stored target by its content-addressed name, `<sha256>.<name>`."""
    if not wire.FETCH_PATH.fullmatch(f"targets/{target_path}"):
        raise EdgeopsError(f"{target_path!r} is not a stored target name (<sha256>.<name>)")
    try:
        return (Path(repo) / "targets" / target_path).read_bytes()
    except FileNotFoundError:
        raise EdgeopsError(f"no target {target_path} in {repo}") from None
