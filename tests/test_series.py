"""fleet/series.py on a real registry file fed through the telemetry ingest: buckets, the p95 the
rollout gates use, drift windows, filters and the cap on points."""

from __future__ import annotations

import time

import numpy as np
import pytest

from edgeops.fleet.series import MAX_POINTS, version_series
from edgeops.protocol.errors import EdgeopsError
from telemetrykit import fleet, inference, send, window

T0 = 1_700_000_040.0  # a multiple of 60: bucket starts are T0, T0 + 60, ...


@pytest.fixture()
def db(tmp_path):
    """digits 1.0 on dev-00 in the first two minutes, digits 1.1 on dev-01 in the second and fourth;
    another model on dev-02 in the first."""
    db = fleet(tmp_path, 3)
    old = [(i + 1, "inference", T0 + i, inference("digits", "1.0", 2.0 + i % 7, ok=i % 10 != 0)) for i in range(40)]
    old += [(41 + i, "inference", T0 + 60 + i, inference("digits", "1.0", 3.0 + i)) for i in range(5)]
    old += [(46, "drift", T0 + 30, window("digits", "1.0", 0, shifted=False))]
    send(db, "dev-00", old)
    new = [(i + 1, "inference", T0 + 65 + i, inference("digits", "1.1", 1.0 + i, ok=i != 3)) for i in range(8)]
    new += [(9, "drift", T0 + 70, window("digits", "1.1", 0, shifted=True)),
            (10, "drift", T0 + 80, window("digits", "1.1", 1, shifted=False)),
            (11, "inference", T0 + 185, inference("digits", "1.1", 9.0)),
            (12, "metrics", T0 + 186, {"cpu": 0.5})]
    send(db, "dev-01", new)
    send(db, "dev-02", [(1, "inference", T0 + 1, inference("other", "7", 100.0))])
    return db


def _points(series: dict, version: str) -> list[dict]:
    return next(v["points"] for v in series["versions"] if v["version"] == version)


def test_buckets_count_calls_errors_p95_and_drift_per_version(db):
    series = version_series(db, "digits", bucket_s=60)
    assert series["bucket_s"] == 60
    assert [(v["model"], v["version"]) for v in series["versions"]] == [("digits", "1.0"), ("digits", "1.1")]
    old = _points(series, "1.0")
    assert [p["t"] for p in old] == [T0, T0 + 60, T0 + 120, T0 + 180]  # one axis for every version
    ok_latencies = [2.0 + i % 7 for i in range(40) if i % 10 != 0]
    assert old[0] == {"t": T0, "calls": 40, "errors": 4, "error_rate": 0.1,
                      "p95_ms": pytest.approx(float(np.percentile(ok_latencies, 95))),
                      "drift_windows": 1, "drift_alarms": 0}
    assert old[1]["calls"] == 5 and old[1]["p95_ms"] == pytest.approx(float(np.percentile([3, 4, 5, 6, 7], 95)))
    assert old[2] == old[3] | {"t": T0 + 120} == {"t": T0 + 120, "calls": 0, "errors": 0, "error_rate": None,
                                                  "p95_ms": None, "drift_windows": 0, "drift_alarms": 0}
    new = _points(series, "1.1")
    assert new[0]["calls"] == 0
    assert new[1] == {"t": T0 + 60, "calls": 8, "errors": 1, "error_rate": 0.125,
                      "p95_ms": pytest.approx(float(np.percentile([1, 2, 3, 5, 6, 7, 8], 95))),
                      "drift_windows": 2, "drift_alarms": 1}
    assert new[3]["calls"] == 1 and new[3]["p95_ms"] == 9.0


def test_all_models_and_other_bucket_sizes(db):
    series = version_series(db, bucket_s=3600)
    assert [(v["model"], v["version"]) for v in series["versions"]] == [("digits", "1.0"), ("digits", "1.1"), ("other", "7")]
    [point] = _points(series, "1.0")
    assert point["t"] == T0 // 3600 * 3600 and point["calls"] == 45 and point["drift_windows"] == 1
    assert _points(series, "7") == [{"t": point["t"], "calls": 1, "errors": 0, "error_rate": 0.0, "p95_ms": 100.0,
                                     "drift_windows": 0, "drift_alarms": 0}]


def test_since_drops_older_buckets_and_unknown_models_have_no_versions(db):
    series = version_series(db, "digits", bucket_s=60, since=T0 + 60)
    assert [p["t"] for p in _points(series, "1.0")] == [T0 + 60, T0 + 120, T0 + 180]
    assert _points(series, "1.0")[0]["calls"] == 5
    assert version_series(db, "nope") == {"bucket_s": 60, "versions": []}
    assert version_series(db, "digits", since=T0 + 10_000) == {"bucket_s": 60, "versions": []}


def test_points_are_capped_to_the_latest_buckets(tmp_path):
    db = fleet(tmp_path, 1)
    send(db, "dev-00", [(i + 1, "inference", T0 + i, inference("digits", "1.0", 1.0)) for i in range(300)])
    points = _points(version_series(db, bucket_s=1), "1.0")
    assert len(points) == MAX_POINTS
    assert points[0]["t"] == T0 + 300 - MAX_POINTS and points[-1]["t"] == T0 + 299
    assert all(p["calls"] == 1 for p in points)


def test_a_device_clock_far_ahead_does_not_hide_the_fleet(db):
    send(db, "dev-02", [(2, "inference", time.time() + 10 * 86400, inference("digits", "1.0", 1.0))])
    assert version_series(db, "digits") == version_series(db, "digits", since=T0)
    assert _points(version_series(db, "digits"), "1.0")[-1]["t"] == T0 + 180


def test_bad_bucket_sizes_are_refused(db):
    for bucket in (0, -60, 1.5, True):
        with pytest.raises(EdgeopsError, match="bucket"):
            version_series(db, bucket_s=bucket)
