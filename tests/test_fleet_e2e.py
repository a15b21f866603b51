"""End to end over the fleet's own Mosquitto (mutual TLS): fleet init → serve → enroll 3 devices on
2 profiles → push → all active on their own bundle → push v2 → all on v2."""

from __future__ import annotations

import sys
import threading
from pathlib import Path

from edgeops.agent.service import Agent
from edgeops.fleet import registry
from edgeops.fleet.home import enroll_device, push
from edgeops.fleet.server import FleetServer
from edgeops.protocol.bundle import read_bundle

sys.path.insert(0, str(Path(__file__).parent))
from fleetkit import AT_ONCE, PROFILES, fleet_home, releases, wait_for  # noqa: E402,F401  (fixtures)

def test_push_reaches_every_device_on_its_profile(fleet_home, releases, tmp_path):
    home = fleet_home()
    devices = {"dev-a": "x86-vnni", "dev-b": "x86-vnni", "dev-c": "rpi4"}
    for device_id, profile in devices.items():
        enroll_device(home, device_id, profile, {"site": "lab"}, tmp_path / device_id)
    server = FleetServer(home, home.broker_url).start()
    stop = threading.Event()
    agents = [Agent(tmp_path / d) for d in devices]
    threads = [threading.Thread(target=a.run, args=(stop,), daemon=True) for a in agents]
    for t in threads:
        t.start()
    try:
        for version in ("1.0.0", "1.1.0"):
            release = push(home, [releases[(version, p)] for p in PROFILES], {"site": "lab"}, plan=AT_ONCE)
            for agent in agents:
                wait_for(lambda a=agent: (a.installed() or {}).get("version") == version,
                         f"{agent.config.id} to run {version}")
                expected = releases[(version, agent.config.profile)].name
                assert agent.installed()["target"] == expected
                assert read_bundle(agent.slots.active().path).manifest["profile"] == agent.config.profile
            db = registry.open_db(home.db_path)
            wait_for(lambda: all(row["state"] == "active" for row in db["executions"].rows_where("release_id = ?", [release]))
                     and db["executions"].count_where("release_id = ?", [release]) == len(devices),
                     f"the fleet to see release {release} active everywhere")
            status = registry.status(db)
            assert {d["id"]: d["installed_version"] for d in status["devices"]} == {d: version for d in devices}
            assert all(d["online"] for d in status["devices"])
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=10)
        server.stop()
