"""Two telemetry ingest workers on one MQTT shared subscription, on a real Mosquitto secured with the
generated files: each a real process (`python -m edgeops fleet ingest --share GROUP --worker N`),
both writing the same SQLite registry; devices are plain paho clients with their own certificates
publishing `wire.telemetry_batch` payloads (QoS 1) and collecting the fleet's `acks`.

Checked: every record is in the registry exactly once and counted once (`telemetry_devices.received`),
each worker took a share (the broker's log shows which client each message went to), every batch
was acknowledged to its device, and a worker killed with SIGKILL while holding messages it had not
committed (frozen with SIGSTOP first, so it surely holds some) loses nothing and duplicates nothing:
the other worker goes on storing, and the killed one's unacknowledged messages come again from its
persistent session when it restarts. Throughput is measured in bench/ingest_bench.py, not here.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from edgeops.fleet import mosquitto
from edgeops.fleet.home import enroll_device
from edgeops.protocol import mqtt as mqttlib
from edgeops.protocol import wire

sys.path.insert(0, str(Path(__file__).parent))
from fleetkit import FleetBroker, device_tls, new_fleet, wait_for  # noqa: E402

GROUP = "ingest"
DEVICES = 8
BATCH = 10
BODY = '{"model":"digits","version":"1.0.0","latency_ms":0.5,"ok":true}'


class Worker:
    """`edgeops fleet ingest --worker N` as a process, its log in the fleet folder."""

    def __init__(self, fleet: Path, number: int):
        self.fleet, self.number = fleet, number
        self.log = fleet / f"ingest-{number}.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> "Worker":
        self.log.write_text("")
        with open(self.log, "a") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "edgeops", "-v", "fleet", "ingest",
                                          str(self.fleet), "--share", GROUP, "--worker", str(self.number)],
                                         stdout=log, stderr=subprocess.STDOUT)
        wait_for(self._subscribed, f"ingest worker {self.number} to subscribe")
        return self

    def _subscribed(self) -> bool:
        assert self.proc.poll() is None, f"ingest worker {self.number} exited:\n{self.log.read_text()[-2000:]}"
        return "subscribed to $share/" in self.log.read_text()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGCONT)
            self.proc.terminate()
            self.proc.wait(10)


class Device:
    """A device's connection: publishes telemetry batches, keeps the seqs the fleet acknowledged and
    the `desired` messages it received."""

    def __init__(self, device_dir: Path):
        config = json.loads((device_dir / "device.json").read_text())
        self.id, self.acked, self.desired, self.next_seq = config["id"], set(), [], 1
        self._subscribed = threading.Event()
        self.client = mqttlib.client(f"edgeops-agent-{self.id}", config["broker"], device_tls(device_dir))
        self.client.on_connect = lambda c, *a: c.subscribe([(wire.topic(self.id, leaf), 1) for leaf in ("acks", "desired")])
        self.client.on_subscribe = lambda *a: self._subscribed.set()
        self.client.on_message = self._on_message
        self.client.loop_start()
        wait_for(self._subscribed.is_set, f"{self.id} to subscribe to its acks")

    def _on_message(self, client, userdata, message: mqtt.MQTTMessage) -> None:
        if message.topic.endswith("/desired"):
            self.desired.append(message.payload)
        else:
            self.acked.update(wire.parse_telemetry_ack(message.payload))

    def publish(self, batches: int) -> None:
        """`batches` batches of BATCH new records, each taken by the broker (PUBACK) before the next."""
        for _ in range(batches):
            records = [(seq, "inference", float(seq), BODY) for seq in range(self.next_seq, self.next_seq + BATCH)]
            info = self.client.publish(wire.topic(self.id, "telemetry"), wire.telemetry_batch(self.id, records, 0), qos=1)
            info.wait_for_publish(30)
            assert info.is_published(), f"{self.id}: the broker did not take a batch"
            self.next_seq += BATCH

    def stop(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def publish_all(devices: list[Device], batches: int) -> None:
    threads = [threading.Thread(target=d.publish, args=(batches,)) for d in devices]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)


class Registry:
    def __init__(self, path: Path):
        self.db = sqlite3.connect(path)

    def rows(self) -> int:
        return self.db.execute("select count(*) from telemetry").fetchone()[0]

    def received(self) -> int:
        return self.db.execute("select coalesce(sum(received), 0) from telemetry_devices").fetchone()[0]

    def seqs(self, device_id: str) -> list[int]:
        return [s for (s,) in self.db.execute("select seq from telemetry where device = ? order by seq", [device_id])]


class LoggingBroker(FleetBroker):
    """The fleet's Mosquitto logging every packet (`log_type all`), for `delivered_to`."""

    def _write(self) -> Path:
        conf = super()._write()
        with open(conf, "a") as fh:
            fh.write("log_type all\n")
        return conf


