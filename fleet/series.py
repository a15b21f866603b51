"""Time series per model version, for comparing an old and a new version during a rollout (GET /v1/series).

Input: the `telemetry` table (fleet/telemetry.py): "inference" bodies carry `latency_ms` and `ok`,
"drift" bodies are drift windows whose `alarm` says whether the window drifted (agent/drift.py).

Output: {"bucket_s", "versions": [{"model", "version", "points": [{"t", "calls", "errors", "error_rate",
"p95_ms", "drift_windows", "drift_alarms"}]}]}, versions sorted by (model, version).

Invariants:
- a point's `t` is its bucket's start, a multiple of `bucket_s` in the records' own (device) time;
- at most MAX_POINTS buckets, the last ones up to the newest record, so a long history costs no
  more than a short one; every version has a point for every bucket of that common range (zeros
  where it had no record), so versions plot on one time axis; a record stamped more than FUTURE_S
  ahead of the fleet's clock is ignored, so one device with a wrong clock cannot push the range
  past everyone else's records;
- `errors` counts inferences whose `ok` is not true; `p95_ms` is over ok calls only (a failed call's
  latency says nothing about the model's speed) and interpolated as the rollout's latency gate does;
  `error_rate` and `p95_ms` are None when there is nothing to compute them from;
- aggregation and ranking happen in SQLite: Python sees one row per bucket, never per record.
"""

from __future__ import annotations

import time
from typing import Any

import sqlite_utils

from edgeops.fleet import derived
from edgeops.protocol.errors import EdgeopsError

MAX_POINTS = 120
FUTURE_S = 3600  # records stamped further ahead of the fleet's clock are ignored

# Every (model, version) with records, one index seek each (a skip scan of telemetry_by_model): the
# queries below then read each version's time range from that index, never the whole history.
_PAIRS = """
with recursive m(model) as (
    select coalesce(:model, (select min(model) from telemetry))
    union all select (select min(model) from telemetry where model > m.model) from m where :model is null and m.model is not null
), v(model, version) as (
    select model, (select min(version) from telemetry t where t.model = m.model) from m where m.model is not null
    union all select model, (select min(version) from telemetry t where t.model = v.model and t.version > v.version)
    from v where v.version is not null
) select model, version from v where version is not null order by model, version
"""

_WHERE = ("model = :model and version = :version and kind in ('inference', 'drift') and t >= :start and t < :end "
          "and t <= :horizon")

_NEWEST = """select max(t) from (
    select max(t) as t from telemetry where model = :model and version = :version and kind = 'inference' and t <= :horizon
    union all
    select max(t) from telemetry where model = :model and version = :version and kind = 'drift' and t <= :horizon)"""

_TOTALS = f"""
select cast(t / :bucket as integer) as b,
       sum(kind = 'inference'),
       sum(kind = 'inference' and coalesce(json_extract(body, '$.ok'), 0) = 0),
       sum(kind = 'drift'),
       sum(kind = 'drift' and coalesce(json_extract(body, '$.alarm'), 0) = 1)
from telemetry where {_WHERE} group by b
"""

# The p95 as numpy's default (linear) percentile, the rollout gates' definition: the two ok calls of
# 0-based ranks floor(0.95 (n - 1)) and the next, interpolated in Python.
_P95 = f"""
select b, pos - 0.95 * (n - 1), ms from (
    select b, ms, row_number() over (g order by ms) - 1 as pos, count(*) over g as n from (
        select cast(t / :bucket as integer) as b, json_extract(body, '$.latency_ms') as ms
        from telemetry
        where {_WHERE} and kind = 'inference' and json_extract(body, '$.ok') = 1
              and json_type(body, '$.latency_ms') in ('integer', 'real')
    ) window g as (partition by b)
) where pos in (cast(0.95 * (n - 1) as integer), cast(0.95 * (n - 1) as integer) + 1)
order by b, pos
"""


