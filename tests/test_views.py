"""`edgeops status` rendering (fleet/views.py): real status dicts from a registry file that devices
reported to and sent telemetry into, a contract-shaped dict for every kind of rollout panel, large
fleets, and dicts from a server older than rollouts."""

from __future__ import annotations

import re
import time

from rich.console import Console

from edgeops.fleet import registry, rollout
from edgeops.fleet.plan import make_plan
from edgeops.fleet.views import DECISIONS, render_status
from edgeops.protocol.wire import STATES
from telemetrykit import fleet, inference, report, send

TARGET = [{"profile": "rpi4", "target": "digits-rpi4.edgeops", "sha256": "a" * 64, "length": 1000}]


def _render(data: dict) -> str:
    console = Console(record=True, width=160)
    render_status(data, console)
    return console.export_text()


def _table(text: str, title: str) -> list[list[str]]:
    """The cells of each row of the table titled `title`."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip() == title)
    rows = []
    for line in lines[start + 4:]:  # title, top border, header, header rule
        if not line.startswith("│"):
            return rows
        rows.append([cell.strip() for cell in line.strip("│").split("│")])
    return rows


def _panel_line(text: str, *parts: str) -> str:
    """The one line that holds all of `parts`."""
    [line] = [line for line in text.splitlines() if all(part in line for part in parts)]
    return line


def _rolled_out(db, count: int, failed: set[str] = frozenset()) -> None:
    """Release digits 1.0 to every online device in one stage; each reports active, or failed."""
    registry.create_release(db, "digits", "1.0", {}, TARGET, make_plan(stages="100%"))
    rollout.tick(db)
    for i in range(count):
        device = f"dev-{i:02d}"
        if device in failed:
            report(db, device, 1, "failed", "self-test failed [/bold]")  # a device's words, not rich markup
        else:
            report(db, device, 1, "active", installed=("digits", "1.0"))


def test_small_fleet_shows_every_device_the_rollout_and_what_needs_attention(tmp_path):
    db = fleet(tmp_path, 3)
    _rolled_out(db, 3, failed={"dev-02"})
    send(db, "dev-00", [(i + 1, "inference", 1000.0 + i, inference("digits", "1.0", 1.0 + i, ok=i != 4))
                        for i in range(20)], dropped=2)
    text = _render(registry.status(db))

    devices = _table(text, "devices")
    assert all(re.fullmatch(r"\d+s ago", d.pop(4)) for d in devices)
    assert devices == [["dev-00", "rpi4", "digits 1.0", "r1 active", "yes", "20", "1", "20.00", "2"],
                       ["dev-01", "rpi4", "digits 1.0", "r1 active", "yes", "-", "-", "-", "-"],
                       ["dev-02", "rpi4", "-", "r1 failed", "yes", "-", "-", "-", "-"]]  # the reason: attention
    assert _table(text, "releases") == [["1", "digits", "1.0", "all", "rpi4"]]
    assert "rollout #1 digits 1.0 · running" in text
    assert "executions: 2 active, 1 failed" in text  # only the states that have devices
    stage = _panel_line(text, "100%", "◀ current")
    assert "2/3 active" in stage and "1 failed" in stage and "installing" not in stage and "━" in stage
    assert "install success  2/3 ok" in _panel_line(text, "✗", "install success")
    assert "waiting: 20/100 calls" in _panel_line(text, "…", "error rate")
    [start] = registry.status(db)["decisions"]
    [decision] = _table(text, f"latest decisions (last {DECISIONS})")
    assert decision[:4] == [time.strftime("%m-%d %H:%M:%S", time.localtime(start["t"])), "#1", "operator", "start"]
    assert _table(text, "needs attention") == [["dev-02", "#1", "failed: self-test failed [/bold]"]]
    assert text.rstrip().splitlines()[-2].startswith("│ dev-02 ")  # attention comes last, next to the prompt


def test_large_fleet_lists_only_the_devices_that_need_attention(tmp_path):
    db = fleet(tmp_path, 60)
    _rolled_out(db, 59, failed={"dev-07", "dev-31"})
    report(db, "dev-59", 1, "downloading")
    registry.record_reports(db, [("dev-59", {"online": False})])
    text = _render(registry.status(db))

    assert "60 devices, 59 online: 1 downloading, 57 active, 2 failed; listing the 3 that need attention" in text
    devices = _table(text, "devices")
    assert [d[0] for d in devices] == ["dev-07", "dev-31", "dev-59"]
    assert devices[2][3] == "r1 downloading" and devices[2][5] == "no"
    assert "57/60 active" in _panel_line(text, "100%", "◀ current")


def test_status_from_a_server_older_than_rollouts(tmp_path):
    db = fleet(tmp_path, 2)
    report(db, "dev-00", 4, "active", installed=("digits", "0.9"))  # no release 4 here: an anomaly, not an execution
    devices = registry.devices(db)
    assert devices[0]["execution"] is None and devices[0]["anomaly"]["claimed"] == "release 4 active"
    for device in devices:  # as an older server sent them: its executions, none of the newer keys
        device.pop("anomaly")
    devices[0]["execution"] = {"device": "dev-00", "release_id": 4, "state": "active", "reason": "", "updated_at": 1.0}
    text = _render({"devices": devices, "releases": []})
    assert [d[:4] for d in _table(text, "devices")] == [["dev-00", "rpi4", "digits 0.9", "r4 active"],
                                                        ["dev-01", "rpi4", "-", "-"]]
    assert "rollout" not in text and "decisions" not in text and "attention" not in text
    assert _table(_render({}), "devices") == [] and _table(_render({}), "releases") == []


def _rollout(rid: int, model: str, version: str, state: str, stage: int, active: list[int], counts: dict[str, int],
             gates: list[dict] | None = None, installing: int = 0, next_step: str | None = None) -> dict:
    """A rollout as the contract shapes it, over stages 1dev, 50%, 100% of 10 targeted devices;
    `installing` devices are assigned to the current stage and not active yet."""
    return {"id": rid, "model": model, "version": version, "selector": {"site": "lab"}, "profiles": ["rpi4", "x86-vnni"],
            "state": state, "stage": stage, "targeted": 10, "counts": dict.fromkeys(STATES, 0) | counts,
            "stages": [{"label": label, "target": target, "assigned": a + installing * (i == stage), "active": a,
                        "failed": 0, "done": i < stage or state == "completed"}
                       for i, (label, target, a) in enumerate(zip(("1dev", "50%", "100%"), (1, 5, 10), active))],
            "gates": gates or [], "created_at": 100.0 * rid, "updated_at": time.time() - 600, "next": next_step or state}


def test_rollout_panels_gates_decisions_and_drift_from_a_contract_dict():
    gates = [{"name": "install success", "value": "5/5 ok", "threshold": "failed <= 5%", "ok": True, "detail": ""},
             {"name": "error rate", "value": "4.0%", "threshold": "<= 1.5% (previous 0.5%)", "ok": False, "detail": "120/100 calls"},
             {"name": "p95 latency", "value": "-", "threshold": "x1.5 previous", "ok": None, "detail": "waiting: 40/100 calls"}]
    data = {
        "devices": [], "releases": [],
        "rollouts": [
            _rollout(5, "digits", "1.2", "paused", 1, [1, 4, 4], {"active": 4, "installing": 1}, gates, installing=1,
                     next_step="paused: `edgeops rollout resume 5` continues it"),
            _rollout(4, "kws", "2.0", "rolled-back", 0, [0, 0, 0], {"rolled-back": 1}),
            _rollout(3, "digits", "1.1", "superseded", 2, [1, 5, 7], {"active": 7}),
            _rollout(2, "digits", "1.0", "completed", 2, [1, 5, 10], {"active": 10}),
        ],
        "decisions": [{"id": i, "rollout": 5, "t": 1_700_000_000.0 + i, "actor": "engine", "action": "advance",
                       "reason": f"decision {i}"} for i in range(12, 0, -1)],
        "attention": [{"device": "dev-03", "rollout": None, "reason": "offline, not on its release yet"}],
        "drift": [{"model": "digits", "version": "1.1", "status": "retraining recommended", "devices": ["dev-01", "dev-04"]}],
        "generated_at": time.time(),
    }
    text = _render(data)

    assert "rollout #5 digits 1.2 · paused" in text and "rollout #4 kws 2.0 · rolled-back" in text
    assert "rollout #3" not in text and "rollout #2" not in text  # older ones are rows, not panels
    assert _table(text, "earlier rollouts") == [["#3", "digits", "1.1", "superseded", "100%", "7/10", "10m ago"],
                                                ["#2", "digits", "1.0", "completed", "100%", "10/10", "10m ago"]]
    current = _panel_line(text, "◀ current", "50%")
    assert "4/5 active" in current and "1 installing" in current and "━" in current
    assert _panel_line(text, "1dev", "1/1 active").rstrip(" │").endswith("done")
    assert "executions: 1 installing, 4 active" in text
    for mark, name in (("✓", "install success"), ("✗", "error rate"), ("…", "p95 latency")):
        assert f"│ {mark}  {name}" in _panel_line(text, name), name
    assert "<= 1.5% (previous 0.5%)" in _panel_line(text, "error rate", "4.0%")
    assert "next: paused: `edgeops rollout resume 5` continues it" in text
    assert "executions: 1 rolled-back" in text and "next: rolled-back" in text

    decisions = _table(text, f"latest decisions (last {DECISIONS})")
    assert [d[4] for d in decisions] == [f"decision {i}" for i in range(12, 12 - DECISIONS, -1)]
    assert decisions[0][:4] == [time.strftime("%m-%d %H:%M:%S", time.localtime(1_700_000_012.0)), "#5", "engine", "advance"]
    assert _table(text, "drift") == [["digits", "1.1", "retraining recommended", "dev-01, dev-04"]]
    assert _table(text, "needs attention") == [["dev-03", "-", "offline, not on its release yet"]]
