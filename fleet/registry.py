"""The fleet's registry: devices, releases and per-device executions, in SQLite via sqlite-utils.

Invariants: the database is the only fleet state besides the TUF repository; every write is one
transaction; execution rows only move between the states in `edgeops.protocol.wire.STATES`; every
certificate the fleet CA issued is in `certificates` (serial, subject, expiry), never its key.
A revoked device leaves `devices` for `revoked_devices` (kept for history) in one transaction with
its certificates' revocation, so no rollout, gate or telemetry query can see it again; only an
explicit re-enrollment brings the id back, with a new certificate.
A device's desired release (`devices.desired_release`) is written only by the rollout engine
(edgeops.fleet.rollout), which bumps `desired_seq` with it, so the server republishes only on change.
Every release has exactly one rollout, with the same id, created in the same transaction.

The fleet decides; devices only report. A `state` message is evidence about its device only: it
updates what the device says it runs (`installed_*`, `clock`, online), and moves an `executions`
row only as `rollout.report_verdict` allows, i.e. a row the engine created when it assigned that
release to that device. Rollout membership and desired releases come only from the engine's own
rows, never from a report nor from `desired` messages (the fleet does not read those). A report
that claims a release the fleet did not assign to the device, or a different outcome for a release
it no longer runs (a replayed or forged `desired` makes agents do that), is an `anomalies` row: one
per device, the latest claim, what the fleet had assigned, first and last time and how many; shown
in `status`, `devices` and `device_detail`, counted in nothing.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import time
from pathlib import Path
from typing import Any

import sqlite_utils

from edgeops.fleet import derived, rollout, telemetry
from edgeops.fleet.sql import transaction
from edgeops.fleet.plan import Plan
from edgeops.protocol import certs
from edgeops.protocol.errors import EdgeopsError
from edgeops.protocol.wire import DEVICE_ID

log = logging.getLogger(__name__)


def open_db(path: str | Path) -> sqlite_utils.Database:
    """Open (creating if needed) the registry: WAL for concurrent readers, FULL sync so a power cut loses nothing.

    The connection may be used from several threads; callers serialize access (the server holds a lock).
    """
    db = sqlite_utils.Database(sqlite3.connect(str(path), check_same_thread=False))
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db["devices"].create(
        {"id": str, "profile": str, "labels": str, "enrolled_at": float, "last_seen": float, "online": int,
         "installed_model": str, "installed_version": str, "installed_target": str, "slot": str,
         "desired_release": int, "desired_seq": int},
        pk="id", if_not_exists=True, not_null={"profile", "labels"},
    )
    for column in ("desired_release", "desired_seq"):  # registries made before rollouts existed
        if column not in db["devices"].columns_dict:
            db["devices"].add_column(column, int)
    # max(desired_seq): `generation()` several times a second in the server, and each engine assignment
    db.execute("create index if not exists devices_by_desired_seq on devices (desired_seq)")
    if "clock" not in db["devices"].columns_dict:  # a wrong wall clock the device reports (agent/clock.py)
        db["devices"].add_column("clock", str)
    db["releases"].create(
        {"id": int, "model": str, "version": str, "selector": str, "created_at": float},
        pk="id", if_not_exists=True,
    )
    db["release_targets"].create(
        {"release_id": int, "profile": str, "target": str, "sha256": str, "length": int},
        pk=("release_id", "profile"), foreign_keys=[("release_id", "releases", "id")], if_not_exists=True,
    )
    # Serials are 159-bit: stored as decimal text, beyond SQLite's integers.
    db["certificates"].create({"serial": str, "subject": str, "not_after": float, "issued_at": float, "revoked_at": float,
                               "pem": str},
                              pk="serial", if_not_exists=True, not_null={"subject", "not_after"})
    db["revoked_devices"].create({"id": str, "profile": str, "labels": str, "enrolled_at": float, "revoked_at": float,
                                  "reason": str, "refused_messages": int}, pk="id", if_not_exists=True,
                                 defaults={"refused_messages": 0}, not_null={"refused_messages"})
    db["executions"].create(
        {"device": str, "release_id": int, "state": str, "reason": str, "updated_at": float},
        pk=("device", "release_id"), if_not_exists=True,
    )
    rollout.create_tables(db)
    telemetry.create_tables(db)
    derived.create_tables(db)
    _create_anomalies(db)
    return db


def check_enrollable(db: sqlite_utils.Database, device_id: str, replace_revoked: bool = False) -> None:
    """Raise unless `device_id` may be enrolled now: a valid id, not enrolled, and not revoked
    unless `replace_revoked` (re-enrolling a revoked id must be asked for)."""
    if not DEVICE_ID.match(device_id):
        raise EdgeopsError(f"device id {device_id!r} must be 1-64 letters, digits, '.', '_' or '-'")
    if db["devices"].count_where("id = ?", [device_id]):
        raise EdgeopsError(f"device {device_id} is already enrolled")
    if not replace_revoked and db["revoked_devices"].count_where("id = ?", [device_id]):
        raise EdgeopsError(f"device {device_id} was revoked; enroll it again only on purpose, with --re-enroll")


def enroll(db: sqlite_utils.Database, device_id: str, profile: str, labels: dict[str, str], cert_pem: bytes,
           replace_revoked: bool = False) -> None:
    """Add a device and its certificate, in one transaction."""
    check_enrollable(db, device_id, replace_revoked)
    now = time.time()
    with transaction(db):
        if db.execute("delete from revoked_devices where id = ?", [device_id]).rowcount:
            # a new identity under an old name: nothing of the revoked one is counted for it (its seqs
            # start again at 1, it was never assigned anything)
            for table in ("executions", "telemetry", "telemetry_devices", "device_telemetry", "anomalies"):
                db.execute(f"delete from {table} where device = ?", [device_id])
        db.execute("insert into devices (id, profile, labels, enrolled_at, online) values (?, ?, ?, ?, 0)",
                   [device_id, profile, json.dumps(labels, sort_keys=True), now])
        _insert_certificate(db, device_id, cert_pem, now)


def add_certificate(db: sqlite_utils.Database, device_id: str, cert_pem: bytes) -> None:
    """Record a renewed certificate of an enrolled device."""
    with transaction(db):
        _insert_certificate(db, device_id, cert_pem, time.time())


def _insert_certificate(db: sqlite_utils.Database, device_id: str, cert_pem: bytes, now: float) -> None:
    serial, not_after = certs.serial_and_expiry(cert_pem)
    db.execute("insert into certificates (serial, subject, not_after, issued_at, pem) values (?, ?, ?, ?, ?)",
               [str(serial), device_id, not_after, now, cert_pem.decode()])


def latest_certificates(db: sqlite_utils.Database) -> dict[str, dict[str, Any]]:
    """Enrolled device id -> its newest unrevoked certificate: {serial, not_after, pem}."""
    rows = db.execute("select c.subject, c.serial, c.not_after, c.pem from certificates c join devices d on d.id = c.subject "
                      "where c.revoked_at is null order by c.not_after").fetchall()
    return {subject: {"serial": serial, "not_after": not_after, "pem": pem} for subject, serial, not_after, pem in rows}


def revoke(db: sqlite_utils.Database, device_id: str, reason: str = "") -> list[int]:
    """Revoke a device: out of `devices` into `revoked_devices`, every certificate of it revoked; the
    serials revoked. Its executions stay, as history, cancelled."""
    row = db.execute("select id, profile, labels, enrolled_at from devices where id = ?", [device_id]).fetchone()
    if row is None:
        raise EdgeopsError(f"no enrolled device {device_id}; `edgeops status` lists them")
    now = time.time()
    with transaction(db):
        db.execute("insert or replace into revoked_devices (id, profile, labels, enrolled_at, revoked_at, reason) "
                   "values (?, ?, ?, ?, ?, ?)", [*row, now, reason])
        db.execute("delete from devices where id = ?", [device_id])
        db.execute("update certificates set revoked_at = ? where subject = ? and revoked_at is null", [now, device_id])
        # out of every rollout: no quota, gate or baseline counts it (cancelled is not assigned)
        db.execute("update executions set state = 'cancelled', reason = 'device revoked', updated_at = ? "
                   "where device = ? and state not in ('rolled-back', 'cancelled')", [now, device_id])
    return [int(s) for (s,) in db.execute("select serial from certificates where subject = ? and revoked_at = ?",
                                          [device_id, now])]


CERT_WARNING_S = 30 * 86400


def expiring_certificates(db: sqlite_utils.Database, within_s: float = CERT_WARNING_S) -> list[dict[str, Any]]:
    """Enrolled devices whose newest certificate expires within `within_s` (or has expired), soonest first."""
    soon = time.time() + within_s
    return sorted(({"device": device, "not_after": cert["not_after"]} for device, cert in latest_certificates(db).items()
                   if cert["not_after"] < soon), key=lambda c: c["not_after"])


def revoked_serials(db: sqlite_utils.Database) -> list[int]:
    return [int(s) for (s,) in db.execute("select serial from certificates where revoked_at is not null")]


def revoked_ids(db: sqlite_utils.Database) -> list[str]:
    return [i for (i,) in db.execute("select id from revoked_devices order by id")]


def revoked(db: sqlite_utils.Database) -> list[dict[str, Any]]:
    """Revoked devices, newest first, with what still arrived from them and was refused."""
    return [dict(r) for r in db.query("select id, revoked_at, reason, refused_messages from revoked_devices "
                                      "order by revoked_at desc")]


def identities_generation(db: sqlite_utils.Database) -> tuple[Any, ...]:
    """Changes when a certificate is issued or revoked: when the broker's CRL and ACL must follow."""
    return tuple(db.execute("select count(*), max(issued_at), max(revoked_at) from certificates").fetchone())


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
                   targets: list[dict[str, Any]], plan: Plan | None = None) -> int:
    """Register a release (one bundle, or target, per profile) and start its rollout under `plan`
    (default: the safe staged plan), superseding unfinished rollouts of the same model."""
    profiles = [t["profile"] for t in targets]
    if len(set(profiles)) != len(profiles):
        raise EdgeopsError(f"a release holds one bundle per profile; got {sorted(profiles)}")
    with transaction(db):
        release_id = db.execute("insert into releases (model, version, selector, created_at) values (?, ?, ?, ?)",
                                [model, version, json.dumps(selector, sort_keys=True), time.time()]).lastrowid
        db.conn.executemany("insert into release_targets (release_id, profile, target, sha256, length) values (?, ?, ?, ?, ?)",
                            [(release_id, t["profile"], t["target"], t["sha256"], t["length"]) for t in targets])
        rollout.start(db, release_id, model, plan or Plan())
    return release_id


