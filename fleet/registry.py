"""The fleet's registry: devices, releases and per-device executions, in SQLite via sqlite-utils.

Invariants: the database is the only fleet state besides the TUF repository; every write is one
transaction; execution rows only move between the states in `edgeops.protocol.wire.STATES`; every
device has a `credentials` row with the salted hash of its broker password, never the password; a
device's desired release is derived (newest release whose selector matches the device's labels and
that has a bundle for its profile), never stored, so enrolling later or relabelling needs no fix-up.
"""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path
from typing import Any

import sqlite_utils

from edgeops.fleet import telemetry
from edgeops.protocol.errors import EdgeopsError
from edgeops.protocol.wire import DEVICE_ID, STATES


def open_db(path: str | Path) -> sqlite_utils.Database:
    """Open (creating if needed) the registry: WAL for concurrent readers, FULL sync so a power cut loses nothing.

    The connection may be used from several threads; callers serialize access (the server holds a lock).
    """
    db = sqlite_utils.Database(sqlite3.connect(str(path), check_same_thread=False))
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db["devices"].create(
        {"id": str, "profile": str, "labels": str, "enrolled_at": float, "last_seen": float, "online": int,
         "installed_model": str, "installed_version": str, "installed_target": str, "slot": str},
        pk="id", if_not_exists=True, not_null={"profile", "labels"},
    )
    db["releases"].create(
        {"id": int, "model": str, "version": str, "selector": str, "created_at": float},
        pk="id", if_not_exists=True,
    )
    db["release_targets"].create(
        {"release_id": int, "profile": str, "target": str, "sha256": str, "length": int},
        pk=("release_id", "profile"), foreign_keys=[("release_id", "releases", "id")], if_not_exists=True,
    )
    db["credentials"].create({"device": str, "password_hash": str}, pk="device", if_not_exists=True,
                             not_null={"password_hash"})
    db["executions"].create(
        {"device": str, "release_id": int, "state": str, "reason": str, "updated_at": float},
        pk=("device", "release_id"), if_not_exists=True,
    )
    telemetry.create_tables(db)
    return db


def enroll(db: sqlite_utils.Database, device_id: str, profile: str, labels: dict[str, str], password_hash: str) -> None:
    """Add a device and the hash of its broker password, in one transaction."""
    if not DEVICE_ID.match(device_id):
        raise EdgeopsError(f"device id {device_id!r} must be 1-64 letters, digits, '.', '_' or '-'")
    if db["devices"].count_where("id = ?", [device_id]):
        raise EdgeopsError(f"device {device_id} is already enrolled")
    with db.conn:  # plain SQL: sqlite-utils' insert() commits on its own, which would split the pair
        db.execute("insert into devices (id, profile, labels, enrolled_at, online) values (?, ?, ?, ?, 0)",
                   [device_id, profile, json.dumps(labels, sort_keys=True), time.time()])
        db.execute("insert into credentials (device, password_hash) values (?, ?)", [device_id, password_hash])


def password_hashes(db: sqlite_utils.Database) -> dict[str, str]:
    """Device id -> broker password hash, for every device enrolled with credentials."""
    return {row["device"]: row["password_hash"] for row in db["credentials"].rows_where(order_by="device")}


def parse_labels(pairs: tuple[str, ...] | list[str]) -> dict[str, str]:
    """`k=v` strings (from --label/--select) as a dict; EdgeopsError for anything else."""
    labels = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise EdgeopsError(f"label {pair!r} must look like key=value")
        labels[key] = value
    return labels


def matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def create_release(db: sqlite_utils.Database, model: str, version: str, selector: dict[str, str],
                   targets: list[dict[str, Any]]) -> int:
    """Register a release: one bundle (target) per profile."""
    profiles = [t["profile"] for t in targets]
    if len(set(profiles)) != len(profiles):
        raise EdgeopsError(f"a release holds one bundle per profile; got {sorted(profiles)}")
    with db.conn:
        release_id = db["releases"].insert({"model": model, "version": version, "selector": json.dumps(selector, sort_keys=True),
                                            "created_at": time.time()}).last_pk
        db["release_targets"].insert_all([{"release_id": release_id, **t} for t in targets])
    return release_id


def device(db: sqlite_utils.Database, device_id: str) -> dict[str, Any] | None:
    rows = list(db["devices"].rows_where("id = ?", [device_id]))
    return _device_row(rows[0]) if rows else None