@pytest.fixture
def fleet(tmp_path):
    home = new_fleet(tmp_path)
    dirs = [enroll_device(home, f"dev-{i}", "x86-vnni", {}, tmp_path / f"dev-{i}") for i in range(DEVICES)]
    broker = LoggingBroker(home, "127.0.0.1", ingest_workers=2).start()
    workers = [Worker(home.path, 1), Worker(home.path, 2)]
    devices: list[Device] = []
    try:
        for w in workers:
            w.start()
        devices.extend(Device(d) for d in dirs)
        yield home, broker, workers, devices
    finally:
        for d in devices:
            d.stop()
        for w in workers:
            w.stop()
        broker.stop()


def delivered_to(broker, worker: int) -> int:
    """Telemetry messages the broker sent to ingest worker `worker` so far (its log, `log_type all`)."""
    return broker.log_path.read_text().count(f"Sending PUBLISH to _edgeops-fleet-ingest-{worker} ")


def test_two_workers_share_the_stream_and_a_killed_one_loses_and_duplicates_nothing(fleet):
    home, broker, (_, second), devices = fleet
    registry = Registry(home.db_path)

    publish_all(devices, 10)
    wait_for(lambda: registry.rows() == DEVICES * 10 * BATCH, "the first records to be stored")
    assert delivered_to(broker, 1) > 0 and delivered_to(broker, 2) > 0, "one worker took every message"

    # The second worker stops acknowledging (frozen), takes more messages it will never commit, and dies.
    os.kill(second.proc.pid, signal.SIGSTOP)
    taken = delivered_to(broker, 2)
    publish_all(devices, 10)
    wait_for(lambda: delivered_to(broker, 2) > taken, "the frozen worker to be sent messages")
    os.kill(second.proc.pid, signal.SIGKILL)
    second.proc.wait(10)
    stored_while_down = registry.rows()
    publish_all(devices, 10)
    wait_for(lambda: registry.rows() > stored_while_down, "the surviving worker to go on storing")
    assert registry.rows() < DEVICES * 30 * BATCH, "nothing was held by the killed worker"

    second.start()  # the same certificate, so the same broker user and client id: its persistent session comes back
    total = DEVICES * 30 * BATCH
    wait_for(lambda: registry.rows() == total, f"all {total} records to be stored")
    wait_for(lambda: all(len(d.acked) == 30 * BATCH for d in devices), "every record to be acknowledged")
    for d in devices:
        assert registry.seqs(d.id) == list(range(1, 30 * BATCH + 1))
        assert d.acked == set(range(1, 30 * BATCH + 1))
    assert registry.received() == total  # each record counted once, however often it arrived


def test_an_ingest_worker_certificate_reads_only_telemetry_and_writes_only_acks(fleet):
    """The worker's broker user, from its certificate (generated ACL): it cannot read a device's state nor set its desired
    release. Denials are silent, so each ends with an allowed message on the same connection."""
    home, _, workers, (device, *_) = fleet
    for w in workers:
        w.stop()  # this test connects as worker 1 itself (its certificate runs one client at a time)
    got: list[str] = []
    subscribed = threading.Event()
    name = mosquitto.worker_name(1)
    spy = mqttlib.client(f"{mosquitto.FLEET_USER}-{name}", home.broker_url, home.client_tls(name))
    spy.on_connect = lambda c, *a: c.subscribe([(wire.topic(device.id, "state"), 1), (f"$share/{GROUP}/{wire.PREFIX}/+/telemetry", 1)])
    spy.on_subscribe = lambda *a: subscribed.set()
    spy.on_message = lambda c, u, m: got.append(m.topic)
    spy.loop_start()
    try:
        wait_for(subscribed.is_set, "the worker's client to subscribe")
        device.client.publish(wire.topic(device.id, "state"), b'{"device":"dev-0","online":true}', qos=1).wait_for_publish(10)
        device.publish(1)
        wait_for(lambda: wire.topic(device.id, "telemetry") in got, "the telemetry to reach the worker's client")
        assert wire.topic(device.id, "state") not in got

        spy.publish(wire.topic(device.id, "desired"), b'{"release_id": 666}', qos=1, retain=True).wait_for_publish(10)
        spy.publish(wire.topic(device.id, "acks"), wire.telemetry_ack([999]), qos=1).wait_for_publish(10)
        wait_for(lambda: 999 in device.acked, "the worker's ack to reach the device")
        assert device.desired == []
    finally:
        spy.loop_stop()
        spy.disconnect()
