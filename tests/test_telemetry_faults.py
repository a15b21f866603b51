"""Telemetry end to end: zero records lost or duplicated across a broker outage, a kill -9 of the agent
mid-forward, a Mosquitto restart mid-forward and a full outbox, on the real thing: the agent as a
subprocess (`python -m edgeops agent run DIR --api 127.0.0.1:0`) serving the real digits bundle,
records made by real inferences through its local HTTP API, a secured persistent Mosquitto, and a
FleetServer ingesting into its SQLite registry. What the device made (its outbox, read from the file)
is compared with what the fleet stored, record by record.

Kills and the broker stop land mid-forward by construction: the agent is frozen (SIGSTOP) while its
outbox is read, and is killed, or the broker stopped, only once some but not all of a backlog was
acknowledged; otherwise it is let go on (SIGCONT) and looked at again.
"""

from __future__ import annotations

import getpass
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import paho.mqtt.client as mqtt
import pytest

from edgeops.agent import api_client
from edgeops.fleet import registry, telemetry
from edgeops.fleet import mosquitto as mosquitto_config
from edgeops.fleet.home import enroll_device, push
from edgeops.fleet.server import FleetServer
from edgeops.protocol import wire
from edgeops.protocol.bundle import atomic_write, canonical_json, read_bundle
from edgeops.protocol.mqtt import BrokerAddress

sys.path.insert(0, str(Path(__file__).parent))
from fleetkit import (AT_ONCE, DEADLINE_S, FleetBroker, attacker_tls, fleet_home, new_fleet,  # noqa: E402,F401  (fixture)
                      secured_mosquitto, wait_for)
from test_fleet_faults import DEVICE, AgentProcess, wait_active  # noqa: E402


class ApiAgent(AgentProcess):
    """AgentProcess with the local inference API on a free port (found in state/api.json)."""

    def __init__(self, device_dir: Path):
        self.log, self.device_dir = device_dir / "agent.log", device_dir
        with open(self.log, "a") as log:
            log.write("--- agent start, --api 127.0.0.1:0\n")
            log.flush()
            self.proc = subprocess.Popen([sys.executable, "-m", "edgeops", "-v", "agent", "run", str(device_dir),
                                          "--api", "127.0.0.1:0"], stdout=log, stderr=subprocess.STDOUT)

    def wait_serving(self, stale_url: str | None = None) -> str:
        """The URL of this agent's API once it answers (not `stale_url`, a dead agent's leftover)."""
        path = self.device_dir / "state" / "api.json"

        def url() -> str | None:
            assert self.proc.poll() is None, f"the agent died:\n{self.tail()}"
            try:
                found = json.loads(path.read_text())["url"]
            except (OSError, ValueError):
                return None
            return found if found != stale_url else None

        return wait_for(url, "the agent to serve its inference API")

    def kill(self) -> None:
        os.kill(self.proc.pid, signal.SIGKILL)
        assert self.proc.wait(10) == -signal.SIGKILL

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGCONT)  # left frozen by a failed test: let it see SIGTERM
        super().stop()


class DeviceOutbox:
    """The agent's outbox database, read from the test (WAL: readers never block the agent)."""

    def __init__(self, device_dir: Path):
        self.db = sqlite3.connect(device_dir / "state" / "outbox.db", isolation_level=None)

    def seqs(self, kind: str | None = None) -> set[int]:
        """Seqs of `kind`, or of every record but the agent's periodic metrics."""
        where, args = ("kind = ?", [kind]) if kind else ("kind != 'metrics'", [])
        return {seq for (seq,) in self.db.execute(f"select seq from records where {where}", args)}

    def count(self) -> int:
        return self.db.execute("select count(*) from records").fetchone()[0]

    def dropped(self) -> int:
        return self.db.execute("select value from counters where name = 'dropped'").fetchone()[0]


class FleetRecords:
    """What the fleet stored for DEVICE, read from its registry."""

    def __init__(self, db_path: Path):
        self.db = registry.open_db(db_path)

    def seqs(self, kind: str | None = None) -> list[int]:
        """Every stored seq of `kind`, or of every record but metrics, repeats included (the primary key
        should make them impossible)."""
        where, args = ("kind = ?", [kind]) if kind else ("kind != 'metrics'", [])
        return [seq for (seq,) in self.db.execute(f"select seq from telemetry where device = ? and {where} order by seq",
                                                  [DEVICE, *args]).fetchall()]

    def rows(self) -> int:
        return self.db.execute("select count(*) from telemetry where device = ?", [DEVICE]).fetchone()[0]

    def counts(self) -> dict[str, int]:
        return telemetry.counts(self.db, DEVICE)


