"""The device's trust store: TUF metadata verified by python-tuf's ngclient, kept durably in a directory.

Layout (written by `tuf.ngclient.Updater`):
    root_history/N.root.json    every root the device has trusted, from the one pinned at enrollment
    root.json                   symlink to the newest of them: the trust anchor of the next refresh
    timestamp.json, snapshot.json, targets.json
                                the newest verified versions, the reference for rollback checks
    clock.json                  the device's time floor (agent/clock.py)

Invariants:
- Trust starts at the root pinned at enrollment and moves only along roots that python-tuf verified
  (each signed by the previous root's keys and its own).
- When `refresh()` returns or raises, every metadata file and both directories are fsynced: python-tuf
  replaces files without fsync, and a power cut must not take trusted metadata back a version.
- `target_info()` and `verify_target()` answer only from metadata that `refresh()` verified in this
  process, and only while none of it has expired.
- Expiry is judged at `Clock.now()`, the later of the wall clock and the persisted time floor, so a
  clock set back does not revive expired metadata; python-tuf judges by the wall clock, so a clock
  set forward makes fresh metadata look expired: a freeze, never an install.
- Every refusal is a `TrustError` with a short `reason` code for the fleet. Errors raised by the
  `fetch` callable (the transport) propagate unchanged, so the caller can tell "retry" from "refused".
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from edgeops.agent.clock import Clock, Evidence
from edgeops.protocol.errors import EdgeopsError
from edgeops.protocol.wire import ISSUED_FIELD, ISSUED_FORMAT
from tuf.api import exceptions
from tuf.api.metadata import Metadata, TargetFile
from tuf.api.serialization import DeserializationError
from tuf.ngclient import FetcherInterface, Updater

Fetch = Callable[[str], bytes]
"""Return the repository file at a path such as "metadata/timestamp.json" or "targets/<sha256>.<name>".

Must raise FileNotFoundError (or a subclass) when the fleet has no such file: for the next root version
that is the normal end of the root chain. Any other exception is a transport failure.
"""

METADATA_BASE = "metadata/"
TOP_LEVEL = ("root", "timestamp", "snapshot", "targets")
NUMERIC_VERSION = re.compile(r"^[0-9]+(\.[0-9]+)*$")


class TrustError(EdgeopsError):
    """Metadata or a target was refused; `reason` is a short code the agent reports to the fleet."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


class ExpiredMetadata(TrustError):
    """Signed metadata is past its expiry (a freeze attack, or a fleet that stopped refreshing)."""

    def __init__(self, message: str):
        super().__init__("expired", f"{message}; keeping the installed model until the fleet publishes fresh metadata")


@dataclass(frozen=True)
class SignedTarget:
    """What the metadata says a target is: enough to download it and check it before verification."""

    name: str
    length: int
    sha256: str
    custom: dict[str, Any]


class _CallableFetcher(FetcherInterface):
    """Adapts a `Fetch` callable (bytes over MQTT, or a directory in tests) to python-tuf."""

    def __init__(self, fetch: Fetch):
        self._get = fetch

    def _fetch(self, url: str) -> Iterator[bytes]:
        try:
            return iter((self._get(url),))
        except FileNotFoundError as exc:
            raise exceptions.DownloadHTTPError(f"{url} not found", 404) from exc


def _refusal(exc: exceptions.RepositoryError, clock: Clock | None = None) -> TrustError:
    if isinstance(exc, exceptions.ExpiredMetadataError):
        return _expired(str(exc), clock)
    if isinstance(exc, exceptions.UnsignedMetadataError):
        return TrustError("bad-signature", f"metadata is not signed by a trusted key: {exc}")
    if isinstance(exc, exceptions.BadVersionNumberError):
        return TrustError("rollback", f"metadata is older than what this device trusts (replay?): {exc}")
    if isinstance(exc, exceptions.LengthOrHashMismatchError):
        return TrustError("hash-mismatch", f"metadata does not match its signed hash: {exc}")
    return TrustError("bad-metadata", f"metadata refused: {exc}")


