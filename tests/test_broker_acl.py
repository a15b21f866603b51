"""Broker access control on a real Mosquitto started with the files `edgeops fleet mosquitto-config`
writes: the fleet and its devices work with their credentials, a device can neither publish nor read
under another device's id, and wrong credentials are refused at connect.

A denial is silent in MQTT 3.1.1 (Mosquitto acknowledges a refused QoS 1 publish and drops it), so
each check ends with an allowed message sent after the refused ones, on the same connection: once
the observer received it, anything refused would have arrived before it.
"""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from edgeops.agent.service import Agent
from edgeops.fleet import registry
from edgeops.fleet.home import enroll_device, init_fleet, push
from edgeops.fleet.mosquitto import FLEET_USER, hash_password
from edgeops.fleet.server import FleetServer
from edgeops.protocol import wire

sys.path.insert(0, str(Path(__file__).parent))
from fleetkit import AT_ONCE, free_port, secured_mosquitto, wait_for  # noqa: E402
from realparts import missing  # noqa: E402

DEVICES = ("dev-a", "dev-b")


@pytest.fixture
def fleet(tmp_path):
    """A fleet with two enrolled devices and a Mosquitto secured by the generated files."""
    home = init_fleet(tmp_path / "fleet", f"mqtt://127.0.0.1:{free_port()}")
    for device_id in DEVICES:
        enroll_device(home, device_id, "x86-vnni", {"site": "lab"}, tmp_path / device_id)
    broker = secured_mosquitto(home, tmp_path / "broker")
    yield home
    broker.stop()


class Client:
    """A plain paho client that records what it receives and the outcome of its CONNECT."""

    def __init__(self, url: str, username: str | None, password: str | None):
        self.messages: list[tuple[str, bytes]] = []
        self.connack: list[mqtt.ReasonCode] = []
        self.granted: list[list[mqtt.ReasonCode]] = []
        host, port = url.removeprefix("mqtt://").split(":")
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="", clean_session=True, protocol=mqtt.MQTTv311)
        if username is not None:
            self.client.username_pw_set(username, password)
        self.client.on_connect = lambda c, u, f, rc, p: self.connack.append(rc)
        self.client.on_message = lambda c, u, m: self.messages.append((m.topic, m.payload))
        self.client.on_subscribe = lambda c, u, mid, codes, p: self.granted.append(codes)
        self.client.connect(host, int(port))
        self.client.loop_start()
        wait_for(lambda: self.connack, "CONNACK", 10)

    @property
    def accepted(self) -> bool:
        return not self.connack[0].is_failure

    def subscribe(self, *topics: str) -> list[mqtt.ReasonCode]:
        before = len(self.granted)
        self.client.subscribe([(t, 1) for t in topics])
        wait_for(lambda: len(self.granted) > before, "SUBACK", 10)
        return self.granted[-1]

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> None:
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        info.wait_for_publish(timeout=10)
        assert info.is_published(), f"no PUBACK for {topic}"

    def received(self, payload: bytes) -> bool:
        return any(p == payload for _, p in self.messages)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def device_client(home, device_id: str, password: str | None = None) -> Client:
    secret = json.loads((home.path.parent / device_id / "device.json").read_text())["password"]
    return Client(home.config["broker"], device_id, secret if password is None else password)


def fleet_client(home) -> Client:
    return Client(home.config["broker"], home.config["username"], home.config["password"])


def test_generated_files_hold_hashes_in_mosquitto_format(fleet, tmp_path):
    passwd = dict(line.split(":", 1) for line in (tmp_path / "broker" / "passwd").read_text().splitlines())
    assert sorted(passwd) == sorted([FLEET_USER, *DEVICES])
    for device_id in DEVICES:
        password = json.loads((tmp_path / device_id / "device.json").read_text())["password"]
        _, seven, iterations, salt, _ = passwd[device_id].split("$")
        assert seven == "7" and len(base64.b64decode(salt)) == 12
        assert hash_password(password, base64.b64decode(salt), int(iterations)) == passwd[device_id]
        assert password.encode() not in (tmp_path / "fleet" / "registry.db").read_bytes()
        assert registry.password_hashes(registry.open_db(fleet.db_path))[device_id] != password
        assert (tmp_path / device_id / "device.json").stat().st_mode & 0o777 == 0o600
    for name in ("fleet/fleet.json", "broker/passwd"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o600, name
    conf = (tmp_path / "broker" / "mosquitto.conf").read_text()
    assert "allow_anonymous false" in conf and f"password_file {tmp_path / 'broker' / 'passwd'}" in conf


def test_hash_matches_mosquitto_passwd(tmp_path):
    binary = shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd"
    if not Path(binary).exists():
        missing("mosquitto_passwd is not installed (it comes with mosquitto)")
    passwd = tmp_path / "passwd"
    passwd.touch()
    subprocess.run([binary, "-b", str(passwd), "alice", "s3cret"], check=True, timeout=10)
    _, digest = passwd.read_text().strip().split(":", 1)
    _, _, iterations, salt, _ = digest.split("$")
    assert hash_password("s3cret", base64.b64decode(salt), int(iterations)) == digest


def test_fleet_and_devices_work_with_credentials(fleet, tmp_path, slot_releases):
    server = FleetServer(fleet, fleet.config["broker"]).start()
    stop = threading.Event()
    agents = [Agent(tmp_path / d) for d in DEVICES]
    threads = [threading.Thread(target=a.run, args=(stop,), daemon=True) for a in agents]
    for t in threads:
        t.start()
    try:
        release = push(fleet, [slot_releases.v1], {"site": "lab"}, plan=AT_ONCE)
        db = registry.open_db(fleet.db_path)
        wait_for(lambda: [r["state"] for r in db["executions"].rows_where("release_id = ?", [release])] == ["active"] * 2,
                 "both devices to report the release active")
        assert all(a.installed()["version"] == "1.0.0" for a in agents)
        assert all(d["online"] for d in registry.status(db)["devices"])
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=10)
        server.stop()