def configure(device_dir: Path, **options) -> None:
    """Set device.json's "agent" options, as an operator edits it after enrollment."""
    config = json.loads((device_dir / "device.json").read_text())
    config["agent"] = {**config.get("agent", {}), **options}
    atomic_write(device_dir / "device.json", canonical_json(config), mode=0o600)


class GeneratedConfigBroker(FleetBroker):
    """The fleet's Mosquitto with the files `edgeops fleet mosquitto-config` writes as they are (no
    persistence), logging every packet to `log`."""

    def _write(self) -> Path:
        extra = [f"log_dest file {self.log_path.resolve()}", "log_type all",
                 f"user {getpass.getuser()}"]  # as root Mosquitto would switch to user mosquitto, who cannot read the keys
        return mosquitto_config.write_config(self.home, self.folder, self.bind, self.ingest_workers, extra)["conf"]

    @property
    def log(self) -> Path:
        return self.log_path


@pytest.fixture
def deployed(tmp_path, digits_bundle):
    """`start(**agent_options)`: a fleet with DEVICE, a secured persistent Mosquitto, a fleet server,
    the digits bundle pushed, and an ApiAgent that installed it and serves it."""
    cleanup = []

    def start(persistent: bool = True, **options) -> SimpleNamespace:
        home = new_fleet(tmp_path)
        device_dir = enroll_device(home, DEVICE, "x86-vnni", {}, tmp_path / DEVICE)
        configure(device_dir, metrics_interval_s=3600, **options)  # one metrics record per agent start
        if persistent:
            mosquitto = secured_mosquitto(home, tmp_path / "broker")
        else:  # what `edgeops fleet mosquitto-config` writes: no persistence
            mosquitto = GeneratedConfigBroker(home, "127.0.0.1").start()
        cleanup.append(mosquitto.stop)
        version = read_bundle(digits_bundle.path).manifest["version"]
        release = push(home, [digits_bundle.path], {}, plan=AT_ONCE)
        d = SimpleNamespace(home=home, device_dir=device_dir, broker=mosquitto, fleet=FleetRecords(home.db_path),
                            agent=None, url=None, server=None, subscribed=threading.Event())

        def run_server() -> FleetServer:
            """A fleet server; `d.subscribed` is set when the broker confirmed its subscriptions."""
            d.server = FleetServer(home, home.broker_url)
            d.server.client.on_subscribe = lambda *args: d.subscribed.set()
            cleanup.append(d.server.start().stop)
            return d.server

        d.run_server = run_server
        run_server()

        def run_agent() -> ApiAgent:
            agent = ApiAgent(device_dir)
            cleanup.append(agent.stop)
            d.url = agent.wait_serving(d.url)
            d.agent = agent
            return agent

        d.run_agent = run_agent
        wait_active(home, release, version, run_agent())
        d.outbox = DeviceOutbox(device_dir)
        # The agent's start-up metrics record reached the fleet: from here on it makes only what we ask.
        wait_for(lambda: d.fleet.seqs("metrics") and not d.outbox.count(), "the start-up metrics record to arrive")
        return d

    yield start
    for stop in reversed(cleanup):
        stop()


def infer_many(device_dir: Path, calls: int, batch: int, pixels: np.ndarray) -> int:
    """`calls` inferences of `batch` samples each through the agent's HTTP API; all must be answered.

    One call at a time: np.load parses .npy headers with `ast`, which CPython 3.11 does not make safe
    in concurrent threads (gh-106905: a spurious SystemError, seen here with two client threads)."""
    for i in range(calls):
        start = i * 7 % (len(pixels) - batch)
        answer = api_client.infer(device_dir, {"pixels": pixels[start : start + batch]})
        assert answer["outputs"]["probabilities"].shape == (batch, 10), f"call {i}"
    return calls


def wait_recorded(d: SimpleNamespace, made: int, after: int = 0) -> set[int]:
    """Once the agent committed all `made` inference records after seq `after` (the outbox must not
    drop any), the seqs of every record it made with them (the inference records, and the drift
    windows they completed, committed together)."""
    def newer(kind: str | None = None) -> set[int]:
        return {seq for seq in d.outbox.seqs(kind) if seq > after}

    wait_for(lambda: len(newer("inference")) >= made, f"the agent to record {made} inferences")
    assert d.outbox.dropped() == 0
    return newer()


