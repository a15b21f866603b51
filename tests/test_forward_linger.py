"""The agent's forwarder lingers for fuller telemetry batches (agent/telemetry.py): a real outbox, the
agent's real MQTT link (its device certificate) to the fleet's real Mosquitto, and a subscriber that sees every telemetry message.
Records committed in several commits go out as one full batch once 500 wait, not one message per
commit; with a short linger, a partial batch still goes once its oldest record has waited. Needs
Mosquitto; a few seconds."""

from __future__ import annotations

import queue
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from edgeops.agent.metrics import DeviceMetrics
from edgeops.agent.outbox import Outbox
from edgeops.agent.telemetry import BATCH_RECORDS, COMMIT_S, Telemetry
from edgeops.agent.transport import Link
from edgeops.fleet.home import enroll_device
from edgeops.protocol import wire
from edgeops.protocol.mqtt import BrokerAddress

sys.path.insert(0, str(Path(__file__).parent))
from fleetkit import device_tls, fleet_home, wait_for  # noqa: E402,F401  (fixture)

DEVICE = "dev-1"


@pytest.fixture
def forwarding(fleet_home, tmp_path) -> Iterator:
    """`start(linger_s)`: an agent forwarder on a real link, and a queue of the telemetry it publishes."""
    home = fleet_home()
    device_dir = enroll_device(home, DEVICE, "x86-vnni", {}, tmp_path / DEVICE)
    url = home.broker_url
    messages: queue.SimpleQueue[dict] = queue.SimpleQueue()
    listener = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="listener")
    listener.tls_set_context(home.client_tls().context())  # the fleet's own client
    subscribed = threading.Event()
    listener.on_message = lambda client, userdata, message: messages.put(wire.parse_telemetry(message.payload))
    listener.on_subscribe = lambda *args: subscribed.set()
    address = BrokerAddress.parse(url)
    listener.connect(address.host, address.port)
    listener.subscribe(wire.topic(DEVICE, "telemetry"), 1)
    listener.loop_start()
    wait_for(subscribed.is_set, "the listener to subscribe")
    stop, cleanup = threading.Event(), []

    def start(linger_s: float) -> tuple[Telemetry, queue.SimpleQueue]:
        link = Link(DEVICE, url, lambda desired: None, device_tls(device_dir)).start()
        cleanup.append(link.stop)
        wait_for(link.connected.is_set, "the agent's link to connect")
        telemetry = Telemetry(DEVICE, Outbox(tmp_path / "outbox.db"), DeviceMetrics(tmp_path), 3600.0,
                              forward_linger_s=linger_s)
        forwarder = threading.Thread(target=telemetry.run_forwarder, args=(stop, link), daemon=True)
        forwarder.start()
        cleanup.append(forwarder.join)
        return telemetry, messages

    yield start
    stop.set()
    for step in reversed(cleanup):
        step()
    listener.loop_stop()
    listener.disconnect()


def commit(telemetry: Telemetry, n: int) -> None:
    """`n` records in one commit, as the recorder makes them every 50 ms."""
    for i in range(n):
        telemetry.record("metrics", {"i": i})
    assert telemetry.flush() == n


def test_records_of_many_commits_go_out_as_one_full_batch(forwarding):
    telemetry, messages = forwarding(60.0)
    for _ in range(5):
        commit(telemetry, 20)
        time.sleep(COMMIT_S)  # the recorder's pace; each commit wakes the forwarder, which lingers
    commit(telemetry, BATCH_RECORDS - 100)
    first = messages.get(timeout=30)
    assert [r["seq"] for r in first["records"]] == list(range(1, BATCH_RECORDS + 1))


def test_a_partial_batch_goes_once_its_oldest_record_waited(forwarding):
    telemetry, messages = forwarding(0.3)
    commit(telemetry, 3)
    first = messages.get(timeout=30)
    assert [r["seq"] for r in first["records"]] == [1, 2, 3]
    assert (first["drop_watermark"], first["dropped_unsequenced"]) == (0, 0)