def version_series(db: sqlite_utils.Database, model: str | None = None, bucket_s: int = 60,
                   since: float | None = None) -> dict[str, Any]:
    """Calls, errors, p95 latency and drift windows per `bucket_s` seconds for every version of `model`
    (all models when None), from `since` (unix time) or the last MAX_POINTS buckets, whichever is later."""
    if isinstance(bucket_s, bool) or not isinstance(bucket_s, int) or bucket_s < 1:
        raise EdgeopsError(f"bucket must be a whole number of seconds >= 1, not {bucket_s!r}")
    params: dict[str, Any] = {"bucket": bucket_s, "horizon": time.time() + FUTURE_S}
    pairs = db.execute(_PAIRS, {"model": model}).fetchall()
    newest = max((t for m, v in pairs
                  if (t := db.execute(_NEWEST, {**params, "model": m, "version": v}).fetchone()[0]) is not None),
                 default=None)
    if newest is None:
        return {"bucket_s": bucket_s, "versions": []}
    last = int(newest // bucket_s)
    first = last - MAX_POINTS + 1
    if since is None:
        found = _stored(db, pairs, params, first, last)
    else:
        params |= {"start": max(first * bucket_s, since), "end": float("inf")}
        found = {(m, v): _compute(db, m, v, params) for m, v in pairs}
    totals = {(m, v, b): point[:4] for (m, v), points in found.items() for b, point in points.items()}
    p95 = {(m, v, b): point[4] for (m, v), points in found.items() for b, point in points.items()}
    if not totals:
        return {"bucket_s": bucket_s, "versions": []}
    first = min(b for _, _, b in totals)
    versions = []
    for name, version in sorted({(m, v) for m, v, _ in totals}):
        points = []
        for b in range(first, last + 1):
            calls, errors, windows, alarms = totals.get((name, version, b), (0, 0, 0, 0))
            points.append({"t": float(b * bucket_s), "calls": calls, "errors": errors,
                           "error_rate": errors / calls if calls else None, "p95_ms": p95.get((name, version, b)),
                           "drift_windows": windows, "drift_alarms": alarms})
        versions.append({"model": name, "version": version, "points": points})
    return {"bucket_s": bucket_s, "versions": versions}


def _compute(db: sqlite_utils.Database, model: str, version: str, params: dict[str, Any]) -> dict[int, list]:
    """Bucket -> [calls, errors, drift windows, drift alarms, p95 ms] of one version's records in
    [start, end), for the buckets that have any."""
    args = {**params, "model": model, "version": version}
    found = {b: [*rest, None] for b, *rest in db.execute(_TOTALS, args)}
    for b, offset, ms in db.execute(_P95, args):
        low = found[b][4]  # the lower rank comes first, at offset -fraction; the upper one at 1 - fraction
        found[b][4] = float(ms) if low is None else low + (ms - low) * (1 - offset)
    return found


def _stored(db: sqlite_utils.Database, pairs: list[tuple[str, str]], params: dict[str, Any], first: int,
            last: int) -> dict[tuple[str, str], dict[int, list]]:
    """`_compute` over buckets first..last of every pair, kept in `series_buckets`: a bucket is computed
    once, and again only after records landed in it (fleet/derived.py); one that reaches past the
    horizon (records that far ahead are ignored, for now) is never kept."""
    bucket = params["bucket"]

    def forget_touched(previous: int | None, now: int) -> None:
        if previous is None:
            db.execute("delete from series_buckets where bucket_s = ?", [bucket])
        else:
            db.execute("delete from series_buckets where bucket_s = :bucket and (model, version, b) in (select distinct "
                       "model, version, cast(t / :bucket as integer) from telemetry where rowid > :previous and rowid <= :now "
                       "and kind in ('inference', 'drift') and model is not null and version is not null)",
                       {"bucket": bucket, "previous": previous, "now": now})

    derived.since(db, f"series/{bucket}", forget_touched)
    complete = int(params["horizon"] // bucket) - 1  # buckets up to this one end before the horizon
    found, keep = {}, []
    for m, v in pairs:
        points = {b: list(rest) for b, *rest in db.execute(
            "select b, calls, errors, windows, alarms, p95_ms from series_buckets where bucket_s = ? and model = ? "
            "and version = ? and b between ? and ?", [bucket, m, v, first, last])}
        missing = [b for b in range(first, last + 1) if b not in points]
        if missing:
            computed = _compute(db, m, v, {**params, "start": missing[0] * bucket, "end": (missing[-1] + 1) * bucket})
            for b in missing:
                points[b] = computed.get(b, [0, 0, 0, 0, None])
                if b <= complete:
                    keep.append((bucket, m, v, b, *points[b]))
        found[m, v] = {b: point for b, point in points.items() if point[0] or point[2]}
    if keep:
        with derived.writing(db):
            db.conn.executemany("insert or replace into series_buckets values (?, ?, ?, ?, ?, ?, ?, ?, ?)", keep)
    return found