def device(db: sqlite_utils.Database, device_id: str) -> dict[str, Any] | None:
    rows = list(db["devices"].rows_where("id = ?", [device_id]))
    return _device_row(rows[0]) if rows else None


def _device_row(row: dict[str, Any]) -> dict[str, Any]:
    row.pop("desired_seq", None)  # the engine's change counter, not a fact about the device
    return {**row, "labels": json.loads(row["labels"]), "online": bool(row["online"])}


def generation(db: sqlite_utils.Database) -> tuple[Any, ...]:
    """Changes whenever a device's desired release changed (the engine bumps `desired_seq`) or a
    device enrolled: a cheap check before reading every device's `desired`."""
    return tuple(db.execute("select max(desired_seq), count(*) from devices").fetchone())


_DESIRED = ("select d.id as device, r.id as release_id, r.model, r.version, t.target, t.sha256, t.length "
            "from devices d join releases r on r.id = d.desired_release "
            "join release_targets t on t.release_id = r.id and t.profile = d.profile")


def desired(db: sqlite_utils.Database, device_id: str) -> dict[str, Any] | None:
    """The release the rollout engine chose for this device, with the bundle for its profile; None before any."""
    rows = [dict(row) for row in db.query(f"{_DESIRED} where d.id = ?", [device_id])]
    return {k: v for k, v in rows[0].items() if k != "device"} if rows else None


