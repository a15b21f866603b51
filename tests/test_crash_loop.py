"""A model that installs and passes its self-test, then takes the agent down every time it serves:
after `crash_loop_starts` starts in a row the agent goes back to the model before, reports the
release failed, and never installs it again. Real agent processes restarted as a supervisor
(systemd's Restart=always) would, a real secured Mosquitto, real signatures."""

from __future__ import annotations

import json
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from fleetkit import AT_ONCE, wait_for  # noqa: E402
from test_fleet_faults import DEVICE, fleet, release_bundle, served_version, wait_active  # noqa: E402,F401  (fleet: fixture)

from edgeops.agent.boots import BootGuard, DEFAULT_LIMIT  # noqa: E402
from edgeops.fleet import registry  # noqa: E402
from edgeops.fleet.home import push  # noqa: E402


def test_a_crash_loop_after_an_update_goes_back_to_the_previous_model(fleet, digits_bundle, tmp_path):
    v1 = push(fleet.home, [release_bundle(digits_bundle.path, "1.0.0", tmp_path)], {}, plan=AT_ONCE)
    crashing = "serving:1.1.0"  # the process dies whenever it serves 1.1.0
    agent = fleet.agent(crashing)
    wait_active(fleet.home, v1, "1.0.0", agent)

    bad = release_bundle(digits_bundle.path, "1.1.0", tmp_path)
    v2 = push(fleet.home, [bad], {}, plan=AT_ONCE)
    agent.wait_killed()  # installed, switched, then down as soon as it served 1.1.0
    assert served_version(fleet.device_dir) == "1.1.0"
    for start in range(1, DEFAULT_LIMIT + 1):  # the supervisor restarts it; each start on 1.1.0 counts
        fleet.agent(crashing).wait_killed()
        assert json.loads((fleet.device_dir / "state" / "boots.json").read_text())["starts"] == start
    survivor = fleet.agent(crashing)  # one start too many: back on 1.0.0, and it stays up
    db = registry.open_db(fleet.home.db_path)
    wait_for(lambda: _execution(db, v2)[0] == "failed", "the fleet to see release 2 failed", 60)
    state, reason = _execution(db, v2)
    assert "crash loop" in reason and "1.1.0" in reason, reason
    assert served_version(fleet.device_dir) == "1.0.0"
    wait_for(lambda: registry.device(db, DEVICE)["installed_version"] == "1.0.0", "the device to report 1.0.0")
    deadline = time.monotonic() + 3  # the retained desired still names 1.1.0: it must not install it again
    while time.monotonic() < deadline:
        assert survivor.proc.poll() is None, survivor.tail()
        time.sleep(0.2)
    assert BootGuard(fleet.device_dir / "state" / "boots.json").quarantined(bad.name)
    survivor.proc.send_signal(signal.SIGTERM)
    survivor.proc.wait(15)


def _execution(db, release: int) -> tuple[str | None, str]:
    row = db.execute("select state, reason from executions where device = ? and release_id = ?", [DEVICE, release]).fetchone()
    return (row[0], row[1]) if row else (None, "")


def test_the_start_count_clears_once_the_model_stays_up(tmp_path):
    guard = BootGuard(tmp_path / "boots.json", limit=2)
    assert [guard.start("a") for _ in range(2)] == [False, False]
    guard.healthy()  # it served long enough: earlier starts no longer count
    assert [guard.start("a") for _ in range(3)] == [False, False, True]
    assert guard.start("b") is False  # another model starts its own count
    guard.quarantine("a")
    assert BootGuard(tmp_path / "boots.json").quarantined("a") and not guard.quarantined("b")


def test_with_no_earlier_model_a_crash_loop_keeps_what_it_has(slot_releases, tmp_path):
    from edgeops.agent.slots import SlotStore

    store = SlotStore(tmp_path)
    store.install(slot_releases.v1)
    assert store.revert() is None and store.active().manifest["version"] == "1.0.0"
    store.install(slot_releases.v2)
    assert store.revert().manifest["version"] == "1.0.0"
    assert SlotStore(tmp_path).active().manifest["version"] == "1.0.0"  # the switch is on disk
