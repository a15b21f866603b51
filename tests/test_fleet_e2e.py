"""End to end over a real broker: fleet init → serve → enroll 3 devices on 2 profiles → push → all
active on their own bundle → push v2 → all on v2. Runs on Mosquitto (what CI installs) and on the
embedded amqtt broker (the zero-setup default)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from edgeops.agent.service import Agent
from edgeops.compiler.build import BuildRequest, build
from edgeops.fleet import registry
from edgeops.fleet.broker import EmbeddedBroker
from edgeops.fleet.home import enroll_device, init_fleet, push
from edgeops.fleet.server import FleetServer
from edgeops.protocol.bundle import read_bundle

DEADLINE_S = 60
PROFILES = ("x86-vnni", "rpi4")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(condition, what: str, timeout: float = DEADLINE_S):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def mosquitto_broker(tmp_path: Path):
    binary = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None)
    if binary is None:
        if os.environ.get("CI") == "true":
            pytest.fail("mosquitto is not installed (CI installs it with apt-get)")
        pytest.skip("mosquitto is not installed")
    port = free_port()
    conf = tmp_path / "mosquitto.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n")
    proc = subprocess.Popen([binary, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(lambda: _listening(port), "mosquitto to listen", 10)
    return f"mqtt://127.0.0.1:{port}", proc.terminate


def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
        return True
    except OSError:
        return False


@pytest.fixture(params=["mosquitto", "amqtt"])
def broker(request, tmp_path):
    if request.param == "mosquitto":
        url, stop = mosquitto_broker(tmp_path)
    else:
        embedded = EmbeddedBroker("127.0.0.1", free_port()).start()
        url, stop = embedded.url, embedded.stop
    yield url
    stop()


@pytest.fixture(scope="session")
def releases(digits_model, tmp_path_factory):
    """The digits MLP built for two profiles, as versions 1.0.0 and 1.1.0."""
    out = tmp_path_factory.mktemp("releases")
    built = {}
    for version in ("1.0.0", "1.1.0"):
        for profile in PROFILES:
            report = build(BuildRequest(digits_model.onnx, profile, digits_model.calib, digits_model.eval,
                                        name="digits", version=version, outdir=out))
            built[(version, profile)] = Path(report["bundle"])
    return built


def test_push_reaches_every_device_on_its_profile(broker, releases, tmp_path):
    home = init_fleet(tmp_path / "fleet", broker)
    devices = {"dev-a": "x86-vnni", "dev-b": "x86-vnni", "dev-c": "rpi4"}
    for device_id, profile in devices.items():
        enroll_device(home, device_id, profile, {"site": "lab"}, tmp_path / device_id)
    server = FleetServer(home, broker).start()
    stop = threading.Event()
    agents = [Agent(tmp_path / d) for d in devices]
    threads = [threading.Thread(target=a.run, args=(stop,), daemon=True) for a in agents]
    for t in threads:
        t.start()
    try:
        for version in ("1.0.0", "1.1.0"):
            release = push(home, [releases[(version, p)] for p in PROFILES], {"site": "lab"})
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