def all_desired(db: sqlite_utils.Database) -> dict[str, dict[str, Any] | None]:
    """Every device's `desired()` in one query."""
    found: dict[str, dict[str, Any] | None] = {row["id"]: None for row in db.query("select id from devices")}
    for row in db.query(_DESIRED):
        found[row.pop("device")] = row
    return found


def record_reports(db: sqlite_utils.Database, reports: list[tuple[str, dict[str, Any]]]) -> None:
    """Store what devices reported about themselves (`state` messages, oldest first) in one
    transaction, so a burst of reports costs one sync, not one each. Unknown devices are ignored:
    the broker ACL should have stopped them. An execution claim goes through `_record_execution`."""
    now = time.time()
    with transaction(db):
        for device_id, state in reports:
            if state.get("online") is False:
                db.execute("update devices set online = 0, last_seen = ? where id = ?", [now, device_id])
                continue
            installed = state.get("installed") if isinstance(state.get("installed"), dict) else {}
            known = db.execute(
                "update devices set last_seen = ?, online = 1, installed_model = ?, installed_version = ?, "
                "installed_target = ?, slot = ?, clock = ? where id = ?",
                [now, *(_text(installed.get(k)) for k in ("model", "version", "target", "slot")),
                 _clock(state.get("clock")), device_id],
            ).rowcount
            if not known:  # the broker should have refused it: counted if it was revoked
                db.execute("update revoked_devices set refused_messages = refused_messages + 1 where id = ?", [device_id])
            execution = state.get("execution")
            if known and isinstance(execution, dict) and isinstance(execution.get("state"), str) \
                    and type(execution.get("release")) is int:
                _record_execution(db, device_id, execution, now)