def test_device_cannot_publish_under_another_id(fleet):
    observer, intruder = fleet_client(fleet), device_client(fleet, "dev-a")
    try:
        assert not any(c.is_failure for c in observer.subscribe(f"{wire.PREFIX}/#", f"{wire.STREAMS}/#"))
        forged = b'{"device":"dev-b","online":true,"installed":{"version":"6.6.6"}}'
        for leaf in ("state", "fetch", "telemetry", "desired", "blocks"):
            intruder.publish(wire.topic("dev-b", leaf), forged, retain=True)  # acknowledged, then dropped
        for leaf in wire.DEVICE_SUBSCRIBES:  # nor may it write what the fleet sends to itself
            intruder.publish(wire.topic("dev-a", leaf), forged, retain=True)
        intruder.publish("elsewhere/topic", forged)
        intruder.publish(f"{wire.STREAMS}/{'0' * 64}", forged)  # streams are the fleet's to write
        intruder.publish(wire.topic("dev-a", "state"), b"sentinel")
        wait_for(lambda: observer.received(b"sentinel"), "the device's own state to arrive")
        assert [t for t, p in observer.messages if p == forged] == []
        late = fleet_client(fleet)  # a retained forgery would reach a later subscriber
        late.subscribe(f"{wire.PREFIX}/dev-b/#")
        late.client.publish(wire.topic("dev-b", "desired"), b"sentinel-2", qos=1)
        wait_for(lambda: late.received(b"sentinel-2"), "the fleet's own message to arrive")
        assert not late.received(forged)
        late.close()
    finally:
        observer.close()
        intruder.close()


def test_device_reads_nothing_under_another_id(fleet):
    fleet_side, snoop = fleet_client(fleet), device_client(fleet, "dev-a")
    try:
        secret = b'{"release_id": 7, "target": "for-dev-b-only"}'
        fleet_side.publish(wire.topic("dev-b", "desired"), secret, retain=True)  # before the subscription
        snoop.subscribe("#", f"{wire.PREFIX}/+/state", f"{wire.PREFIX}/dev-b/desired", f"{wire.PREFIX}/dev-b/#",
                        wire.topic("dev-a", "desired"))
        for leaf in ("desired", "blocks", "state", "fetch"):
            fleet_side.publish(wire.topic("dev-b", leaf), secret)
        device_b = device_client(fleet, "dev-b")
        device_b.publish(wire.topic("dev-b", "state"), secret)
        device_b.close()
        fleet_side.publish(wire.topic("dev-a", "desired"), b"sentinel")
        wait_for(lambda: snoop.received(b"sentinel"), "the device's own desired message to arrive")
        assert {t for t, _ in snoop.messages} == {wire.topic("dev-a", "desired")}
    finally:
        fleet_side.close()
        snoop.close()


@pytest.mark.parametrize("who", ["wrong password", "another device's password", "anonymous", "fleet user, device password"])
def test_wrong_credentials_are_refused_at_connect(fleet, who):
    password_b = json.loads((fleet.path.parent / "dev-b" / "device.json").read_text())["password"]
    username, password = {
        "wrong password": ("dev-a", "not-the-password"),
        "another device's password": ("dev-a", password_b),
        "anonymous": (None, None),
        "fleet user, device password": (FLEET_USER, password_b),
    }[who]
    client = Client(fleet.config["broker"], username, password)
    try:
        assert not client.accepted
        assert client.connack[0] == "Not authorized"
    finally:
        client.close()
    right = device_client(fleet, "dev-b")
    assert right.accepted  # while the right credentials still work
    right.close()


def test_cli_writes_the_files(cli_ok, cli_error, tmp_path):
    cli_ok("fleet", "init", tmp_path / "fleet", "--broker", "mqtt://127.0.0.1:18830")
    cli_ok("device", "enroll", "pi-001", "--profile", "rpi4", "--fleet", tmp_path / "fleet", "-o", tmp_path / "pi-001")
    output = cli_ok("fleet", "mosquitto-config", tmp_path / "fleet", "-o", tmp_path / "broker", "--bind", "127.0.0.1").output
    assert f"mosquitto -c {tmp_path / 'broker' / 'mosquitto.conf'}" in output
    assert [line.split(":")[0] for line in (tmp_path / "broker" / "passwd").read_text().splitlines()] == [FLEET_USER, "pi-001"]
    assert "listener 18830 127.0.0.1" in (tmp_path / "broker" / "mosquitto.conf").read_text()
    assert "pattern write edgeops/v1/devices/%u/state" in (tmp_path / "broker" / "acl").read_text()
    config = json.loads((tmp_path / "fleet" / "fleet.json").read_text())
    del config["username"], config["password"]  # a fleet from before broker credentials
    (tmp_path / "fleet" / "fleet.json").write_text(json.dumps(config))
    assert "no broker credentials" in cli_error("fleet", "mosquitto-config", tmp_path / "fleet", "-o", tmp_path / "b2")
