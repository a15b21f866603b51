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

from edgeops.protocol.errors import EdgeopsError

MAX_POINTS = 120
FUTURE_S = 3600  # records stamped further ahead of the fleet's clock are ignored

_TOTALS = """
select model, version, cast(t / :bucket as integer) as b,
       sum(kind = 'inference'),
       sum(kind = 'inference' and coalesce(json_extract(body, '$.ok'), 0) = 0),
       sum(kind = 'drift'),
       sum(kind = 'drift' and coalesce(json_extract(body, '$.alarm'), 0) = 1)
from telemetry where {where} group by model, version, b
"""

# The p95 as numpy's default (linear) percentile, the rollout gates' definition: the two ok calls of
# 0-based ranks floor(0.95 (n - 1)) and the next, interpolated in Python.
_P95 = """
select model, version, b, pos - 0.95 * (n - 1), ms from (
    select model, version, b, ms, row_number() over (g order by ms) - 1 as pos, count(*) over g as n from (
        select model, version, cast(t / :bucket as integer) as b, json_extract(body, '$.latency_ms') as ms
        from telemetry
        where {where} and kind = 'inference' and json_extract(body, '$.ok') = 1
              and json_type(body, '$.latency_ms') in ('integer', 'real')
    ) window g as (partition by model, version, b)
) where pos in (cast(0.95 * (n - 1) as integer), cast(0.95 * (n - 1) as integer) + 1)
order by model, version, b, pos
"""


def version_series(db: sqlite_utils.Database, model: str | None = None, bucket_s: int = 60,
                   since: float | None = None) -> dict[str, Any]:
    """Calls, errors, p95 latency and drift windows per `bucket_s` seconds for every version of `model`
    (all models when None), from `since` (unix time) or the last MAX_POINTS buckets, whichever is later."""
    if isinstance(bucket_s, bool) or not isinstance(bucket_s, int) or bucket_s < 1:
        raise EdgeopsError(f"bucket must be a whole number of seconds >= 1, not {bucket_s!r}")
    where = ["kind in ('inference', 'drift')", "model is not null", "version is not null", "t <= :horizon"]
    params: dict[str, Any] = {"bucket": bucket_s, "horizon": time.time() + FUTURE_S}
    if model is not None:
        where.append("model = :model")
        params["model"] = model
    newest = db.execute(f"select max(t) from telemetry where {' and '.join(where)}", params).fetchone()[0]
    if newest is None:
        return {"bucket_s": bucket_s, "versions": []}
    last = int(newest // bucket_s)
    params["start"] = max((last - MAX_POINTS + 1) * bucket_s, since if since is not None else float("-inf"))
    where.append("t >= :start")
    clause = " and ".join(where)
    totals = {(m, v, b): rest for m, v, b, *rest in db.execute(_TOTALS.format(where=clause), params)}
    if not totals:
        return {"bucket_s": bucket_s, "versions": []}
    p95: dict[tuple[str, str, int], float] = {}
    for m, v, b, offset, ms in db.execute(_P95.format(where=clause), params):
        low = p95.get((m, v, b))  # the lower rank comes first, at offset -fraction; the upper one at 1 - fraction
        p95[m, v, b] = float(ms) if low is None else low + (ms - low) * (1 - offset)
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