SQLITE_MAX_INT = 2**63 - 1  # a release id past it names nothing (and SQLite refuses to bind it)


def _record_execution(db: sqlite_utils.Database, device_id: str, execution: dict[str, Any], now: float) -> None:
    """Apply a device's execution report to the fleet's row, ignore it, or record an anomaly
    (rollout.report_verdict decides)."""
    release, reported = execution["release"], execution["state"]
    reason = str(execution.get("reason") or "")[:500]
    stored, desired = db.execute(
        "select e.state, d.desired_release from devices d left join executions e on e.device = d.id "
        "and e.release_id = ? where d.id = ?", [release if 0 < release <= SQLITE_MAX_INT else 0, device_id]).fetchone()
    verdict = rollout.report_verdict(reported, stored, release, desired)
    if verdict == "apply":
        db.execute("update executions set state = ?, reason = ?, updated_at = ? where device = ? and release_id = ?",
                   [reported, reason, now, device_id, release])
    elif verdict == "anomaly":
        claimed = f"release {release} {reported[:40]}{': ' + reason if reason else ''}"
        assigned = f"release {desired}" if desired is not None else "no release"
        _anomaly(db, device_id, claimed[:500], assigned + (f" (release {release}: {stored})" if stored else ""), now)


def _create_anomalies(db: sqlite_utils.Database) -> None:
    db.execute("create table if not exists anomalies (device text primary key, claimed text not null, "
               "assigned text not null, first_at real not null, last_at real not null, count integer not null)")


def _anomaly(db: sqlite_utils.Database, device_id: str, claimed: str, assigned: str, now: float) -> None:
    """Record that `device_id` claimed something its records contradict; logged when the claim is new."""
    before = db.execute("select claimed from anomalies where device = ?", [device_id]).fetchone()
    db.execute("insert into anomalies (device, claimed, assigned, first_at, last_at, count) values (?, ?, ?, ?, ?, 1) "
               "on conflict (device) do update set claimed = excluded.claimed, assigned = excluded.assigned, "
               "last_at = excluded.last_at, count = count + 1", [device_id, claimed, assigned, now, now])
    if before is None or before[0] != claimed:
        log.warning("device %s claims %s, but the fleet assigned it %s: recorded as an anomaly, counted nowhere",
                    device_id, claimed, assigned)


_ANOMALY = ("claimed", "assigned", "first_at", "last_at", "count")


def anomalies(db: sqlite_utils.Database, limit: int = 50) -> list[dict[str, Any]]:
    """The devices whose reports disagreed with the fleet's records, the latest first (see the module docstring)."""
    return [dict(row) for row in db.query(f"select device, {', '.join(_ANOMALY)} from anomalies "
                                          "order by last_at desc, device limit ?", [limit])]


def anomaly(db: sqlite_utils.Database, device_id: str) -> dict[str, Any] | None:
    """The latest claim of this device that disagreed with the fleet's records; None if it never did."""
    rows = list(db.query(f"select {', '.join(_ANOMALY)} from anomalies where device = ?", [device_id]))
    return rows[0] if rows else None


def _clock(report: Any) -> str | None:
    """A device's report that its wall clock is wrong, as "status: reason"; None while it is right."""
    if not isinstance(report, dict) or not report.get("status"):
        return None
    return f"{_text(report['status'])}: {str(report.get('reason') or '')[:400]}"


