"""Faults on the real thing: agent processes (`python -m edgeops agent run`) killed with SIGKILL
mid-download and at every install step, and Mosquitto (secured with the generated files, persistent)
restarted mid-transfer. After each fault the device converges to the desired release, active.

Kills are placed by the EDGEOPS_FAILPOINT hooks (agent/transport.py, agent/slots.py), so each one
lands exactly where it is meant to. A spy on the fleet server's MQTT client records every target
target stream request it receives and, for the broker restart, slows the stream so a transfer lasts
seconds.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from edgeops.agent.partial import PartialDownload
from edgeops.agent.slots import FAILPOINT_ENV, POINTER
from edgeops.fleet import registry
from edgeops.fleet.home import enroll_device, push
from edgeops.fleet.server import FleetServer
from edgeops.protocol.bundle import build_bundle, bundle_filename, canonical_json, read_bundle
from edgeops.protocol import wire
from edgeops.protocol.wire import MAX_BLOCK

sys.path.insert(0, str(Path(__file__).parent))
from fleetkit import AT_ONCE, new_fleet, secured_mosquitto, wait_for  # noqa: E402

DEVICE = "dev-1"
INSTALL_FAILPOINTS = [f"{when}:{step}" for step in ("writing", "loading", "self-test", "switching")
                      for when in ("before", "after")]


class FetchSpy:
    """Wraps the fleet server: records the blocks each target stream request asks for, and delays
    each block the server streams by `delay` seconds."""

    def __init__(self, server: FleetServer):
        self.requests: list[list[int]] = []
        self.delay = 0.0
        inner, publish = server.client.on_message, server.streams.publish

        def on_message(client, userdata, message) -> None:
            if message.topic.endswith("/fetch"):
                request = wire.parse_fetch_request(message.payload)
                if "blocks" in request:
                    self.requests.append(request["blocks"])
            inner(client, userdata, message)

        def slow_publish(topic: str, payload: bytes):
            time.sleep(self.delay)
            return publish(topic, payload)

        server.client.on_message = on_message
        server.streams.publish = slow_publish


class AgentProcess:
    """`python -m edgeops agent run DEVICE_DIR`, optionally with a failpoint; its log in DEVICE_DIR/agent.log."""

    def __init__(self, device_dir: Path, failpoint: str | None = None):
        env = {k: v for k, v in os.environ.items() if k != FAILPOINT_ENV}
        if failpoint:
            env[FAILPOINT_ENV] = failpoint
        self.log = device_dir / "agent.log"
        with open(self.log, "a") as log:
            log.write(f"--- agent start, failpoint={failpoint}\n")
            log.flush()
            self.proc = subprocess.Popen([sys.executable, "-m", "edgeops", "-v", "agent", "run", str(device_dir), "--api", "127.0.0.1:0"],
                                         env=env, stdout=log, stderr=log)

    def tail(self) -> str:
        return self.log.read_text()[-3000:]

    def wait_killed(self, timeout: float = 60) -> None:
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.stop()
            raise AssertionError(f"the agent did not hit its failpoint within {timeout}s:\n{self.tail()}") from None
        assert code == -signal.SIGKILL, f"the agent exited with {code}, not by its failpoint:\n{self.tail()}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


@pytest.fixture
def fleet(tmp_path):
    """A fleet with one device, a secured persistent Mosquitto, and a running fleet server with a FetchSpy."""
    home = new_fleet(tmp_path)
    enroll_device(home, DEVICE, "x86-vnni", {}, tmp_path / DEVICE)
    broker = secured_mosquitto(home, tmp_path / "broker")
    server = FleetServer(home, home.broker_url)
    spy = FetchSpy(server)
    server.start()
    agents: list[AgentProcess] = []

    def agent(failpoint: str | None = None) -> AgentProcess:
        agents.append(AgentProcess(tmp_path / DEVICE, failpoint))
        return agents[-1]

    yield SimpleNamespace(home=home, broker=broker, spy=spy, agent=agent, device_dir=tmp_path / DEVICE)
    for a in agents:
        a.stop()
    server.stop()
    broker.stop()


def release_bundle(source: Path, version: str, outdir: Path, padding: int = 0) -> Path:
    """`source` re-versioned; `padding` random bytes (base64, so deflate cannot shrink them much) in
    reference.json make it big enough to interrupt mid-download."""
    bundle = read_bundle(source)
    members = dict(bundle.members)
    if padding:
        reference = json.loads(members["reference.json"])
        reference["padding"] = base64.b64encode(os.urandom(padding)).decode()
        members["reference.json"] = canonical_json(reference)
    path = outdir / bundle_filename(bundle.manifest["name"], version, bundle.manifest["profile"])
    path.write_bytes(build_bundle(dict(bundle.manifest, version=version), members))
    return path


def wait_active(home, release: int, version: str, agent: AgentProcess, timeout: float = 60) -> None:
    db = registry.open_db(home.db_path)

    def done() -> bool:
        assert agent.proc.poll() is None, f"the agent died:\n{agent.tail()}"
        states = [row["state"] for row in db["executions"].rows_where("device = ? and release_id = ?", [DEVICE, release])]
        return states == ["active"] and registry.device(db, DEVICE)["installed_version"] == version

    try:
        wait_for(done, f"{DEVICE} to report release {release} ({version}) active", timeout)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{agent.tail()}") from None


def served_version(device_dir: Path) -> str | None:
    """The version the slot pointer names, read without touching the state (the agent recovers it)."""
    state = device_dir / "state"
    if not (state / POINTER).exists():
        return None
    slot = (state / POINTER).read_text().strip()
    return read_bundle(state / "slots" / slot / "bundle.edgeops").manifest["version"]


def test_kill_during_download_resumes_where_it_stopped(fleet, digits_bundle, tmp_path):
    bundle = release_bundle(digits_bundle.path, "1.0.0", tmp_path, padding=1_200_000)
    length = bundle.stat().st_size
    blocks = -(-length // MAX_BLOCK)
    assert blocks > 6
    fleet.spy.delay = 0.05  # blocks one by one: the agent stores what has arrived in one go, maybe all of it
    release = push(fleet.home, [bundle], {}, plan=AT_ONCE)
    [target] = registry.releases(registry.open_db(fleet.home.db_path))[-1]["targets"]
    sha256 = target["sha256"]
    part = fleet.device_dir / "state" / "downloads" / f"{sha256}.part"

    fleet.agent("after:block:3").wait_killed()
    kept = PartialDownload(part, length).have  # every block logged was fsync'd before the kill
    assert 3 <= len(kept) < blocks, kept
    assert fleet.spy.requests[0] == list(range(blocks))
    before = len(fleet.spy.requests)

    agent = fleet.agent()
    wait_active(fleet.home, release, "1.0.0", agent)
    resumed = fleet.spy.requests[before:]
    assert resumed[0] == sorted(set(range(blocks)) - kept), resumed  # asks only for what it lacked
    assert not any(set(request) & kept for request in resumed)
    assert not list(part.parent.iterdir())
    assert served_version(fleet.device_dir) == "1.0.0"


def test_kill_at_every_install_step_converges(fleet, digits_bundle, tmp_path):
    previous = None
    for number, point in enumerate(INSTALL_FAILPOINTS, start=1):
        version = f"1.0.{number}"
        release = push(fleet.home, [release_bundle(digits_bundle.path, version, tmp_path)], {}, plan=AT_ONCE)
        fleet.agent(point).wait_killed()
        # The kill leaves the old model served, unless it came after the switch.
        assert served_version(fleet.device_dir) == (version if point == "after:switching" else previous), point
        agent = fleet.agent()
        wait_active(fleet.home, release, version, agent)
        agent.stop()
        assert served_version(fleet.device_dir) == version, point
        state = fleet.device_dir / "state"
        assert not (state / "install.json").exists() and list((state / "downloads").iterdir()) == [], point
        previous = version


def test_broker_restart_mid_transfer_completes(fleet, digits_bundle, tmp_path):
    bundle = release_bundle(digits_bundle.path, "1.0.0", tmp_path, padding=3_000_000)
    length = bundle.stat().st_size
    fleet.spy.delay = 0.1  # ~2.5 s for the whole transfer
    release = push(fleet.home, [bundle], {}, plan=AT_ONCE)
    [target] = registry.releases(registry.open_db(fleet.home.db_path))[-1]["targets"]
    sha256 = target["sha256"]
    part = fleet.device_dir / "state" / "downloads" / f"{sha256}.part"
    agent = fleet.agent()

    def stored() -> set[int]:
        return PartialDownload(part, length).have if part.exists() else set()

    wait_for(lambda: len(stored()) >= 2, "the download to start")
    fleet.broker.stop()
    at_stop, before = stored(), len(fleet.spy.requests)
    assert len(at_stop) < -(-length // MAX_BLOCK), "the transfer finished before the broker stopped; slow it down"
    fleet.broker.start()
    wait_active(fleet.home, release, "1.0.0", agent)
    after = fleet.spy.requests[before:]
    assert not any(set(request) & at_stop for request in after), after  # continued, never restarted from 0
    assert served_version(fleet.device_dir) == "1.0.0"
