"""The README's first command: `edgeops demo` builds for two boards, rolls v1 out in stages to a
dozen agent processes, rolls a broken v2 back automatically, and flags a drifting device."""

from __future__ import annotations

import io

from rich.console import Console

from edgeops.demo import AGENTS_PER_PROFILE, DIMMED, PROFILES, run_demo
from edgeops.fleet import drift, registry
from edgeops.fleet.home import FleetHome
from edgeops.protocol.bundle import read_bundle


def test_demo_rolls_out_rolls_back_and_flags_drift(tmp_path):
    out = io.StringIO()
    result = run_demo(tmp_path, Console(file=out, width=200))
    assert [r["profile"] for r in result["builds"]] == list(PROFILES)
    for report in result["builds"]:
        assert read_bundle(report["bundle"]).manifest["profile"] == report["profile"]
        assert report["quality"]["drop"] <= report["quality"]["max_drop"]
    text = out.getvalue()
    assert "one model, two boards" in text and "dashboard: https://127.0.0.1:" in text
    status = result["status"]
    agents = AGENTS_PER_PROFILE * len(PROFILES)
    v2, v1 = status["rollouts"]
    assert (v1["version"], v1["state"], v1["counts"]["active"]) == ("1.0.0", "completed", agents)
    assert (v2["version"], v2["state"]) == ("2.0.0", "rolled-back")
    db = registry.open_db(FleetHome.open(tmp_path / "fleet").db_path)
    v1_actions = [(d["actor"], d["action"]) for d in reversed(registry.rollout.decisions(db, v1["id"]))]
    assert v1_actions == [("operator", "start"), ("engine", "advance"), ("engine", "advance"), ("engine", "complete")]
    start, rollback, withdraw = reversed(registry.rollout.decisions(db, v2["id"]))
    assert (rollback["actor"], rollback["action"]) == ("engine", "rollback") and "error rate" in rollback["reason"]
    assert withdraw["action"] == "withdraw"  # unsigned, so the canary may go back to 1.0.0
    assert v2["counts"]["rolled-back"] == 1  # only the canary ever got it
    assert {d["id"]: d["installed_version"] for d in status["devices"]} == {d["id"]: "1.0.0" for d in status["devices"]}
    assert len(status["devices"]) == agents and all(d["online"] for d in status["devices"])
    [flag] = drift.flagged(db)
    assert (flag["version"], flag["devices"]) == ("1.0.0", [DIMMED])
    assert (tmp_path / "retrain" / "samples.npz").exists() and (tmp_path / "retrain" / "summaries.json").exists()