def assert_exactly_once(d: SimpleNamespace, expected: set[int]) -> None:
    """The fleet holds each of `expected` (the device's inference seqs) once, and nothing else."""
    stored = d.fleet.seqs()
    assert len(stored) == len(set(stored)), "a record was stored twice"
    missing, extra = expected - set(stored), set(stored) - expected
    assert not missing and not extra, f"missing {sorted(missing)[:10]} (of {len(missing)}), extra {sorted(extra)[:10]}"
    # The fleet's own count of what it received: each record counted once, however often it was sent.
    assert d.fleet.counts()["received"] == d.fleet.rows()


def wait_delivered(d: SimpleNamespace, expected: set[int], timeout: float = 90) -> None:
    try:
        wait_for(lambda: len(set(d.fleet.seqs())) >= len(expected) and not d.outbox.count(),
                 f"{len(expected)} records at the fleet and an empty outbox", timeout)
    except AssertionError as exc:
        raise AssertionError(f"{exc}: fleet has {len(set(d.fleet.seqs()))}, outbox {d.outbox.count()}\n"
                             f"{d.agent.tail()}") from None
    assert_exactly_once(d, expected)


def freeze_mid_forward(d: SimpleNamespace, backlog: set[int]) -> int:
    """Leave the agent frozen (SIGSTOP) at a moment when between 20 % and 80 % of `backlog` is still
    in its outbox, i.e. forwarding has started and is far from done; returns how many are left."""
    pid, deadline = d.agent.proc.pid, time.monotonic() + DEADLINE_S
    while time.monotonic() < deadline:
        os.kill(pid, signal.SIGSTOP)
        left = len(d.outbox.seqs() & backlog)
        if 0.2 * len(backlog) <= left <= 0.8 * len(backlog):
            return left
        os.kill(pid, signal.SIGCONT)
        assert left > 0.2 * len(backlog), f"forwarding went from above 80 % to below 20 % between two looks ({left})"
        time.sleep(0.002)  # let it run a moment, then look again
    os.kill(pid, signal.SIGCONT)
    raise AssertionError(f"forwarding never got under way:\n{d.agent.tail()}")


def unread_by_broker(port: int) -> int:
    """Bytes sent to the broker listening on `port` that it has not read yet: its sockets' receive
    queues and its clients' send queues, from /proc/net/tcp."""
    total = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, remote, queues = fields[1], fields[2], fields[4]
        tx, rx = (int(value, 16) for value in queues.split(":"))
        if int(local.rsplit(":", 1)[1], 16) == port:
            total += rx
        elif int(remote.rsplit(":", 1)[1], 16) == port:
            total += tx
    return total


@pytest.fixture(scope="module")
def pixels(digits_model) -> np.ndarray:
    return np.load(digits_model.eval)["pixels"]


def test_broker_down_for_the_whole_run_then_up_delivers_everything(deployed, pixels):
    d = deployed()
    d.broker.stop()
    made = infer_many(d.device_dir, 300, 1, pixels)
    recorded = wait_recorded(d, made)
    assert d.fleet.seqs() == []

    d.broker.start()
    wait_delivered(d, recorded)
    assert d.fleet.counts()["dropped"] == 0


def test_agent_killed_mid_forward_resends_exactly_what_was_not_acknowledged(deployed, pixels):
    d = deployed()
    d.broker.stop()
    made = infer_many(d.device_dir, 1500, 64, pixels)  # ~700 B each, and drift windows: dozens of batches
    backlog = wait_recorded(d, made)
    assert len(backlog & d.outbox.seqs("inference")) == made

    d.broker.start()
    left = freeze_mid_forward(d, backlog)
    d.agent.kill()
    assert len(d.outbox.seqs() & backlog) == left  # the kill lost nothing the agent had not forgotten

    d.run_agent()
    wait_delivered(d, backlog)
    assert d.fleet.counts() == {"received": d.fleet.rows(), "dropped": 0}
    assert len(d.fleet.seqs("inference")) == made
    assert len(d.fleet.seqs("metrics")) == 2  # one per agent start, each once


