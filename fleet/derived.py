"""State derived from the telemetry table, stored in the registry and brought up to date from the
rows added since, so reading the fleet costs what changed, not its whole history.

Why this is exact: telemetry records are only ever added (fleet/telemetry.py inserts or ignores,
never updates or deletes), and SQLite gives every new row a rowid above all earlier ones; so "the
records added since a state was computed" are `rowid > mark`, a range of the table's own b-tree.
Every derived state keeps its `mark` (the highest rowid it has folded in) in `derived_marks`.

Kept here:
- `device_telemetry`: per device, the part of `telemetry.device_summaries` computed from its records
  (inferences, errors, p95 over the last window, latest metrics); a device with records past the mark
  is recomputed by that same function, the others are read as stored. Each row also keeps the mark
  it was computed at, so a few devices can be brought up to date alone (`refresh_listed`). The
  counters received and dropped are read live from `telemetry_devices` (a batch of duplicates can
  raise `dropped` alone).
- `series_buckets`: fleet/series.py's points, per bucket size; the buckets records landed in are
  forgotten, and computed again when asked.
- blobs: one JSON document per name, for other modules' folds (fleet/drift.py, the rollout gates' call
  statistics in fleet/rollout.py).

Invariants: after `refresh_devices` (or a fold through `since`), the stored state equals what
computing it from every row would give; a table whose rowids went backwards (a restored database)
is rebuilt from scratch. Writes join the caller's transaction when one is open (the engine's round),
else take one of their own; a state already up to date costs one indexed read and writes nothing.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import sqlite_utils

from edgeops.fleet import telemetry
from edgeops.fleet.sql import transaction

SUMMARY_WINDOW = 1000  # the last inference records a device summary covers (telemetry.device_summaries' default)


def create_tables(db: sqlite_utils.Database) -> None:
    db.execute("create table if not exists derived_marks (name text primary key, mark integer not null)")
    db.execute("create table if not exists derived_blobs (name text primary key, body text not null)")
    db.execute("create table if not exists series_buckets (bucket_s integer not null, model text not null, "
               "version text not null, b integer not null, calls integer not null, errors integer not null, "
               "windows integer not null, alarms integer not null, p95_ms real, primary key (bucket_s, model, version, b))")
    db.execute("create table if not exists device_telemetry (device text primary key, inferences integer not null, "
               "errors integer not null, p95_ms real, metrics text, mark integer not null)")


def top(db: sqlite_utils.Database) -> int:
    """The highest telemetry rowid (0 for an empty table)."""
    return db.execute("select coalesce(max(rowid), 0) from telemetry").fetchone()[0]


def mark(db: sqlite_utils.Database, name: str) -> int | None:
    try:
        row = db.execute("select mark from derived_marks where name = ?", [name]).fetchone()
    except sqlite3.OperationalError:  # a bare telemetry database, not opened by registry.open_db
        create_tables(db)
        return None
    return None if row is None else row[0]


@contextmanager
def writing(db: sqlite_utils.Database) -> Iterator[None]:
    """The caller's open transaction, or one of our own."""
    with nullcontext() if db.conn.in_transaction else transaction(db):
        yield


def since(db: sqlite_utils.Database, name: str, fold: Callable[[int | None, int], None]) -> None:
    """Bring the state `name` up to date: `fold(previous_mark, new_mark)` is called, inside a write
    transaction, when rows were added past its mark (previous_mark None: rebuild from nothing, as
    on first use or when the table went backwards); then the new mark is stored."""
    if mark(db, name) == top(db):
        return
    with writing(db):
        previous, now = mark(db, name), top(db)  # again, now that no one else writes
        if previous == now:
            return
        fold(None if previous is None or previous > now else previous, now)
        db.execute("insert into derived_marks (name, mark) values (?, ?) on conflict (name) do update set mark = excluded.mark",
                   [name, now])


def blob(db: sqlite_utils.Database, name: str) -> Any:
    row = db.execute("select body from derived_blobs where name = ?", [name]).fetchone()
    return None if row is None else json.loads(row[0])


def put_blob(db: sqlite_utils.Database, name: str, value: Any) -> None:
    db.execute("insert into derived_blobs (name, body) values (?, ?) on conflict (name) do update set body = excluded.body",
               [name, json.dumps(value, separators=(",", ":"))])


def _store_summaries(db: sqlite_utils.Database, summaries: dict[str, dict[str, Any]], now: int) -> None:
    db.conn.executemany(
        "insert or replace into device_telemetry (device, inferences, errors, p95_ms, metrics, mark) values (?, ?, ?, ?, ?, ?)",
        [(d, s["inferences"], s["errors"], s["p95_ms"], None if s["metrics"] is None else json.dumps(s["metrics"]), now)
         for d, s in summaries.items()])


def refresh_devices(db: sqlite_utils.Database) -> None:
    """Bring `device_telemetry` up to date with the inference and metrics records stored."""

    def fold(previous: int | None, now: int) -> None:
        if previous is None:
            db.execute("delete from device_telemetry")
            summaries = telemetry.device_summaries(db, window=SUMMARY_WINDOW)
        else:
            summaries = {}
            for (device,) in db.execute("select distinct device from telemetry where rowid > ? and rowid <= ?",
                                        [previous, now]).fetchall():
                summaries.update(telemetry.device_summaries(db, device, SUMMARY_WINDOW))
        _store_summaries(db, summaries, now)

    since(db, "device_telemetry", fold)


def refresh_listed(db: sqlite_utils.Database, devices: list[str]) -> None:
    """Bring `device_telemetry` up to date for these devices only: what `edgeops status` lists of a
    large fleet, so its cost does not follow how many other devices reported meanwhile. A device's
    row is stale when it has records past the row's own `mark` (the top rowid when it was computed)."""
    known, now = mark(db, "device_telemetry"), top(db)
    if known is None or known > now:  # never computed, or the table went back: everything, once
        refresh_devices(db)
        return
    if known == now:  # every device's row is up to date
        return
    query = ("select value from json_each(?) where exists (select 1 from telemetry t where t.device = value and "
             "t.rowid > coalesce((select mark from device_telemetry s where s.device = value), -1))")
    if not db.execute(query, [json.dumps(devices)]).fetchone():
        return
    with writing(db):
        stale = [row[0] for row in db.execute(query, [json.dumps(devices)])]  # again, now that no one else writes
        summaries: dict[str, dict[str, Any]] = {}
        for device in stale:
            summaries.update(telemetry.device_summaries(db, device, SUMMARY_WINDOW))
        _store_summaries(db, summaries, top(db))