def _expired(message: str, clock: Clock | None) -> ExpiredMetadata:
    skew = clock.skew() if clock is not None else None
    return ExpiredMetadata(f"{message}; {skew['reason']}" if skew else message)


def _signed_target(name: str, info: TargetFile) -> SignedTarget:
    if "sha256" not in info.hashes or not isinstance(info.custom, dict):
        raise TrustError("bad-metadata", f"signed metadata of {name} lacks a sha256 or custom fields")
    return SignedTarget(name, info.length, info.hashes["sha256"], info.custom)


def _version_key(version: Any) -> tuple[int, ...]:
    """Numeric dotted order ("1.10.0" > "1.9.0", "1.2" == "1.2.0") without depending on `packaging`."""
    if not isinstance(version, str) or not NUMERIC_VERSION.fullmatch(version):
        raise TrustError("bad-metadata", f"version {version!r} is not numbers and dots")
    parts = [int(p) for p in version.split(".")]
    while len(parts) > 1 and parts[-1] == 0:
        parts.pop()
    return tuple(parts)


def _issued(signed: Any) -> float | None:
    """The fleet's signed issue time of a timestamp (wire.ISSUED_FIELD), None if absent or malformed."""
    try:
        issued = datetime.strptime(signed.unrecognized_fields[ISSUED_FIELD], ISSUED_FORMAT)
    except (KeyError, TypeError, ValueError):
        return None
    return issued.replace(tzinfo=timezone.utc).timestamp()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class TrustStore:
    """Trusted TUF metadata in `state_dir`; one instance per agent process."""

    def __init__(self, state_dir: str | Path):
        self.dir = Path(state_dir)
        self.clock = Clock(self.dir / "clock.json")
        self._updater: Updater | None = None
        self._expires = datetime.min.replace(tzinfo=timezone.utc)
        if self.has_root():
            self._observe()

    def has_root(self) -> bool:
        return (self.dir / "root.json").exists()

    def pin_root(self, root_bytes: bytes) -> None:
        """Trust this root from now on (enrollment); later roots are reached only through refresh()."""
        if self.has_root():
            raise EdgeopsError(f"{self.dir} already trusts a root; remove it to enroll the device again")
        self.dir.mkdir(parents=True, exist_ok=True)
        try:
            Updater(str(self.dir), METADATA_BASE, bootstrap=root_bytes)  # verifies and persists; fetches nothing
        except exceptions.RepositoryError as exc:
            raise _refusal(exc) from None
        finally:
            self._sync()
        self._observe()

    def refresh(self, fetch: Fetch) -> None:
        """Update root (chain), timestamp, snapshot and targets through `fetch`, verifying each."""
        if not self.has_root():
            raise EdgeopsError(f"{self.dir} has no pinned root; enroll the device first")
        self._updater = None
        answered = False
        try:
            try:
                updater = Updater(str(self.dir), METADATA_BASE, fetcher=_CallableFetcher(fetch), bootstrap=None)
                self._judge_at_floor(updater)
                updater.refresh()
                answered = True
            except exceptions.RepositoryError:
                answered = True  # the fleet answered; what it sent was refused
                raise
            finally:  # whatever python-tuf saved is verified: durable, and evidence for the clock
                self._sync()
                self._observe(answered)
        except exceptions.DownloadLengthMismatchError as exc:
            raise TrustError("length", f"metadata is longer than allowed: {exc}") from None
        except exceptions.DownloadError as exc:  # the transport's own error, for the caller to retry
            raise exc.__cause__ or exc
        except exceptions.RepositoryError as exc:
            raise _refusal(exc, self.clock) from None
        self._expires = min(Metadata.from_file(str(self.dir / f"{role}.json")).signed.expires for role in TOP_LEVEL)
        self._check_expiry()
        self._updater = updater

    def _judge_at_floor(self, updater: Updater) -> None:
        """python-tuf judges expiry at the time floor, so a clock set forward still fetches the fleet's
        fresh metadata (its signed time shows by how much the clock is off); `_check_expiry` then
        judges at the later of floor and wall clock. python-tuf sets its reference time once, from
        the wall clock, in an internal object: fail loudly if that changes."""
        trusted = getattr(updater, "_trusted_set", None)
        if not hasattr(trusted, "reference_time"):
            raise RuntimeError("this python-tuf has no Updater._trusted_set.reference_time, which edgeops "
                               "sets to judge expiry at its time floor")
        trusted.reference_time = datetime.fromtimestamp(self.clock.floor(), timezone.utc)

    def _observe(self, fetched: bool = False) -> None:
        """Hand what the trusted metadata on disk (all of it verified) says about the time to the clock;
        `fetched`: it comes from a refresh that reached the fleet."""
        signed = {}
        for role in TOP_LEVEL:
            try:
                signed[role] = Metadata.from_bytes((self.dir / f"{role}.json").read_bytes()).signed
            except (OSError, DeserializationError):  # absent, or damaged: python-tuf ignores it too
                continue
        if "root" not in signed:
            return
        expiry = {role: s.expires.timestamp() for role, s in signed.items()}
        timestamp = signed.get("timestamp")
        self.clock.observe(fetched=fetched, evidence=Evidence(
            issued=_issued(timestamp) if timestamp else None,
            timestamp_expires=expiry.get("timestamp", expiry["root"]),
            earliest_expires=min(expiry.values()),
            offline_expires=min(expiry["root"], expiry.get("targets", expiry["root"]))))

    def _check_expiry(self) -> None:
        now = self.clock.now()
        if now >= self._expires:
            raise _expired(f"signed metadata expired at {self._expires.isoformat()}, judged at {now.isoformat()} "
                           f"(the later of this device's clock and its time floor)", self.clock)

    def _sync(self) -> None:
        history = self.dir / "root_history"
        for path in [*self.dir.glob("*.json"), *history.glob("*.root.json")]:
            if not path.is_symlink():
                _fsync(path)
        for directory in (history, self.dir):
            if directory.is_dir():
                _fsync(directory)

    def _target_file(self, name: str) -> TargetFile:
        if self._updater is None:
            raise RuntimeError("TrustStore.refresh() must succeed before targets are looked up")
        self._check_expiry()
        info = self._updater.get_targetinfo(name)
        if info is None:
            raise TrustError("unknown-target", f"{name} is not in the signed targets metadata")
        return info

    def listed(self, name: str) -> bool:
        """Whether the signed targets metadata (as of the last refresh) still lists `name`."""
        try:
            self._target_file(name)
        except ExpiredMetadata:
            raise
        except TrustError:
            return False
        return True

    def target_info(self, name: str) -> SignedTarget:
        """The signed length, sha256 and custom metadata of `name`, to download it."""
        return _signed_target(name, self._target_file(name))

    def verify_target(self, target_name: str, data: bytes, profile: str, installed_version: str | None) -> dict[str, Any]:
        """Check `data` is exactly the signed target, built for `profile` and newer than what is installed.

        Returns the target's custom metadata (model, version, profile); raises TrustError otherwise.
        """
        info = self._target_file(target_name)
        custom = _signed_target(target_name, info).custom
        if len(data) != info.length:
            raise TrustError("length", f"{target_name} is {len(data)} bytes but {info.length} were signed")
        try:
            info.verify_length_and_hashes(data)
        except exceptions.LengthOrHashMismatchError:
            raise TrustError("hash-mismatch", f"{target_name} does not match its signed sha256 (changed in transit?)") from None
        if custom.get("profile") != profile:
            raise TrustError("wrong-profile", f"{target_name} is for profile {custom.get('profile')!r}, this device is {profile!r}")
        version = _version_key(custom.get("version"))
        if installed_version is not None and version <= _version_key(installed_version):
            raise TrustError("rollback", f"{target_name} is version {custom['version']}, not newer than installed {installed_version}")
        return dict(custom)