def _device_row(row: dict[str, Any]) -> dict[str, Any]:
    return {**row, "labels": json.loads(row["labels"]), "online": bool(row["online"])}


def generation(db: sqlite_utils.Database) -> tuple[Any, ...]:
    """Changes whenever a device's desired release may have changed (a release or an enrollment):
    a cheap check before recomputing every device's `desired`."""
    return tuple(db.execute("select (select max(id) from releases), (select count(*) from release_targets), "
                            "(select count(*) from devices), (select max(enrolled_at) from devices)").fetchone())


def desired(db: sqlite_utils.Database, device_id: str) -> dict[str, Any] | None:
    """The release this device should run: the newest matching one with a bundle for its profile."""
    dev = device(db, device_id)
    if dev is None:
        return None
    rows = db.query(
        "select r.id as release_id, r.model, r.version, r.selector, t.target, t.sha256, t.length "
        "from releases r join release_targets t on t.release_id = r.id where t.profile = ? order by r.id desc",
        [dev["profile"]],
    )
    for row in rows:
        if matches(json.loads(row.pop("selector")), dev["labels"]):
            return row
    return None


def record_reports(db: sqlite_utils.Database, reports: list[tuple[str, dict[str, Any]]]) -> None:
    """Store what devices reported about themselves (`state` messages, oldest first) in one
    transaction, so a burst of reports costs one sync, not one each. Unknown devices are ignored:
    the broker ACL should have stopped them."""
    now = time.time()
    with db.conn:
        for device_id, state in reports:
            if state.get("online") is False:
                db.execute("update devices set online = 0, last_seen = ? where id = ?", [now, device_id])
                continue
            installed = state.get("installed") if isinstance(state.get("installed"), dict) else {}
            known = db.execute(
                "update devices set last_seen = ?, online = 1, installed_model = ?, installed_version = ?, "
                "installed_target = ?, slot = ? where id = ?",
                [now, *(_text(installed.get(k)) for k in ("model", "version", "target", "slot")), device_id],
            ).rowcount
            execution = state.get("execution")
            if known and isinstance(execution, dict) and execution.get("state") in STATES \
                    and isinstance(execution.get("release"), int) and not isinstance(execution["release"], bool):
                db.execute(
                    "insert into executions (device, release_id, state, reason, updated_at) values (?, ?, ?, ?, ?) "
                    "on conflict (device, release_id) do update set state = excluded.state, "
                    "reason = excluded.reason, updated_at = excluded.updated_at",
                    [device_id, execution["release"], execution["state"], str(execution.get("reason") or "")[:500], now],
                )


def _text(value: Any) -> str | None:
    return None if value is None else str(value)[:200]


def _with_execution(db: sqlite_utils.Database, dev: dict[str, Any]) -> dict[str, Any]:
    latest = list(db["executions"].rows_where("device = ?", [dev["id"]], order_by="release_id desc", limit=1))
    return {**dev, "execution": latest[0] if latest else None}


def devices(db: sqlite_utils.Database) -> list[dict[str, Any]]:
    """Every device, by id, with its latest execution (None before its first report) and a summary
    of its telemetry (None before any arrived)."""
    summaries = telemetry.device_summaries(db)
    return [{**_with_execution(db, _device_row(row)), "telemetry": summaries.get(row["id"])}
            for row in db["devices"].rows_where(order_by="id")]


def device_detail(db: sqlite_utils.Database, device_id: str) -> dict[str, Any] | None:
    """One device as in `devices()`, plus the release it should run (`desired`, None if no release matches)."""
    dev = device(db, device_id)
    if dev is None:
        return None
    return {**_with_execution(db, dev), "telemetry": telemetry.device_summaries(db, device_id).get(device_id),
            "desired": desired(db, device_id)}


def releases(db: sqlite_utils.Database) -> list[dict[str, Any]]:
    """Every release, oldest first, with its selector and one target per profile."""
    found = []
    for row in db["releases"].rows_where(order_by="id"):
        row["selector"] = json.loads(row["selector"])
        row["targets"] = list(db["release_targets"].rows_where("release_id = ?", [row["id"]], order_by="profile"))
        found.append(row)
    return found


def status(db: sqlite_utils.Database) -> dict[str, Any]:
    """Devices with their latest execution, and releases: what `edgeops status` shows."""
    return {"devices": devices(db), "releases": releases(db)}
