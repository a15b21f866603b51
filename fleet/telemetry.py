"""Telemetry ingest: devices' outbox records into the registry, each counted once.

Invariants:
- a record is stored at most once: (device, seq) is the key and a repeat is ignored, because an
  agent re-sends what the fleet did not acknowledge to it (agent/telemetry.py);
- the fleet acks a batch to its device (`acks` topic) only after the transaction storing it committed;
- a batch from a device that is not enrolled is dropped whole (logged; the broker ACL should have
  stopped it);
- a batch on an enrolled device's topic that names another device, or that is malformed but still
  names its records' seqs (fleet/ingest.parse_report: e.g. no `dropped`), is refused whole: nothing
  of it is stored, the device's `rejected_batches` counts it, a warning is logged (at most once per
  WARN_EVERY_S per device, with the count), and its seqs are acknowledged, so the device does not
  send it forever. Its records are then among those the fleet will never get: with the watermark
  they count in `dropped` once W passes them;
- telemetry is evidence about its device only. Every stored record counts in that device's own
  summaries and series, whatever model or version it names; what counts in a rollout's gates is
  chosen by the rollout engine from its own assignments (fleet/rollout.py), never by what a
  record claims;
- `telemetry_devices.received` counts stored records, and `dropped` the records the device made
  that the fleet will never get, so received + dropped accounts for every record it made: with the
  drop watermark W a batch carries (docs/protocol.md), dropped = W - (its stored seqs <= W) +
  `dropped_unsequenced`. Every seq <= W reached the fleet or was dropped, so this is exact even for
  records the device dropped after the fleet stored them (their acks lost in a partition). W and
  `dropped_unsequenced` only grow (the highest reported), and `below_watermark` counts each stored
  seq <= W once: when stored if W was already past it, else when W passes it. So replays and
  reordering change nothing, and a late record that was dropped at the device but stored here
  lowers `dropped` by one as it raises `received`;
- a device whose agent predates the watermark (`drop_watermark` NULL) reports its cumulative drop
  count, and `dropped` is the highest one reported (over-counting records dropped after the fleet
  stored them).
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import sqlite_utils

from edgeops.fleet.sql import transaction

log = logging.getLogger(__name__)
WARN_EVERY_S = 60.0  # what one device (or topic) sends wrong is logged at most this often
_warned: dict[str, float] = {}  # key -> when it was last logged


def create_tables(db: sqlite_utils.Database) -> None:
    db.execute("create table if not exists telemetry (device text not null, seq integer not null, kind text not null, "
               "t real not null, model text, version text, body text not null, received_at real not null, "
               "primary key (device, seq))")
    db.execute("create index if not exists telemetry_by_model on telemetry (model, version, kind, t)")
    db.execute("create table if not exists telemetry_devices (device text primary key, dropped integer not null default 0, "
               "received integer not null default 0)")
    columns = db["telemetry_devices"].columns_dict
    for column, definition in (("drop_watermark", "integer"), ("dropped_unsequenced", "integer not null default 0"),
                               ("below_watermark", "integer not null default 0"),  # registries from before the watermark
                               ("rejected_batches", "integer not null default 0")):  # ... and before refusals were counted
        if column not in columns:
            db.execute(f"alter table telemetry_devices add column {column} {definition}")


def ingest(db: sqlite_utils.Database, batches: list[tuple[str, dict[str, Any]]]) -> list[tuple[str, list[int]]]:
    """Store (topic device id, parsed telemetry batch or refusal from ingest.parse_report) pairs in one
    transaction; returns, per batch of an enrolled device, the device and the seqs to acknowledge:
    those now stored (new or already there), or those of a refused batch (see the module docstring)."""
    now, stored = time.time(), []
    with transaction(db):
        for device_id, batch in batches:
            if not db.execute("select 1 from devices where id = ?", [device_id]).fetchone():
                revoked = db.execute("update revoked_devices set refused_messages = refused_messages + 1 where id = ?",
                                     [device_id]).rowcount
                warn_limited(device_id, "telemetry from %s, which is %s: dropped", device_id, "revoked" if revoked else "not enrolled")
                continue
            refused = batch.get("refused") or (batch["device"] != device_id and
                                               f"the batch names device {str(batch['device'])[:64]!r}, not its topic's")
            if refused:
                _refuse(db, device_id, refused)
                stored.append((device_id, batch.get("seqs") or [r["seq"] for r in batch["records"]]))
                continue
            rows = [(device_id, r["seq"], r["kind"], r["t"], _text(r["body"].get("model")), _text(r["body"].get("version")),
                     json.dumps(r["body"], separators=(",", ":")), now) for r in batch["records"]]
            _store(db, device_id, batch, rows)
            stored.append((device_id, [r["seq"] for r in batch["records"]]))
    return stored


def _store(db: sqlite_utils.Database, device_id: str, batch: dict[str, Any], rows: list[tuple]) -> None:
    """Insert one batch's new rows and update the device's counters (see the module docstring)."""
    dropped, watermark, unsequenced, below = db.execute(
        "select dropped, drop_watermark, dropped_unsequenced, below_watermark from telemetry_devices where device = ?",
        [device_id]).fetchone() or (0, None, 0, 0)
    late = [row for row in rows if watermark is not None and row[1] <= watermark]
    added_late = _insert(db, late)
    added = added_late + _insert(db, [row for row in rows if watermark is None or row[1] > watermark])
    if "drop_watermark" not in batch:  # an agent from before the watermark
        if watermark is None:
            dropped = max(dropped, batch["dropped"])
    else:
        below += added_late
        if watermark is None or batch["drop_watermark"] > watermark:
            passed = db.execute("select count(*) from telemetry where device = ? and seq > ? and seq <= ?",
                                [device_id, watermark or 0, batch["drop_watermark"]]).fetchone()[0]
            watermark, below = batch["drop_watermark"], below + passed
        unsequenced = max(unsequenced, batch["dropped_unsequenced"])
        dropped = watermark - below + unsequenced
    db.execute("insert into telemetry_devices (device, received, dropped, drop_watermark, dropped_unsequenced, "
               "below_watermark) values (?, ?, ?, ?, ?, ?) on conflict (device) do update set received = received + "
               "excluded.received, dropped = excluded.dropped, drop_watermark = excluded.drop_watermark, "
               "dropped_unsequenced = excluded.dropped_unsequenced, below_watermark = excluded.below_watermark",
               [device_id, added, dropped, watermark, unsequenced, below])


def _refuse(db: sqlite_utils.Database, device_id: str, reason: str) -> None:
    """Count a refused batch for its (enrolled) topic device, and log it (rate-limited)."""
    db.execute("insert into telemetry_devices (device, rejected_batches) values (?, 1) on conflict (device) "
               "do update set rejected_batches = rejected_batches + 1", [device_id])
    total = db.execute("select rejected_batches from telemetry_devices where device = ?", [device_id]).fetchone()[0]
    warn_limited(device_id, "refused a telemetry batch from %s (%s; %d refused so far): nothing of it stored, its seqs "
                     "acknowledged", device_id, reason, total)


def warn_limited(key: str, message: str, *args: Any) -> None:
    """log.warning, at most once per WARN_EVERY_S per `key` (a device, a topic): what devices send
    must not be able to fill the fleet's log."""
    now = time.monotonic()
    if now - _warned.get(key, -WARN_EVERY_S) >= WARN_EVERY_S:
        if len(_warned) >= 10_000:  # keys from topics: bounded, whatever publishes
            _warned.clear()
        _warned[key] = now
        log.warning(message, *args)