def _text(value: Any) -> str | None:
    return None if value is None else str(value)[:200]


def _with_execution(db: sqlite_utils.Database, dev: dict[str, Any]) -> dict[str, Any]:
    latest = list(db["executions"].rows_where("device = ?", [dev["id"]], order_by="release_id desc", limit=1))
    return {**dev, "execution": latest[0] if latest else None}


_EXECUTION = ("release_id", "state", "reason", "updated_at")
_TELEMETRY = ("received", "dropped", "rejected_batches", "inferences", "errors", "p95_ms", "metrics")
_LATEST = ("left join executions e on e.device = d.id "
           "and e.release_id = (select max(release_id) from executions where device = d.id)")
_DEVICES = (f"select d.*, {', '.join(f'e.{c}' for c in _EXECUTION)}, t.received, t.dropped, t.rejected_batches, "
            f"coalesce(s.inferences, 0), coalesce(s.errors, 0), s.p95_ms, s.metrics, {', '.join(f'a.{c}' for c in _ANOMALY)} "
            f"from devices d {_LATEST} left join telemetry_devices t on t.device = d.id "
            "left join device_telemetry s on s.device = d.id left join anomalies a on a.device = d.id "
            "where {where} order by d.id")
# rollout.attention's rule in SQL: the latest execution failed, or offline while behind its desired release
_NEEDS_ATTENTION = (f"e.state in ({', '.join(repr(s) for s in rollout.FAILED)}) or (coalesce(d.online, 0) = 0 "
                    "and d.desired_release and (e.state is null or e.state != 'active' or e.release_id != d.desired_release)) "
                    "or d.clock is not null")
DEFAULT_PAGE, MAX_PAGE = 100, 1000  # devices per page of `page()` (GET /v1/devices)
LISTED = 50  # past this many devices, `status` lists only those that need attention, and counts the others


def devices(db: sqlite_utils.Database, only: list[str] | None = None) -> list[dict[str, Any]]:
    """Every device (or those in `only`), by id, with its latest execution (None before its first
    report), a summary of its telemetry (None before any arrived) as `telemetry.device_summaries`
    computes it, and its latest `anomaly` (None if its reports never disagreed with the fleet): one query, the summaries brought up to date from the records added since (fleet/derived.py)."""
    if only is None:
        derived.refresh_devices(db)
    else:
        derived.refresh_listed(db, only)
    cursor = db.execute(_DEVICES.format(where="1" if only is None else "d.id in (select value from json_each(?))"),
                        [] if only is None else [json.dumps(only)])
    width = len(cursor.description) - len(_EXECUTION) - len(_TELEMETRY) - len(_ANOMALY)
    names = [c[0] for c in cursor.description[:width]]
    found = []
    for row in cursor:
        execution = row[width:width + len(_EXECUTION)]
        summary = row[width + len(_EXECUTION):width + len(_EXECUTION) + len(_TELEMETRY)]
        claim = row[len(row) - len(_ANOMALY):]
        dev = _device_row(dict(zip(names, row[:width])))
        dev["execution"] = None if execution[0] is None else {"device": dev["id"], **dict(zip(_EXECUTION, execution))}
        if summary[0] is None:
            dev["telemetry"] = None
        else:
            dev["telemetry"] = dict(zip(_TELEMETRY, summary))
            dev["telemetry"]["metrics"] = None if summary[-1] is None else json.loads(summary[-1])
        dev["anomaly"] = None if claim[0] is None else dict(zip(_ANOMALY, claim))
        found.append(dev)
    return found


