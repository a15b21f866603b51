"""Signed releases end to end: the fleet's TUF repository (edgeops.fleet.trust) against the device's
trust store (edgeops.agent.trust), with real Ed25519 keys and files, the device fetching straight from
the repository directory. Each attack is staged the way an attacker holding the stated keys could.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from realparts import missing
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from securesystemslib.signer import CryptoSigner
from tuf.api.metadata import Metadata, TargetFile

from edgeops.agent.trust import ExpiredMetadata, TrustError, TrustStore
from edgeops.fleet import trust as fleet
from edgeops.protocol.errors import EdgeopsError

PROFILE = "x86-vnni"
LONG_LIVED = fleet.Expiry()


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    path = tmp_path / "repo"
    fleet.init_repository(path, fleet.Expiry())
    return path


def serve(directory: Path):
    """The fetch callable: repository paths read from `directory` (FileNotFoundError when absent)."""
    return lambda path: (directory / path).read_bytes()


def device(repo: Path, state: Path) -> TrustStore:
    store = TrustStore(state)
    store.pin_root(fleet.read_metadata(repo, "1.root.json"))
    return store


def publish(repo: Path, version: str, profile: str = PROFILE, expiry: fleet.Expiry = LONG_LIVED) -> tuple[str, bytes]:
    name = f"digits-{version}-{profile}.edgeops"
    data = f"model {version} for {profile}\n".encode() * 50
    source = repo.parent / "bundles" / name
    source.parent.mkdir(exist_ok=True)
    source.write_bytes(data)
    fleet.add_target(repo, name, source, {"model": "digits", "version": version, "profile": profile}, expiry=expiry)
    return name, data


def signer(pem: Path) -> CryptoSigner:
    return CryptoSigner(load_pem_private_key(pem.read_bytes(), None))


def forge_targets(repo: Path, key: Path, version: str) -> None:
    """An attacker with the fleet server (online snapshot/timestamp keys) but not the targets key."""
    md = Metadata.from_bytes(fleet.read_metadata(repo, "targets.json"))
    md.signed.version += 1
    name = f"digits-{version}-{PROFILE}.edgeops"
    md.signed.targets[name] = TargetFile.from_data(name, b"evil", ["sha256"])
    md.signed.targets[name].unrecognized_fields["custom"] = {"model": "digits", "version": version, "profile": PROFILE}
    md.signatures.clear()
    md.sign(signer(key))
    (repo / "metadata" / f"{md.signed.version}.targets.json").write_bytes(md.to_bytes())
    fleet.refresh_online(repo, fleet.Expiry())


def version_of(path: Path) -> int:
    return Metadata.from_bytes(path.read_bytes()).signed.version


def test_happy_path(repo, tmp_path):
    name, data = publish(repo, "1.0.0")
    store = device(repo, tmp_path / "dev")
    store.refresh(serve(repo))
    info = store.target_info(name)
    assert (info.length, info.sha256) == (len(data), hashlib.sha256(data).hexdigest())
    assert fleet.read_target(repo, f"{info.sha256}.{name}") == data
    assert store.verify_target(name, data, PROFILE, None) == {"model": "digits", "version": "1.0.0", "profile": PROFILE}
    with pytest.raises(TrustError) as refused:
        store.verify_target("other-1.0.0-x86-vnni.edgeops", data, PROFILE, None)
    assert refused.value.reason == "unknown-target"


def test_repository_layout_and_key_modes(repo):
    names = sorted(p.name for p in (repo / "metadata").iterdir())
    assert names == ["1.root.json", "1.snapshot.json", "1.targets.json", "timestamp.json"]
    assert Metadata.from_bytes(fleet.read_metadata(repo, "root.json")).signed.consistent_snapshot
    for pem in (repo / "keys").iterdir():
        assert stat.S_IMODE(pem.stat().st_mode) == 0o600, pem
    with pytest.raises(EdgeopsError):
        fleet.read_metadata(repo, "../keys/root.pem")
    with pytest.raises(EdgeopsError):
        fleet.read_target(repo, "../keys/root.pem")


def test_fleet_refuses_a_targets_key_root_does_not_trust(repo, tmp_path):
    foreign = tmp_path / "foreign.pem"
    foreign.write_bytes(CryptoSigner.generate_ed25519().private_bytes)
    source = tmp_path / "digits-1.0.0-x86-vnni.edgeops"
    source.write_bytes(b"x")
    with pytest.raises(EdgeopsError, match="not a targets key trusted by root"):
        fleet.add_target(repo, source.name, source, {"model": "digits", "version": "1.0.0", "profile": PROFILE}, foreign)


def test_targets_signed_by_an_untrusted_key_are_refused(repo, tmp_path):
    foreign = tmp_path / "foreign.pem"
    foreign.write_bytes(CryptoSigner.generate_ed25519().private_bytes)
    forge_targets(repo, foreign, "9.0.0")
    with pytest.raises(TrustError) as refused:
        device(repo, tmp_path / "dev").refresh(serve(repo))
    assert refused.value.reason == "bad-signature"


def test_one_byte_flipped_in_the_target_is_refused(repo, tmp_path):
    name, data = publish(repo, "1.0.0")
    store = device(repo, tmp_path / "dev")
    store.refresh(serve(repo))
    tampered = bytearray(data)
    tampered[len(data) // 2] ^= 0x01
    with pytest.raises(TrustError) as refused:
        store.verify_target(name, bytes(tampered), PROFILE, None)
    assert refused.value.reason == "hash-mismatch"


@pytest.mark.parametrize("role", ["timestamp", "snapshot", "targets"])
def test_one_byte_flipped_in_metadata_is_refused(repo, tmp_path, role):
    publish(repo, "1.0.0")
    path = repo / "metadata" / ("timestamp.json" if role == "timestamp" else
                                f"{max(int(p.name.split('.')[0]) for p in (repo / 'metadata').glob(f'*.{role}.json'))}.{role}.json")
    raw = bytearray(path.read_bytes())
    year = raw.index(b'"expires": "') + len(b'"expires": "') + 3  # last digit of the year: still a valid date
    raw[year] ^= 0x01
    path.write_bytes(bytes(raw))
    with pytest.raises(TrustError) as refused:
        device(repo, tmp_path / "dev").refresh(serve(repo))
    assert refused.value.reason == "bad-signature"


@pytest.mark.parametrize("change", [lambda d: d + b"\0" * 4096, lambda d: d[:-1]], ids=["longer", "truncated"])
def test_content_of_another_length_than_signed_is_refused(repo, tmp_path, change):
    name, data = publish(repo, "1.0.0")
    store = device(repo, tmp_path / "dev")
    store.refresh(serve(repo))
    with pytest.raises(TrustError) as refused:
        store.verify_target(name, change(data), PROFILE, None)
    assert refused.value.reason == "length"


def test_endless_metadata_is_refused(repo, tmp_path):
    store = device(repo, tmp_path / "dev")
    honest = serve(repo)

    def padded(path: str) -> bytes:
        data = honest(path)
        return data + b" " * 1_000_000 if path == "metadata/timestamp.json" else data

    with pytest.raises(TrustError) as refused:
        store.refresh(padded)
    assert refused.value.reason == "length"


@pytest.mark.parametrize(("change", "reason"), [(lambda raw: raw[:-10], "bad-metadata"),
                                                (lambda raw: raw.replace(b'"version": 1', b'"version": 7'), "bad-signature")])
def test_a_bad_root_is_not_pinned(repo, tmp_path, change, reason):
    store = TrustStore(tmp_path / "dev")
    with pytest.raises(TrustError) as refused:
        store.pin_root(change(fleet.read_metadata(repo, "root.json")))
    assert refused.value.reason == reason
    assert not store.has_root()


@pytest.mark.parametrize(("installed", "offered", "accepted"), [
    ("1.1.0", "1.0.0", False),   # an older release re-published as a new target
    ("1.1.0", "1.1.0", False),   # the same version again
    ("1.1", "1.1.0", False),     # the same version, spelled differently
    ("1.9.0", "1.10.0", True),   # numeric, not lexical, order
    ("1.10.0", "1.9.0", False),
])
def test_model_versions_only_move_forward(repo, tmp_path, installed, offered, accepted):
    name, data = publish(repo, offered)
    store = device(repo, tmp_path / "dev")
    store.refresh(serve(repo))
    if accepted:
        assert store.verify_target(name, data, PROFILE, installed)["version"] == offered
    else:
        with pytest.raises(TrustError) as refused:
            store.verify_target(name, data, PROFILE, installed)
        assert refused.value.reason == "rollback"


def test_replayed_older_metadata_is_refused(repo, tmp_path):
    publish(repo, "1.0.0")
    recorded = tmp_path / "recorded"
    shutil.copytree(repo / "metadata", recorded / "metadata")
    publish(repo, "2.0.0")
    store = device(repo, tmp_path / "dev")
    store.refresh(serve(repo))
    seen = version_of(tmp_path / "dev" / "timestamp.json")
    with pytest.raises(TrustError) as refused:
        store.refresh(serve(recorded))
    assert refused.value.reason == "rollback"
    assert version_of(tmp_path / "dev" / "timestamp.json") == seen  # trusted state did not go back


@pytest.mark.parametrize("role", ["timestamp", "snapshot", "targets"])
def test_expired_metadata_freezes_updates(repo, tmp_path, role):
    publish(repo, "1.0.0", expiry=fleet.Expiry(**{role: timedelta(seconds=-1)}))
    with pytest.raises(ExpiredMetadata) as refused:
        device(repo, tmp_path / "dev").refresh(serve(repo))
    assert refused.value.reason == "expired"
    assert isinstance(refused.value, TrustError)


def test_metadata_expiring_after_refresh_blocks_install(repo, tmp_path):
    signed_after = datetime.now(timezone.utc)
    name, data = publish(repo, "1.0.0", expiry=fleet.Expiry(timestamp=timedelta(seconds=1)))
    expires = Metadata.from_bytes(fleet.read_metadata(repo, "timestamp.json")).signed.expires
    assert expires >= signed_after + timedelta(seconds=1)  # TUF's whole seconds never shorten a lifetime
    store = device(repo, tmp_path / "dev")
    store.refresh(serve(repo))
    assert store.verify_target(name, data, PROFILE, None)
    deadline = time.monotonic() + 5
    while datetime.now(timezone.utc) < expires:
        assert time.monotonic() < deadline, "timestamp never expired"
        time.sleep(0.05)
    with pytest.raises(ExpiredMetadata):
        store.verify_target(name, data, PROFILE, None)


def test_a_bundle_for_another_profile_is_refused(repo, tmp_path):
    name, data = publish(repo, "1.0.0", profile="rpi4")
    store = device(repo, tmp_path / "dev")
    store.refresh(serve(repo))
    with pytest.raises(TrustError) as refused:
        store.verify_target(name, data, PROFILE, None)
    assert refused.value.reason == "wrong-profile"


def test_root_rotation_is_followed_by_devices(repo, tmp_path):
    old_keyid = signer(repo / "keys" / "root.pem").public_key.keyid
    seen_v1 = device(repo, tmp_path / "seen-v1")
    seen_v1.refresh(serve(repo))
    never_refreshed = device(repo, tmp_path / "fresh")

    new_key = fleet.rotate_key(repo, "root")
    new_keyid = signer(new_key).public_key.keyid
    root2 = Metadata.from_bytes(fleet.read_metadata(repo, "2.root.json"))
    assert set(root2.signatures) == {old_keyid, new_keyid}
    assert root2.signed.roles["root"].keyids == [new_keyid] and old_keyid not in root2.signed.keys
    fleet.rotate_key(repo, "root")
    name, data = publish(repo, "1.0.0")

    for state, store in ((tmp_path / "seen-v1", seen_v1), (tmp_path / "fresh", never_refreshed)):
        store.refresh(serve(repo))
        assert version_of(state / "root.json") == 3
        assert store.verify_target(name, data, PROFILE, None)["version"] == "1.0.0"


def test_a_root_signed_only_by_the_rotated_out_key_is_refused(repo, tmp_path):
    old_root = signer(repo / "keys" / "root.pem")
    fleet.rotate_key(repo, "root")
    store = device(repo, tmp_path / "dev")
    store.refresh(serve(repo))
    forged = Metadata.from_bytes(fleet.read_metadata(repo, "root.json"))
    forged.signed.version += 1
    forged.signatures.clear()
    forged.sign(old_root)
    (repo / "metadata" / f"{forged.signed.version}.root.json").write_bytes(forged.to_bytes())
    with pytest.raises(TrustError) as refused:
        store.refresh(serve(repo))
    assert refused.value.reason == "bad-signature"


def test_after_targets_key_rotation_the_old_key_is_refused(repo, tmp_path):
    old_key = fleet.export_key(repo, "targets", tmp_path / "old-targets.pem")
    store = device(repo, tmp_path / "dev")
    store.refresh(serve(repo))
    fleet.rotate_key(repo, "targets")
    name, data = publish(repo, "1.0.0")
    store.refresh(serve(repo))
    assert store.verify_target(name, data, PROFILE, None)
    with pytest.raises(EdgeopsError, match="not a targets key trusted"):
        fleet.add_target(repo, name, repo.parent / "bundles" / name,
                         {"model": "digits", "version": "1.0.1", "profile": PROFILE}, old_key)
    forge_targets(repo, old_key, "9.0.0")
    with pytest.raises(TrustError) as refused:
        store.refresh(serve(repo))
    assert refused.value.reason == "bad-signature"


def test_offline_targets_key_signs_from_its_pem_file(repo, tmp_path):
    offline = fleet.export_key(repo, "targets", tmp_path / "usb" / "targets.pem", remove=True)
    assert stat.S_IMODE(offline.stat().st_mode) == 0o600
    assert not (repo / "keys" / "targets.pem").exists()
    source = tmp_path / "digits-1.0.0-x86-vnni.edgeops"
    source.write_bytes(b"model")
    custom = {"model": "digits", "version": "1.0.0", "profile": PROFILE}
    with pytest.raises(EdgeopsError, match="--key"):
        fleet.add_target(repo, source.name, source, custom)
    fleet.add_target(repo, source.name, source, custom, offline)
    fleet.refresh_online(repo, fleet.Expiry())  # the server needs no offline key
    store = device(repo, tmp_path / "dev")
    store.refresh(serve(repo))
    assert store.verify_target(source.name, b"model", PROFILE, None) == custom
    with pytest.raises(EdgeopsError):
        fleet.export_key(repo, "timestamp", tmp_path / "ts.pem")


@pytest.mark.parametrize("version", ["v2", "1.0.0-rc1", "", "1..0"])
def test_fleet_refuses_versions_devices_cannot_order(repo, tmp_path, version):
    source = tmp_path / "digits-x-x86-vnni.edgeops"
    source.write_bytes(b"model")
    with pytest.raises(EdgeopsError, match="version"):
        fleet.add_target(repo, source.name, source, {"model": "digits", "version": version, "profile": PROFILE})


def test_refresh_fsyncs_what_python_tuf_saved(repo, tmp_path, monkeypatch):
    if not Path("/proc/self/fd").is_dir():
        missing("needs /proc to name fsynced descriptors")
    publish(repo, "1.0.0")
    store = device(repo, tmp_path / "dev")
    synced, real_fsync = set(), os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.add(os.readlink(f"/proc/self/fd/{fd}")), real_fsync(fd)))
    store.refresh(serve(repo))
    state = (tmp_path / "dev").resolve()
    expected = {state, state / "root_history", state / "root_history" / "1.root.json",
                *(state / f"{role}.json" for role in ("timestamp", "snapshot", "targets"))}
    assert {str(p) for p in expected} <= synced


def test_transport_errors_reach_the_caller_unchanged(repo, tmp_path):
    name, _ = publish(repo, "1.0.0")
    store = device(repo, tmp_path / "dev")
    store.refresh(serve(repo))
    assert store.target_info(name)

    def broker_down(path: str) -> bytes:
        raise ConnectionError(f"no answer for {path}")

    with pytest.raises(ConnectionError, match="no answer"):
        store.refresh(broker_down)
    with pytest.raises(RuntimeError):
        store.target_info(name)  # nothing is answered after a refresh that failed


def test_agent_trust_does_not_import_fleet_or_compiler():
    code = ("import sys, edgeops.agent.trust; "
            "bad = [m for m in sys.modules if m.startswith(('edgeops.fleet', 'edgeops.compiler'))]; "
            "sys.exit(str(bad) if bad else 0)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