def _insert(db: sqlite_utils.Database, rows: list[tuple]) -> int:
    """Insert the rows not stored yet; returns how many were new."""
    before = db.conn.total_changes
    db.conn.executemany("insert or ignore into telemetry values (?, ?, ?, ?, ?, ?, ?, ?)", rows)
    return db.conn.total_changes - before


def counts(db: sqlite_utils.Database, device_id: str) -> dict[str, int]:
    """Records received and dropped (by the device's full outbox) for one device."""
    row = db.execute("select received, dropped from telemetry_devices where device = ?", [device_id]).fetchone()
    return {"received": row[0], "dropped": row[1]} if row else {"received": 0, "dropped": 0}


def device_summaries(db: sqlite_utils.Database, only: str | None = None, window: int = 1000) -> dict[str, dict[str, Any]]:
    """Per device (or just `only`): records received and dropped, batches refused, and over its last `window`
    inference records the calls, errors and p95 latency of the successful ones; plus its latest metrics sample."""
    where, args = ("where device = ?", [only]) if only is not None else ("", [])
    summaries = {row["device"]: {"received": row["received"], "dropped": row["dropped"],
                                 "rejected_batches": row["rejected_batches"]}
                 for row in db.query(f"select device, received, dropped, rejected_batches from telemetry_devices {where}", args)}
    for device_id, summary in summaries.items():
        rows = db.execute("select json_extract(body, '$.latency_ms'), json_extract(body, '$.ok') from telemetry "
                          "where device = ? and kind = 'inference' order by seq desc limit ?", [device_id, window]).fetchall()
        latencies = sorted(r[0] for r in rows if r[1] and isinstance(r[0], (int, float)))
        summary["inferences"] = len(rows)
        summary["errors"] = sum(1 for r in rows if not r[1])
        summary["p95_ms"] = latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))] if latencies else None
        latest = db.execute("select body from telemetry where device = ? and kind = 'metrics' order by seq desc limit 1",
                            [device_id]).fetchone()
        summary["metrics"] = json.loads(latest[0]) if latest else None
    return summaries


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) else None