def page(db: sqlite_utils.Database, after: str = "", limit: int = DEFAULT_PAGE, online: bool | None = None,
         state: str | None = None, terms: tuple[str, ...] = ()) -> dict[str, Any]:
    """Up to `limit` devices as `devices()` gives them, the first ids past `after` matching the filters
    (online; `state` of the latest execution, "none" before the first report; every term a substring of
    id, profile, a label k=v, the state or installed version), with `next` (the id to pass as `after`
    for the following page; None on the last) and `total` (how many match). Keyset paging on the
    primary key: a page reads `limit` devices, whatever the fleet's size, besides one count."""
    where, params = ["1"], []
    if online is not None:
        where.append(f"coalesce(d.online, 0) {'!=' if online else '='} 0")
    if state is not None:
        where.append("coalesce(e.state, 'none') = ?")
        params.append(state)
    for term in terms:
        where.append(f"instr(lower({_SEARCH}), ?) > 0")
        params.append(term.lower())
    base = f"from devices d {_LATEST if state is not None or terms else ''} where {' and '.join(where)}"
    ids = [row[0] for row in db.execute(f"select d.id {base} and d.id > ? order by d.id limit ?", [*params, after, limit + 1])]
    total = db.execute(f"select count(*) {base}", params).fetchone()[0]
    return {"devices": devices(db, ids[:limit]), "next": ids[limit - 1] if len(ids) > limit else None, "total": total}


# what a dashboard filter term matches: id, profile, labels as k=v, latest execution state, installed version
_SEARCH = ("d.id || ' ' || d.profile || ' ' || coalesce((select group_concat(key || '=' || value, ' ') "
           "from json_each(d.labels)), '') || ' ' || coalesce(e.state, '') || ' ' || coalesce(d.installed_version, '')")


def _census(db: sqlite_utils.Database) -> tuple[dict[str, Any], list[str]]:
    """`device_counts`, and the ids of the devices that need attention, in one pass over the devices."""
    rows = db.execute(f"select coalesce(e.state, 'none'), count(*), sum(coalesce(d.online, 0) != 0), "
                      f"group_concat(case when {_NEEDS_ATTENTION} then d.id end) from devices d {_LATEST} "
                      "group by 1 order by 1").fetchall()
    counts = {"total": sum(row[1] for row in rows), "online": sum(row[2] for row in rows),
              "states": {state: n for state, n, _, _ in rows}}
    return counts, sorted(device for row in rows if row[3] for device in row[3].split(","))  # ids hold no ','


def device_counts(db: sqlite_utils.Database) -> dict[str, Any]:
    """Devices enrolled, online, and per state of their latest execution ("none" before their first report)."""
    return _census(db)[0]


def device_detail(db: sqlite_utils.Database, device_id: str) -> dict[str, Any] | None:
    """One device as in `devices()`, plus the release it should run (`desired`, None if no release matches)."""
    dev = device(db, device_id)
    if dev is None:
        return None
    return {**_with_execution(db, dev), "telemetry": telemetry.device_summaries(db, device_id).get(device_id),
            "anomaly": anomaly(db, device_id), "desired": desired(db, device_id)}


def releases(db: sqlite_utils.Database) -> list[dict[str, Any]]:
    """Every release, oldest first, with its selector and one target per profile."""
    targets: dict[int, list[dict[str, Any]]] = {}
    for target in db["release_targets"].rows_where(order_by="release_id, profile"):
        targets.setdefault(target["release_id"], []).append(target)
    found = []
    for row in db["releases"].rows_where(order_by="id"):
        row["selector"] = json.loads(row["selector"])
        row["targets"] = targets.get(row["id"], [])
        found.append(row)
    return found


def history(db: sqlite_utils.Database, device_id: str) -> list[dict[str, Any]]:
    """A device's executions, newest release first."""
    return list(db["executions"].rows_where("device = ?", [device_id], order_by="release_id desc"))


def status(db: sqlite_utils.Database) -> dict[str, Any]:
    """What `edgeops status` shows: devices with their latest execution (every one up to LISTED
    devices; past that, those that need attention: `devices()` lists them all), counts of every
    device, releases, rollouts with their progress and gates, the engine's latest decisions, devices
    that need attention, drift flags, and the latest `anomalies` (reports that disagreed with the
    fleet's records). Costs the same for 50 devices or 100,000 with few in trouble."""
    from edgeops.fleet import drift

    counts, needy = _census(db)
    listed = devices(db) if counts["total"] <= LISTED else devices(db, needy)
    return {"devices": listed, "device_counts": counts, "releases": releases(db), "rollouts": rollout.summaries(db),
            "decisions": rollout.decisions(db), "attention": rollout.attention(db, listed),
            "drift": [{"model": f["model"], "version": f["version"], "status": "retraining recommended",
                       "devices": f["devices"]} for f in drift.flagged(db)], "anomalies": anomalies(db),
            "certificates": expiring_certificates(db), "revoked": revoked(db)}
