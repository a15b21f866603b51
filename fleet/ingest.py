"""Storing what devices send, and extra telemetry ingest workers (`edgeops fleet ingest`).

The fleet server (fleet/server.py) and each ingest worker hand device messages to a `Writer`, which
stores them on its own thread, a burst in one transaction, then acknowledges them. Telemetry can be
spread over several processes through an MQTT shared subscription: `$share/GROUP/edgeops/v1/devices/+/telemetry`
(Mosquitto 2, also to MQTT 3.1.1 clients such as paho here; EMQX, HiveMQ, VerneMQ), which the
broker hands out message by message to the members of GROUP: `edgeops fleet serve --share GROUP`
joins it and each `edgeops fleet ingest --share GROUP` adds a member. Mosquitto goes on dealing a
dead member its turn (its session is persistent): those messages wait in its session until it
restarts, so run workers under a supervisor that restarts them.

Invariants:
- A message is acknowledged to the broker (manual PUBACK) only after the transaction storing it
  committed, then the device gets its `acks`; so a worker killed mid-write gets the message again
  from its persistent session, and since records are keyed by (device, seq), a message stored
  twice (committed, killed before the PUBACK) counts once.
- A transient database error (the write lock held past the busy timeout, a full disk) retries the
  same burst; the messages stay unacknowledged meanwhile. Any other error drops the burst, logged:
  it would fail again, and unacknowledged messages would fill the broker's in-flight window.
- Each ingest worker connects with its own certificate (`pki/ingest-N.pem`, made by `fleet
  mosquitto-config --ingest-workers N`): the broker uses its name as client id, so two workers under
  one name would evict each other; and a worker may only read telemetry and write acks.
- Every worker writes the same registry (SQLite in WAL mode): each transaction takes the write lock
  up front (BEGIN IMMEDIATE) and waits up to BUSY_TIMEOUT_S for it, so writers take turns.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import sqlite_utils

from edgeops.fleet import mosquitto, registry, telemetry
from edgeops.fleet.home import FleetHome
from edgeops.protocol import mqtt as mqttlib
from edgeops.protocol import wire
from edgeops.protocol.errors import EdgeopsError

log = logging.getLogger(__name__)
# A burst ends at either bound: small transactions commit (and acknowledge) sooner, so a device's
# batch is acknowledged well within the agent's ACK_TIMEOUT_S even when the fleet lags behind.
MAX_MESSAGES_PER_TRANSACTION = 1000
MAX_RECORDS_PER_TRANSACTION = 5000
RETRY_S = 1.0
BUSY_TIMEOUT_S = 30.0

Report = tuple[str, str, dict[str, Any], int]  # (leaf, device id, parsed message, MQTT message id)


def open_registry(home: FleetHome) -> sqlite_utils.Database:
    """The registry, for a process that shares it with other writers: it waits its turn for the
    write lock up to BUSY_TIMEOUT_S instead of sqlite3's 5 s."""
    db = registry.open_db(home.db_path)
    db.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
    return db


def telemetry_filter(share: str | None = None) -> str:
    """The subscription to every device's telemetry, shared among the members of group `share` if given."""
    topic = f"{wire.PREFIX}/+/telemetry"
    if share is None:
        return topic
    if not share or any(c in share for c in "/+#"):
        raise EdgeopsError(f"share group {share!r} must be a non-empty name without '/', '+' or '#'")
    return f"$share/{share}/{topic}"


class Writer:
    """Stores device messages with `store(burst)` on one thread, then PUBACKs them and acks telemetry.

    `store` runs one transaction over a burst of reports and returns, per telemetry batch stored, the
    device and the seqs to acknowledge to it.
    """

    def __init__(self, client: mqtt.Client, store: Callable[[list[Report]], list[tuple[str, list[int]]]]):
        self.client, self.store = client, store
        self._queue: queue.SimpleQueue[Report] = queue.SimpleQueue()

    def put(self, report: Report) -> None:
        self._queue.put(report)

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                burst = [self._queue.get(timeout=0.5)]
            except queue.Empty:
                continue
            records = _records(burst[0])
            while len(burst) < MAX_MESSAGES_PER_TRANSACTION and records < MAX_RECORDS_PER_TRANSACTION:
                try:
                    burst.append(self._queue.get_nowait())
                except queue.Empty:
                    break
                records += _records(burst[-1])
            self._write(burst, stop)

    def _write(self, burst: list[Report], stop: threading.Event) -> None:
        while True:
            try:
                stored = self.store(burst)
                break
            except sqlite3.OperationalError as exc:  # locked, busy, disk full: the same burst again, later
                log.warning("could not store %d device messages, retrying: %s", len(burst), exc)
                if stop.wait(RETRY_S):
                    return  # unacknowledged: the broker sends them again on reconnection
            except Exception:  # a bug: logged with its traceback, and these messages dropped
                log.exception("could not store %d device messages; dropped", len(burst))
                stored = []
                break
        for *_, mid in burst:
            self.client.ack(mid, 1)
        for device_id, seqs in stored:  # now the device may forget them
            self.client.publish(wire.topic(device_id, "acks"), wire.telemetry_ack(seqs), qos=1)


