"""The README's first command: `edgeops demo` trains, builds for two boards, and delivers to agents."""

from __future__ import annotations

import io

from rich.console import Console

from edgeops.demo import AGENTS_PER_PROFILE, CALLS_PER_AGENT, DIMMED, DRIFT_BATCHES, PROFILES, run_demo
from edgeops.fleet import drift, registry
from edgeops.fleet.home import FleetHome
from edgeops.protocol.bundle import read_bundle


def test_demo_builds_for_two_boards_and_every_agent_installs_its_own(tmp_path):
    out = io.StringIO()
    reports = run_demo(tmp_path, Console(file=out, width=200))
    assert [r["profile"] for r in reports] == list(PROFILES)
    for report in reports:
        assert read_bundle(report["bundle"]).manifest["profile"] == report["profile"]
        assert report["quality"]["drop"] <= report["quality"]["max_drop"]
    text = out.getvalue()
    assert "one model, two boards" in text
    agents = AGENTS_PER_PROFILE * len(PROFILES)
    assert text.count("r1 active") == agents
    assert "every record made during the outage arrived" in text
    for device_dir in (tmp_path / "devices").iterdir():
        assert (device_dir / "state" / "current").exists()
    db = registry.open_db(FleetHome.open(tmp_path / "fleet").db_path)
    per_device = dict(db.execute("select device, count(*) from telemetry where kind = 'inference' group by device").fetchall())
    # before and during the outage, then the drift round
    assert per_device == {d.name: 2 * CALLS_PER_AGENT + DRIFT_BATCHES for d in (tmp_path / "devices").iterdir()}
    [version] = drift.report(db)["versions"]
    assert version["status"] == "retraining recommended"
    assert {name for name, d in version["devices"].items() if d["status"] == "retraining recommended"} == {DIMMED}
    assert (tmp_path / "retrain" / "samples.npz").exists() and (tmp_path / "retrain" / "summaries.json").exists()
