"""GET /metrics' body (fleet/exposition.py) parsed back with prometheus_client's own parser and
checked against the registry it was read from: devices, rollouts, telemetry counters, drift flags."""

from __future__ import annotations

import prometheus_client
import pytest
from prometheus_client.parser import text_string_to_metric_families

from edgeops.fleet import exposition, registry, rollout
from edgeops.fleet.plan import make_plan
from edgeops.protocol.wire import STATES
from telemetrykit import fleet, inference, report, send, window

T0 = 1_700_000_000.0
TARGET = [{"profile": "rpi4", "target": "digits-rpi4.edgeops", "sha256": "a" * 64, "length": 1000}]


def _scrape(db) -> dict[tuple[str, tuple], float]:
    """(sample name, sorted labels) -> value, from one render."""
    body, content_type = exposition.render(db)
    assert content_type.startswith("text/plain")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(body.decode()) for s in family.samples}


@pytest.fixture()
def db(tmp_path):
    """Six devices, one offline; rollout 1 (digits 1.0) reached five, one of which failed, and was
    superseded by rollout 2 (digits 1.1), which runs its first stage; dev-01 drifts on 1.0."""
    db = fleet(tmp_path, 6)
    registry.record_reports(db, [("dev-05", {"online": False})])
    registry.create_release(db, "digits", "1.0", {}, TARGET, make_plan(stages="100%"))
    rollout.tick(db)
    for i in range(5):
        report(db, f"dev-{i:02d}", 1, "failed" if i == 4 else "active", "self-test failed" if i == 4 else "",
               ("digits", "1.0"))
    registry.create_release(db, "digits", "1.1", {}, TARGET, make_plan(stages="1dev,100%"))
    rollout.tick(db)
    report(db, "dev-00", 2, "downloading")
    send(db, "dev-00", [(i + 1, "inference", T0 + i, inference("digits", "1.0", 2.0)) for i in range(10)], dropped=3)
    send(db, "dev-00", [(9, "inference", T0 + 9, inference("digits", "1.0", 2.0)),  # a re-sent record counts once
                        (11, "metrics", T0 + 11, {"cpu": 0.25})], dropped=2)   # a lower drop count never lowers it
    send(db, "dev-01", [(1, "drift", T0, window("digits", "1.0", 0, shifted=True)),
                        (2, "drift", T0 + 60, window("digits", "1.0", 1, shifted=True)),
                        (3, "drift", T0 + 120, window("digits", "1.0", 2, shifted=False))], dropped=4)
    return db


def test_devices_match_the_registry(db):
    metrics = _scrape(db)
    devices = registry.devices(db)
    assert metrics[("edgeops_devices_enrolled", ())] == 6
    assert metrics[("edgeops_devices_online", ())] == 5
    expected = {state: sum(1 for d in devices if d["execution"] and d["execution"]["state"] == state) for state in STATES}
    expected["none"] = 1  # dev-05 was offline, so never assigned
    assert {labels[0][1]: value for (name, labels), value in metrics.items() if name == "edgeops_devices"} == expected
    assert expected["downloading"] == 1 and expected["active"] == 3 and expected["failed"] == 1


def test_rollouts_expose_stage_devices_and_state(db):
    metrics = _scrape(db)
    for r in registry.status(db)["rollouts"]:
        labels = {"rollout": str(r["id"]), "model": r["model"], "version": r["version"]}
        assert metrics[("edgeops_rollout_stage", tuple(sorted(labels.items())))] == r["stage"]
        for state in STATES:
            key = ("edgeops_rollout_devices", tuple(sorted({**labels, "state": state}.items())))
            assert metrics[key] == r["counts"][state]
        states = {s: metrics[("edgeops_rollout_state", tuple(sorted({**labels, "state": s}.items())))]
                  for s in rollout.ROLLOUT_STATES}
        assert states == {s: float(s == r["state"]) for s in rollout.ROLLOUT_STATES}
    first = (("model", "digits"), ("rollout", "1"), ("state", "superseded"), ("version", "1.0"))
    assert metrics[("edgeops_rollout_state", first)] == 1
    assert metrics[("edgeops_rollout_devices", (("model", "digits"), ("rollout", "2"), ("state", "downloading"),
                                                ("version", "1.1")))] == 1


def test_telemetry_counters_count_each_record_once_and_drift_flags_retraining(db):
    metrics = _scrape(db)
    assert metrics[("edgeops_telemetry_records_total", ())] == 11 + 3
    assert metrics[("edgeops_telemetry_dropped_total", ())] == 3 + 4
    assert metrics[("edgeops_drift_flagged", (("model", "digits"), ("version", "1.0")))] == 1
    send(db, "dev-02", [(1, "inference", T0, inference("digits", "1.0", 2.0, ok=False))], dropped=1)
    again = _scrape(db)
    assert again[("edgeops_telemetry_records_total", ())] == 15
    assert again[("edgeops_telemetry_dropped_total", ())] == 8


def test_renders_keep_out_of_the_global_registry(db):
    before = {m.name for m in prometheus_client.REGISTRY.collect()}
    exposition.render(db)
    exposition.render(db)
    assert {m.name for m in prometheus_client.REGISTRY.collect()} == before
    assert not any(name.startswith("edgeops") for name in before)


def test_an_empty_fleet_has_zeros_not_gaps(tmp_path):
    metrics = _scrape(fleet(tmp_path, 0))
    assert metrics[("edgeops_devices_enrolled", ())] == 0
    assert metrics[("edgeops_telemetry_records_total", ())] == 0
    assert all(metrics[("edgeops_devices", (("state", s),))] == 0 for s in ("none", *STATES))