def test_records_the_broker_never_acknowledged_survive_a_kill(deployed, pixels):
    """The broker hangs (SIGSTOP) with the agent's published batches unread in its socket; the agent is
    killed, the broker crashes (SIGKILL: what it had not read is gone), both restart: the records come
    again from the agent's outbox, because only the broker's PUBACK removes them."""
    d = deployed()
    os.kill(d.broker.proc.pid, signal.SIGSTOP)
    try:
        made = infer_many(d.device_dir, 300, 1, pixels)
        published = wait_recorded(d, made)
        # Its first batches (it keeps at most four unacknowledged) wait, unread, in the broker's socket.
        wait_for(lambda: unread_by_broker(d.broker.port) >= 1000, "the agent to publish records to the hung broker")
        d.agent.kill()
        assert d.outbox.seqs() == published  # sent, never acknowledged: all still there
    finally:
        d.broker.proc.kill()
        d.broker.proc.wait()
    assert d.fleet.seqs() == []
    d.subscribed.clear()
    d.broker.start()
    # A crashed broker forgot the fleet's subscriptions; wait until they are back (see
    # test_records_sent_before_the_fleet_resubscribes_are_not_lost for what happens otherwise).
    wait_for(d.subscribed.is_set, "the fleet server to subscribe again")
    d.run_agent()
    wait_delivered(d, published)


def test_records_sent_before_the_fleet_resubscribes_are_not_lost(deployed, pixels):
    """The broker (the generated configuration, without persistence) and the fleet server restart, as
    after a reboot of the fleet's host; the agent comes back to the broker first and forwards what it
    made meanwhile."""
    d = deployed(persistent=False)
    d.server.stop()
    d.broker.stop()
    early = infer_many(d.device_dir, 50, 1, pixels)
    before = wait_recorded(d, early)
    sent = f"Received PUBLISH from {DEVICE} (d0, q1, r0, m"
    published = d.broker.log.read_text().count(sent)
    d.broker.start()
    # The broker takes (PUBACKs) the telemetry no one subscribes to yet, and drops it.
    wait_for(lambda: d.broker.log.read_text().count(sent) > published, "the agent to forward to the restarted broker")
    d.subscribed.clear()
    d.run_server()
    wait_for(d.subscribed.is_set, "the fleet server to subscribe")
    infer_many(d.device_dir, 1, 1, pixels)
    # Unacknowledged by the fleet, the records stayed in the outbox and are sent again.
    wait_for(lambda: before <= set(d.fleet.seqs()), "every record made while the fleet was away", timeout=60)
    wait_for(lambda: not d.outbox.count(), "the outbox to empty")


def test_mosquitto_restart_mid_forward_delivers_everything_once(deployed, pixels):
    d = deployed()
    d.broker.stop()
    made = infer_many(d.device_dir, 1200, 64, pixels)
    backlog = wait_recorded(d, made)

    d.broker.start()
    freeze_mid_forward(d, backlog)
    d.broker.stop()  # whatever the agent sent and the broker did or did not acknowledge is in the air
    os.kill(d.agent.proc.pid, signal.SIGCONT)
    more = infer_many(d.device_dir, 200, 64, pixels)  # records keep coming while the broker is down
    newer = wait_recorded(d, more, after=max(backlog))
    d.broker.start()
    wait_delivered(d, backlog | newer)
    assert len(d.fleet.seqs("inference")) == made + more


def test_full_outbox_accounts_for_every_record(deployed, pixels):
    window = 250
    d = deployed(outbox_bytes=20000, drift_window=window)
    d.broker.stop()
    calls = infer_many(d.device_dir, 600, 1, pixels)
    made = calls + calls // window  # an inference record per call, a drift record per full window of samples
    wait_for(lambda: len(d.outbox.seqs()) + d.outbox.dropped() == made, f"the agent to record {made} records")
    kept = d.outbox.seqs()
    assert d.outbox.dropped() > 0

    d.broker.start()
    wait_delivered(d, kept)
    counts = d.fleet.counts()
    metrics = len(d.fleet.seqs("metrics"))
    assert metrics == 1
    assert counts["received"] + counts["dropped"] == made + metrics
    assert counts["dropped"] == made - len(kept)
    # The ones kept are the newest: one unbroken run of seqs up to the last record made.
    stored = d.fleet.seqs()
    assert stored == list(range(stored[0], stored[0] + len(stored))) and stored[-1] == made + metrics


