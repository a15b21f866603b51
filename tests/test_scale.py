"""What keeps the fleet's reads fast at 10,000 devices, checked without timing (bench/fleet_scale_bench.py
times them): the SQL statements a read runs do not grow with the number of devices, and the state
kept up to date from the telemetry added since (fleet/derived.py) always equals computing it afresh."""

from __future__ import annotations

import json

import pytest

from edgeops.fleet import ca, derived, drift, exposition, registry, rollout, series, telemetry
from edgeops.fleet.plan import make_plan

T0 = 1_700_000_000.0
TARGETS = [{"profile": p, "target": f"m-{p}", "sha256": "0" * 64, "length": 1} for p in ("rpi4", "x86-vnni")]


def _window(alarm: bool) -> dict:
    counts = [40, 10] if alarm else [25, 25]
    return {"model": "m", "version": "2", "reference": "ref", "samples": 50, "alarm": alarm,
            "drifted": ["f"] if alarm else [], "counts": {"f": counts}, "reference_counts": {"f": [25, 25]}}


def _send(db, device: str, first_seq: int, n: int, alarm: bool = False, dropped: int = 0, t0: float = T0) -> None:
    records = []
    for i in range(n):
        seq = first_seq + i
        kind = ("inference", "metrics", "drift")[seq % 3]
        body = ({"model": "m", "version": "2", "latency_ms": 1.0 + seq % 7, "ok": seq % 5 != 0} if kind == "inference"
                else {"cpu_percent": float(seq)} if kind == "metrics" else _window(alarm))
        records.append({"seq": seq, "kind": kind, "t": t0 + seq, "body": body})
    telemetry.ingest(db, [(device, {"device": device, "records": records, "dropped": dropped})])


def _fleet(tmp_path, n: int):
    """`n` devices (past registry.LISTED, so status lists only the few in trouble), a release rolled
    out by the engine to all of them, their reports, and telemetry: inference, metrics, drift windows."""
    db = registry.open_db(tmp_path / f"fleet-{n}.db")
    ids = [f"dev-{i:04d}" for i in range(n)]
    pki = tmp_path / f"pki-{n}"
    ca.create_ca(pki)
    for i, device in enumerate(ids):  # each with a real certificate of its own from a fleet CA
        registry.enroll(db, device, TARGETS[i % 2]["profile"], {"site": f"s{i % 3}"}, ca.issue(pki, device).cert)
    registry.record_reports(db, [(d, {"online": True}) for d in ids])
    release = registry.create_release(db, "m", "2", {}, TARGETS, make_plan(stages="100%", bake=0, min_calls=0))
    rollout.tick(db, T0)
    registry.record_reports(db, [(d, {"online": True, "execution": {"release": release, "state": "failed" if d == ids[1]
                                                                    else "active", "reason": "bad"}}) for d in ids])
    for i, device in enumerate(ids):
        _send(db, device, 1, 9, alarm=i == 2)
    return db, ids


def _statements(db, read) -> int:
    read(db)  # brings derived state up to date
    ran = []
    db.conn.set_trace_callback(ran.append)
    try:
        read(db)
    finally:
        db.conn.set_trace_callback(None)
    return len(ran)


READS = {
    "status": registry.status,
    "rollouts": rollout.summaries,
    "rollout": lambda db: rollout.summary(db, 1),
    "device": lambda db: registry.device_detail(db, "dev-0003"),
    "device page": lambda db: registry.page(db, "dev-0010", 20, True, "active", ("s1",)),
    "metrics": exposition.render,
    "series": lambda db: series.version_series(db, "m", 60),
    "drift": drift.report,
    "drift summary": lambda db: drift.report(db, every_device=False),
    "engine round": lambda db: rollout.tick(db, T0 + 10),
}


@pytest.fixture(scope="module")
def fleets(tmp_path_factory):
    path = tmp_path_factory.mktemp("fleets")
    return [_fleet(path, n)[0] for n in (registry.LISTED + 10, 4 * registry.LISTED)]


@pytest.mark.parametrize("name", list(READS))
def test_statements_per_read_do_not_grow_with_the_fleet(fleets, name):
    small, large = fleets
    assert _statements(small, READS[name]) == _statements(large, READS[name])