def _records(report: Report) -> int:
    return len(report[2]["records"]) if report[0] == "telemetry" else 1


def parse_report(leaf: str, payload: bytes, device_id: str | None = None) -> dict[str, Any]:
    """A `state` or `telemetry` message, parsed; WireError if malformed. A telemetry batch that is
    malformed yet a JSON object whose `records` name seqs (e.g. one without `dropped`) is returned as
    a refusal, `{"refused": reason, "seqs": [...], "records": []}`: telemetry.ingest counts it and
    acknowledges those seqs, so the device is answered instead of sending it forever. A state whose
    `device` is not `device_id`, its topic's, is malformed."""
    if leaf != "telemetry":
        state = wire.decode(payload, {"device": str})
        if device_id is not None and state["device"] != device_id:  # a device speaks only for itself
            raise wire.WireError(f"a state naming device {state['device'][:64]!r} on {device_id}'s topic")
        return state
    try:
        return wire.parse_telemetry(payload)
    except wire.WireError as exc:
        seqs = _seqs(payload)
        if not seqs:
            raise
        return {"refused": str(exc), "seqs": seqs, "records": []}


def _seqs(payload: bytes) -> list[int]:
    """The valid seqs a telemetry payload's records name; [] when it has none (or is no JSON object)."""
    try:
        records = wire.decode(payload, {"records": list}, wire.MAX_TELEMETRY_PAYLOAD)["records"]
    except wire.WireError:
        return []
    return [r["seq"] for r in records
            if isinstance(r, dict) and type(r.get("seq")) is int and 1 <= r["seq"] <= wire.MAX_COUNT]


class IngestWorker:
    """Telemetry only: the shared subscription in, the registry and device acks out."""

    def __init__(self, home: FleetHome, broker_url: str, worker: int = 1, share: str | None = None):
        self.topic = telemetry_filter(share)
        self.db = open_registry(home)
        name = mosquitto.worker_name(worker)
        if not (home.pki / f"{name}.pem").exists():
            raise EdgeopsError(f"ingest worker {worker} has no certificate; run `edgeops fleet mosquitto-config "
                               f"--ingest-workers {worker}` (or more) first, then reload the broker")
        self.client = mqttlib.client(f"{mosquitto.FLEET_USER}-{name}", broker_url, home.client_tls(name))
        self.client.manual_ack_set(True)
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = lambda *args: log.info("subscribed to %s", self.topic)
        self.client.on_message = self._on_message
        self.writer = Writer(self.client, lambda burst: telemetry.ingest(self.db, [(d, m) for _, d, m, _ in burst]))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self.writer.run, args=(self._stop,), name="edgeops-ingest", daemon=True)

    def start(self) -> "IngestWorker":
        self.client.loop_start()
        self._thread.start()
        return self

    def stop(self) -> None:
        """Finish the burst being written (and acknowledge it), then disconnect."""
        self._stop.set()
        self._thread.join(timeout=10)
        self.client.disconnect()
        self.client.loop_stop()

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if not reason_code.is_failure:
            client.subscribe(self.topic, 1)
        else:
            log.error("broker refused ingest worker %s (%s): the broker knows workers 1 to N of "
                      "`edgeops fleet mosquitto-config --ingest-workers N`", client._client_id.decode(), reason_code)

    def _on_message(self, client, userdata, message: mqtt.MQTTMessage) -> None:
        try:
            device_id, leaf = wire.parse_topic(message.topic)
            self.writer.put((leaf, device_id, parse_report(leaf, message.payload), message.mid))
            return  # acknowledged by the writer, after its commit
        except wire.WireError as exc:
            telemetry.warn_limited(f"dropped {message.topic}", "dropped message on %s: %s", message.topic, exc)
        except Exception:  # a bug must not take the worker down; it is logged with its traceback
            log.exception("error handling message on %s", message.topic)
        client.ack(message.mid, message.qos)


def run(home_dir: Path, broker_url: str | None, worker: int = 1, share: str | None = None) -> None:
    """Run an ingest worker until interrupted (the broker: `broker_url`, default the fleet's)."""
    home = FleetHome.open(home_dir)
    broker_url = broker_url or home.config["broker"]
    ingest_worker = IngestWorker(home, broker_url, worker, share).start()
    log.warning("ingest worker %d of fleet %s: %s on %s", worker, home_dir, ingest_worker.topic, broker_url)
    try:
        with contextlib.suppress(KeyboardInterrupt):
            threading.Event().wait()  # until Ctrl-C
    finally:
        ingest_worker.stop()
