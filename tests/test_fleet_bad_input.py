"""Malformed MQTT payloads are dropped; the fleet server and the agent keep working afterwards."""

from __future__ import annotations

import sys
import threading
from pathlib import Path

import paho.mqtt.client as mqtt

from edgeops.agent.service import Agent
from edgeops.fleet import registry
from edgeops.fleet.home import enroll_device, push
from edgeops.fleet.server import FleetServer
from edgeops.protocol import wire
from edgeops.protocol.mqtt import BrokerAddress

sys.path.insert(0, str(Path(__file__).parent))
from fleetkit import AT_ONCE, PROFILES, attacker_tls, fleet_home, releases, wait_for  # noqa: E402,F401  (fixtures)

GARBAGE = [b"", b"\xff\xfe not utf-8", b"not json", b"[1, 2, 3]", b'{"req": "x"}', b"{" * 100_000,
           wire.fetch_request(1, "../../etc/passwd", 0), wire.fetch_request(2, "metadata/timestamp.json", -5),
           wire.fetch_request(3, "metadata/timestamp.json", 0, 10**9),
           # stream requests: not base64, no block, a metadata path, a huge bitmap for a missing target
           wire.encode({"req": 4, "path": f"targets/{'a' * 64}.x.edgeops", "want": "!!"}),
           wire.encode({"req": 5, "path": f"targets/{'a' * 64}.x.edgeops", "want": ""}),
           wire.encode({"req": 6, "path": "metadata/timestamp.json", "want": "AQ=="}),
           wire.stream_request(7, f"targets/{'a' * 64}.x.edgeops", range(400_000))]


def test_garbage_on_every_topic_is_dropped_and_delivery_still_works(fleet_home, releases, tmp_path):
    home = fleet_home()
    broker = home.broker_url
    enroll_device(home, "dev-1", PROFILES[0], {}, tmp_path / "dev-1")
    server = FleetServer(home, broker).start()
    agent = Agent(tmp_path / "dev-1")
    stop = threading.Event()
    thread = threading.Thread(target=agent.run, args=(stop,), daemon=True)
    thread.start()
    address = BrokerAddress.parse(broker)
    attacker = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="garbage")
    attacker.tls_set_context(attacker_tls(home).context())  # a client with every right on the broker
    attacker.connect(address.host, address.port)
    attacker.loop_start()
    try:
        wait_for(lambda: server.connected.is_set() and agent.link.connected.is_set(), "both sides to connect")
        for leaf in ("fetch", "state", "telemetry", "desired", "blocks", "acks", "unknown"):
            for payload in GARBAGE:
                attacker.publish(wire.topic("dev-1", leaf), payload, qos=1).wait_for_publish(5)
        attacker.publish("edgeops/v1/devices/../x", b"{}", qos=1).wait_for_publish(5)
        release = push(home, [releases[("1.0.0", PROFILES[0])]], {}, plan=AT_ONCE)
        wait_for(lambda: (agent.installed() or {}).get("version") == "1.0.0", "the agent to install after the garbage")
        db = registry.open_db(home.db_path)
        wait_for(lambda: db["executions"].count_where("release_id = ? and state = 'active'", [release]) == 1,
                 "the fleet to record the install")
        assert thread.is_alive() and all(t.is_alive() for t in server._threads)
    finally:
        attacker.loop_stop()
        stop.set()
        thread.join(timeout=10)
        server.stop()