def test_fleet_ignores_forged_malformed_and_replayed_telemetry(fleet_home, tmp_path):
    home = fleet_home()
    for device_id in (DEVICE, "dev-2"):
        enroll_device(home, device_id, "x86-vnni", {}, tmp_path / device_id)
    server = FleetServer(home, home.broker_url).start()
    # An attacker who owns the broker (every right on it), so the fleet itself must refuse what it sends.
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="telemetry-attacker")
    client.tls_set_context(attacker_tls(home).context())
    address = BrokerAddress.parse(home.broker_url)
    try:
        wait_for(server.connected.is_set, "the fleet server to connect")
        client.connect(address.host, address.port)
        client.loop_start()
        good = (1, "inference", 1.5, '{"model":"digits","version":"1.0.0","ok":true}')
        record = lambda **kw: {"seq": 7, "kind": "inference", "t": 1.0, "body": {}, **kw}  # noqa: E731
        batch = lambda records, **kw: json.dumps({"device": DEVICE, "dropped": 0, "records": records, **kw}).encode()  # noqa: E731
        bad = [
            (DEVICE, wire.telemetry_batch("dev-2", [good], 0)),  # another device's name on DEVICE's topic
            ("dev-2", wire.telemetry_batch(DEVICE, [good], 0)),
            ("dev-9", wire.telemetry_batch("dev-9", [good], 0)),  # not enrolled
            (DEVICE, b""),
            (DEVICE, b"\xff\xfe"),
            (DEVICE, b"{not json"),
            (DEVICE, b"[1, 2]"),
            (DEVICE, json.dumps({"device": DEVICE, "records": []}).encode()),
            (DEVICE, batch("all")),
            (DEVICE, batch([], dropped=-1)),
            (DEVICE, batch([], dropped="3")),
            (DEVICE, batch([record(seq=0)])),
            (DEVICE, batch([record(seq="8")])),
            (DEVICE, batch([record(seq=True)])),
            (DEVICE, batch([record(seq=9.5)])),
            (DEVICE, batch([record(kind="secrets")])),
            (DEVICE, batch([record(t="now")])),
            (DEVICE, b'{"device":"dev-1","dropped":0,"records":[{"seq":7,"kind":"inference","t":NaN,"body":{}}]}'),
            (DEVICE, batch([record(body="text")])),
            (DEVICE, batch([record(), 5])),  # one good record does not carry a bad batch
            (DEVICE, batch([record(seq=8, body={"model": "x" * 300_000})])),  # over the payload limit
        ]
        for device_id, payload in bad:
            client.publish(wire.topic(device_id, "telemetry"), payload, qos=1).wait_for_publish(10)
        later = (2, "metrics", 2.5, '{"cpu_percent":3.5}')
        client.publish(wire.topic(DEVICE, "telemetry"), wire.telemetry_batch(DEVICE, [good, later], 4),
                       qos=1).wait_for_publish(10)

        db = registry.open_db(home.db_path)
        wait_for(lambda: db.execute("select count(*) from telemetry").fetchone()[0] >= 2, "the good batch to be stored")
        rows = db.execute("select device, seq, kind, t, model, version, body from telemetry order by seq").fetchall()
        assert rows == [(DEVICE, 1, "inference", 1.5, "digits", "1.0.0", good[3]),
                        (DEVICE, 2, "metrics", 2.5, None, None, later[3])]
        # dev-2 stored nothing: the batch on its topic naming DEVICE was refused whole, only counted as refused.
        assert db.execute("select device, received, dropped, rejected_batches from telemetry_devices "
                          "order by device").fetchall()[1:] == [("dev-2", 0, 0, 1)]
        assert db.execute("select device, received, dropped from telemetry_devices order by device").fetchall() == [
            (DEVICE, 2, 4), ("dev-2", 0, 0)]
        # A replay of the stored batch, and of an older one, changes nothing; the next new record still counts.
        replays = [wire.telemetry_batch(DEVICE, [good, later], 4), wire.telemetry_batch(DEVICE, [good], 0)]
        fresh = (3, "metrics", 3.5, '{"cpu_percent":4.5}')
        for payload in [*replays, wire.telemetry_batch(DEVICE, [fresh], 4)]:
            client.publish(wire.topic(DEVICE, "telemetry"), payload, qos=1).wait_for_publish(10)
        wait_for(lambda: db.execute("select count(*) from telemetry").fetchone()[0] >= 3, "the fresh record to be stored")
        assert [r[0] for r in db.execute("select seq from telemetry order by seq").fetchall()] == [1, 2, 3]
        assert db.execute("select device, received, dropped from telemetry_devices order by device").fetchall() == [
            (DEVICE, 3, 4), ("dev-2", 0, 0)]
        assert all(t.is_alive() for t in server._threads)
    finally:
        client.loop_stop()
        client.disconnect()
        server.stop()