def test_status_after_every_device_reported_reads_only_those_it_lists(fleets):
    """Past registry.LISTED, status brings up to date only the devices it lists, however many reported."""
    counts = []
    for db in fleets:
        registry.status(db)
        ids = [row[0] for row in db.execute("select id from devices order by id")]
        for device in ids:
            _send(db, device, 100, 3)
        ran = []
        db.conn.set_trace_callback(ran.append)
        try:
            listed = registry.status(db)["devices"]
        finally:
            db.conn.set_trace_callback(None)
        assert [d["telemetry"] for d in listed] == [telemetry.device_summaries(db, d["id"])[d["id"]] for d in listed]
        counts.append(len(ran))
    assert counts[0] == counts[1]


def test_status_past_listed_shows_those_in_trouble_and_counts_all(tmp_path):
    db, ids = _fleet(tmp_path, registry.LISTED + 10)
    data = registry.status(db)
    assert [d["id"] for d in data["devices"]] == [ids[1]] == [a["device"] for a in data["attention"]]
    assert data["device_counts"] == {"total": len(ids), "online": len(ids), "states": {"active": len(ids) - 1, "failed": 1}}
    full = registry.devices(db)
    assert rollout.attention(db, full) == data["attention"] and data["devices"][0] == full[1]


def _fresh(db) -> None:
    """Forget every derived state: the next read computes it from all rows."""
    db.execute("delete from derived_marks")
    db.execute("delete from derived_blobs")
    db.execute("delete from series_buckets")
    db.conn.commit()


def test_state_kept_from_the_rows_added_since_equals_a_fresh_computation(tmp_path):
    db, ids = _fleet(tmp_path, 12)
    before = registry.status(db)
    series.version_series(db, "m", 2)
    _send(db, ids[3], 10, 6, alarm=True)  # new records for two devices, a drop count alone for a third
    _send(db, ids[4], 10, 3, t0=T0 - 8)  # late: into buckets already kept
    _send(db, ids[5], 1, 3, dropped=7)  # duplicates: nothing stored, the drop count rises
    kept = (registry.devices(db), drift.report(db), rollout.summaries(db), series.version_series(db, "m", 2))
    assert kept[0] != before["devices"] and kept[0][5]["telemetry"]["dropped"] == 7
    assert {d["id"]: d["telemetry"] for d in kept[0]} == telemetry.device_summaries(db)
    assert kept[3] == series.version_series(db, "m", 2, since=float("-inf"))  # computed from the records
    _fresh(db)
    assert (registry.devices(db), drift.report(db), rollout.summaries(db), series.version_series(db, "m", 2)) == kept


def test_a_drift_window_out_of_order_rebuilds_the_merge(tmp_path):
    db, ids = _fleet(tmp_path, 12)
    _send(db, ids[6], 20, 3, alarm=True)
    _send(db, ids[6], 23, 3, alarm=True)
    assert drift.report(db)["versions"][0]["devices"][ids[6]]["status"] == drift.RETRAIN
    _send(db, ids[6], 10, 6)  # older windows arrive late: the device's latest ones are still the alarmed
    kept = drift.report(db)
    assert kept["versions"][0]["devices"][ids[6]]["recent"] == [False, True, True]
    _fresh(db)
    assert drift.report(db) == kept
    json.dumps(kept, allow_nan=False)


def test_derived_state_follows_a_database_that_went_back(tmp_path):
    db, ids = _fleet(tmp_path, 12)
    registry.devices(db)
    drift.report(db)
    db.execute("delete from telemetry where seq > 3")  # as if restored from an older copy
    db.conn.commit()
    assert registry.devices(db, [ids[0]])[0]["telemetry"] == telemetry.device_summaries(db, ids[0])[ids[0]]
    kept = (registry.devices(db), drift.report(db))
    assert derived.mark(db, "device_telemetry") == derived.top(db)
    assert {d["id"]: d["telemetry"] for d in kept[0]} == telemetry.device_summaries(db)
    _fresh(db)
    assert (registry.devices(db), drift.report(db)) == kept
