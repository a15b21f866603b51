"""The fleet decides; devices only report (issue 14, part 3).

Rollout membership, each device's release and what counts in a gate come from the fleet's own
records (the engine's `executions` rows); a device's `state` and telemetry are evidence about that
device only. Staged here:
- the pure rule for a device's execution report (`rollout.report_verdict`);
- the gates' counting on a registry fed the way the server feeds it (`record_reports`, `telemetry.ingest`);
- the attacks on the fleet's own Mosquitto (mutual TLS, the generated ACL) with a real FleetServer and
  real agents: an outsider device (enrolled, outside the selector) publishing on its own topics a
  retained `state` that claims the release and fabricated telemetry, for and against it; a member of
  the selector doing the same before it is assigned; a forged `desired` naming a release that does not
  exist; malformed telemetry batches.
The liar publishes with its own device certificate on its own topics: what a device's credentials allow
under the generated broker ACL. An outsider (or a device with no agent running) lies through a plain
MQTT client of its own; a member running an agent lies through that agent's own connection (the broker
takes the client id from the certificate, so a second client with it would evict the agent). The forged
`desired`, which no device may publish, comes from an attacker who owns the broker (fleetkit.attacker_tls).
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
import pytest

from edgeops.agent.serving import InvalidInput
from edgeops.fleet import registry, rollout, telemetry
from edgeops.fleet.home import enroll_device, init_fleet, push
from edgeops.fleet.ingest import parse_report
from edgeops.fleet.plan import make_plan
from edgeops.protocol import mqtt as mqttlib
from edgeops.protocol.mqtt import TlsFiles
from edgeops.protocol import wire
from edgeops.protocol.bundle import read_bundle

sys.path.insert(0, str(Path(__file__).parent))
from fleetkit import attacker_tls, device_tls, fleet_home, wait_for  # noqa: E402,F401  (fixture)
from test_rollouts import PROFILE, ROLLOUT_S, Fleet, digits, fleet, rolled_out_v1  # noqa: E402,F401  (fixtures)

LAB = {"site": "lab"}
CANARY = make_plan(stages="1dev,100%", bake="0.5s", min_calls=5)


# --- the rule, without I/O ------------------------------------------------------------------------------


@pytest.mark.parametrize("reported, stored, release, desired, verdict", [
    ("active", None, 7, None, "anomaly"),  # an outsider claiming a release: the engine never assigned it
    ("rejected", None, 999, 3, "anomaly"),  # a release that does not exist (a forged desired)
    ("active", None, 7, 3, "anomaly"),  # a member claiming a release it is not assigned
    ("downloading", "queued", 7, 7, "apply"),
    ("active", "timed-out", 7, 7, "apply"),  # late, but it is the release the fleet assigned it
    ("failed", "active", 7, 7, "apply"),
    ("active", "installing", 6, 7, "apply"),  # late progress of the release it was moved off
    ("active", "active", 6, 7, "ignore"),  # what it ran before its new assignment: nothing changes
    ("rejected", "active", 6, 7, "anomaly"),  # a replayed desired for the release it ran before
    ("active", "rolled-back", 7, 6, "ignore"),  # the engine's final word stands
    ("downloading", "cancelled", 7, None, "ignore"),
    ("timed-out", "downloading", 7, 7, "anomaly"),  # states only the engine sets
    ("rolled-back", "active", 7, 7, "anomaly"),
    ("bogus", "queued", 7, 7, "anomaly"),
])
def test_a_report_moves_only_a_row_the_engine_created(reported, stored, release, desired, verdict):
    assert rollout.report_verdict(reported, stored, release, desired) == verdict


# --- the gates' counting, on a registry -------------------------------------------------------------------


def _inferences(model: str, version: str, count: int, ok: bool, first_seq: int) -> list[tuple[int, str, float, str]]:
    """Inference records as agent/telemetry.py writes them, all `ok` or all failed."""
    return [(first_seq + i, "inference", time.time(), json.dumps({"model": model, "version": version,
                                                                    "latency_ms": 1.0, "ok": ok}))
            for i in range(count)]


def _send(db, device: str, records, dropped: int = 0, named: str | None = None) -> list[tuple[str, list[int]]]:
    """A telemetry batch from `device`'s topic, through the server's own parsing."""
    payload = wire.telemetry_batch(named or device, records, dropped)
    return telemetry.ingest(db, [(device, parse_report("telemetry", payload))])


def _state(db, device: str, release: int, state: str, version: str | None = None) -> None:
    registry.record_reports(db, [(device, {"online": True, "installed": {"model": "model", "version": version},
                                           "execution": {"release": release, "state": state, "reason": ""}})])


def test_gates_count_only_assigned_members_on_their_assigned_versions(slot_releases, tmp_path):
    model = read_bundle(slot_releases.v1).manifest["name"]
    home = init_fleet(tmp_path / "fleet", "mqtts://127.0.0.1:1")
    db = registry.open_db(home.db_path)
    for device_id, labels in (("A", LAB), ("B", LAB), ("C", LAB), ("O", {"site": "elsewhere"})):
        enroll_device(home, device_id, PROFILE, labels, tmp_path / device_id)
    registry.record_reports(db, [(d, {"online": True}) for d in ("A", "B", "O")])  # C comes online later
    at_once = make_plan(stages="100%", bake=0, min_calls=20)
    r1 = push(home, [slot_releases.v1], LAB, plan=at_once)
    rollout.tick(db)
    for device_id in ("A", "B"):
        _state(db, device_id, r1, "active", "1.0.0")
    _state(db, "O", r1, "active", "1.0.0")  # the outsider claims it too
    _send(db, "A", _inferences(model, "1.0.0", 10, True, 1))  # A's baseline: 1.0.0, assigned to it, no errors

    r2 = push(home, [slot_releases.v2], LAB, plan=at_once)
    registry.record_reports(db, [("C", {"online": True})])
    rollout.tick(db)
    assert {d: registry.desired(db, d)["release_id"] for d in ("A", "B", "C")} == dict.fromkeys("ABC", r2)
    assert registry.desired(db, "O") is None
    for device_id in ("A", "B", "C"):
        _state(db, device_id, r2, "active", "1.1.0")
    _state(db, "O", r2, "active", "1.1.0")
    _send(db, "A", _inferences(model, "1.1.0", 12, True, 11))
    _send(db, "B", _inferences(model, "1.1.0", 8, True, 1))
    _send(db, "C", _inferences(model, "1.0.0", 100, False, 1))  # C never ran 1.0.0: a baseline of failures would hide errors
    _send(db, "O", _inferences(model, "1.1.0", 1000, True, 1))  # the outsider's fabricated successes
    _send(db, "B", _inferences(model, "1.2.0", 50, False, 9))  # a version no release of the fleet assigned B

    assert dict(db.execute("select device, state from executions where release_id = ?", [r2]).fetchall()) == \
        dict.fromkeys("ABC", "active")
    summary = rollout.summary(db, r2)
    assert summary["targeted"] == 3 and summary["counts"]["active"] == 3
    gates = {g["name"]: g for g in summary["gates"]}
    assert gates["install success"]["value"] == "3/3 ok"
    assert gates["error rate"]["value"] == "0.0%" and gates["error rate"]["detail"] == "20/20 calls"
    assert "(previous 0.0%)" in gates["error rate"]["threshold"]

    anomaly = registry.anomaly(db, "O")
    assert anomaly["claimed"] == f"release {r2} active" and anomaly["assigned"] == "no release" and anomaly["count"] == 2
    status = registry.status(db)
    assert [a["device"] for a in status["anomalies"]] == ["O"]
    assert {d["id"]: d["anomaly"] is not None for d in status["devices"]} == {"A": False, "B": False, "C": False, "O": True}
    assert registry.device_detail(db, "O")["anomaly"]["claimed"] == f"release {r2} active"
    # the devices' own telemetry keeps everything they sent
    assert {d["id"]: d["telemetry"]["received"] for d in status["devices"]} == {"A": 22, "B": 58, "C": 100, "O": 1000}


def test_a_member_cannot_report_a_release_it_was_not_assigned(slot_releases, tmp_path):
    home = init_fleet(tmp_path / "fleet", "mqtts://127.0.0.1:1")
    db = registry.open_db(home.db_path)
    for device_id in ("A", "B"):
        enroll_device(home, device_id, PROFILE, LAB, tmp_path / device_id)
    registry.record_reports(db, [(d, {"online": True}) for d in ("A", "B")])
    r1 = push(home, [slot_releases.v1], LAB, plan=make_plan(stages="1dev,100%", bake=3600, min_calls=0))
    rollout.tick(db)
    [member] = dict(db.execute("select device, state from executions where release_id = ?", [r1]).fetchall())
    other = "B" if member == "A" else "A"
    _state(db, other, r1, "active", "1.0.0")  # in the selector, not assigned yet
    _state(db, member, r1 + 1, "failed")  # a release that does not exist
    assert dict(db.execute("select device, state from executions").fetchall()) == {member: "queued"}
    assert registry.anomaly(db, other)["claimed"] == f"release {r1} active"
    assert (registry.anomaly(db, member)["claimed"], registry.anomaly(db, member)["assigned"]) == \
        (f"release {r1 + 1} failed", f"release {r1}")
    assert rollout.summary(db, r1)["stages"][0]["assigned"] == 1


# --- on a real broker -----------------------------------------------------------------------------------------


class Forger:
    """A plain MQTT client with the rights of `tls` (a device's certificate, or the attacker's) that
    publishes as the attacker wants, and records what it subscribed to; or, `through` a client already
    connected (an agent's own link), one that publishes on it."""

    def __init__(self, url: str, tls: TlsFiles, subscribe: str | None = None):
        self.messages: list[tuple[str, bytes]] = []
        self.own = True
        address = mqttlib.BrokerAddress.parse(url)
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="forger", clean_session=True,
                                  protocol=mqtt.MQTTv311)
        self.client.tls_set_context(tls.context())
        subscribed = threading.Event()
        self.client.on_connect = lambda c, *_: c.subscribe(subscribe, 1) if subscribe else subscribed.set()
        self.client.on_subscribe = lambda *_: subscribed.set()
        self.client.on_message = lambda c, u, m: self.messages.append((m.topic, bytes(m.payload)))
        self.client.connect(address.host, address.port)
        self.client.loop_start()
        wait_for(subscribed.is_set, "the forger to connect", 10)

    @classmethod
    def through(cls, client: mqtt.Client) -> Forger:
        """Publish on `client`, a connected device's own connection (a compromised agent lying)."""
        forger = cls.__new__(cls)
        forger.messages, forger.own, forger.client = [], False, client
        return forger

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> None:
        self.client.publish(topic, payload, qos=1, retain=retain).wait_for_publish(10)

    def claim(self, device_id: str, release: int, state: str, model: str, version: str) -> None:
        """A retained `state` on the device's own topic claiming `release`."""
        self.publish(wire.topic(device_id, "state"), wire.encode({
            "device": device_id, "online": True, "profile": PROFILE,
            "installed": {"model": model, "version": version, "target": f"{model}-{version}-{PROFILE}.edgeops", "slot": "a"},
            "execution": {"release": release, "state": state, "reason": ""}}), retain=True)

    def telemetry(self, device_id: str, model: str, version: str, ok: bool, count: int = 1500, first_seq: int = 1) -> None:
        """Fabricated inference records of `version` on the device's own telemetry topic."""
        for start in range(0, count, 500):
            self.publish(wire.topic(device_id, "telemetry"), wire.telemetry_batch(
                device_id, _inferences(model, version, min(500, count - start), ok, first_seq + start), 0))

    def close(self) -> None:
        if self.own:
            self.client.loop_stop()
            self.client.disconnect()


def liar_forger(fleet: Fleet, liar: str) -> Forger:
    """`liar` lying with its own credentials: through its agent's connection if it runs one, else a
    client of its own with its device certificate."""
    if liar in fleet.agents:
        return Forger.through(fleet.agents[liar].link.client)
    return Forger(fleet.url, device_tls(fleet.tmp / liar))


def _start(fleet: Fleet, v1: Path, members: list[str], outsider: str | None = "outsider") -> int:
    """Members (site=lab) and an outsider (elsewhere) enrolled, agents for the members, 1.0.0 on them."""
    fleet.enroll(*members)
    if outsider:
        enroll_device(fleet.home, outsider, PROFILE, {"site": "elsewhere"}, fleet.tmp / outsider)
    fleet.start_server()
    fleet.run(*members)
    release = push(fleet.home, [v1], LAB, plan=make_plan(stages="100%", bake=0, min_calls=0))
    fleet.wait_state(release, "completed")
    fleet.wait_versions("1.0.0", *members)
    wait_for(lambda: fleet.executions(release) == dict.fromkeys(members, "active"), "1.0.0 active on the members")
    return release


def _traffic(fleet: Fleet, digits: np.ndarray, members: list[str], failing_version: str | None) -> None:
    """One real 8x8 digit per member; a member running `failing_version` gets a malformed one (the apps
    of a broken release), which its agent records as a failed call."""
    for device_id in members:
        sample = digits[:1] if fleet.version(device_id) != failing_version else digits[:1, :16]
        try:
            fleet.agents[device_id].infer({"pixels": sample})
        except InvalidInput:
            pass


@pytest.mark.parametrize("liar", ["outsider", "m2"])
def test_a_claim_of_the_release_with_fabricated_successes_is_never_counted(fleet, slot_releases, digits, liar):
    """The rollout takeover of issue 14: `outsider` is enrolled outside the selector; `m2` is a member of
    the selector (running a real agent) that the canary stage has not assigned. Each claims the release
    is active on it and sends 1,500 fabricated successful calls of it, while the canary's real calls fail."""
    members = ["m0", "m1", "m2"]
    v1 = _start(fleet, slot_releases.v1, members, outsider="outsider" if liar == "outsider" else None)
    for _ in range(5):  # the baseline, on the members
        _traffic(fleet, digits, members, None)
    forger = liar_forger(fleet, liar)
    try:
        release = push(fleet.home, [slot_releases.v2], LAB, plan=CANARY)
        model = read_bundle(slot_releases.v2).manifest["name"]
        forger.claim(liar, release, "active", model, "1.1.0")
        forger.telemetry(liar, model, "1.1.0", ok=True, first_seq=10_000)

        def rolled_back() -> bool:
            _traffic(fleet, digits, members, "1.1.0")  # the canary's real calls fail
            return fleet.state(release) == "rolled-back"

        wait_for(rolled_back, "the engine to roll 1.1.0 back", ROLLOUT_S)
    finally:
        forger.close()
    executions = fleet.executions(release)
    assert list(executions.values()) == ["rolled-back"] and liar not in executions, executions  # the canary alone
    reason = fleet.decided(release, "rollback")[1]["reason"]
    assert reason.startswith("health gate failed: error rate 100.0%"), reason
    assert registry.anomaly(fleet.db, liar)["claimed"] == f"release {release} active"
    assert (registry.desired(fleet.db, liar) or {}).get("release_id") == (None if liar == "outsider" else v1)
    assert [a["device"] for a in registry.status(fleet.db)["anomalies"]] == [liar]


def test_an_outsiders_forged_failures_neither_stop_a_good_release_nor_take_a_members_place(fleet, slot_releases, digits):
    """The outsider claims the release failed on it and sends fabricated failed calls of it: the release
    still completes, on every member, and the outsider is counted nowhere."""
    members, liar = ["m0", "m1"], "outsider"
    _start(fleet, slot_releases.v1, members)
    for _ in range(5):
        _traffic(fleet, digits, members, None)
    forger = liar_forger(fleet, liar)
    try:
        release = push(fleet.home, [slot_releases.v2], LAB, plan=make_plan(stages="1dev,50%,100%", bake="0.5s",
                                                                           min_calls=3))
        model = read_bundle(slot_releases.v2).manifest["name"]
        forger.claim(liar, release, "failed", model, "1.1.0")
        forger.telemetry(liar, model, "1.1.0", ok=False)

        def completed() -> bool:
            _traffic(fleet, digits, members, None)
            return fleet.state(release) in ("completed", "rolled-back", "paused")

        wait_for(completed, "the rollout to finish", ROLLOUT_S)
    finally:
        forger.close()
    assert fleet.state(release) == "completed", fleet.decisions(release)
    fleet.wait_versions("1.1.0", *members)
    wait_for(lambda: fleet.executions(release) == dict.fromkeys(members, "active"), "every member active on 1.1.0")
    anomaly = registry.anomaly(fleet.db, liar)
    assert anomaly["claimed"] == f"release {release} failed", anomaly
    assert liar not in fleet.executions(release)


def test_a_forged_desired_naming_no_release_leaves_no_execution(fleet, slot_releases):
    v1 = _start(fleet, slot_releases.v1, ["m0"], outsider=None)
    forger = Forger(fleet.url, attacker_tls(fleet.home))  # no device may publish a desired: the broker's owner
    try:
        forger.publish(wire.topic("m0", "desired"), wire.encode({
            "release_id": 999, "model": "digits", "version": "9.9.9", "target": f"digits-9.9.9-{PROFILE}.edgeops",
            "sha256": "0" * 64, "length": 1000}), retain=True)
        anomaly = wait_for(lambda: registry.anomaly(fleet.db, "m0"), "the agent's refusal to reach the fleet")
    finally:
        forger.close()
    assert anomaly["claimed"].startswith("release 999 rejected: "), anomaly
    assert anomaly["assigned"] == f"release {v1}"
    assert dict(fleet.db.execute("select release_id, state from executions where device = 'm0'").fetchall()) == {v1: "active"}
    detail = registry.device_detail(fleet.db, "m0")
    assert detail["execution"]["release_id"] == v1 and detail["desired"]["release_id"] == v1
    assert detail["anomaly"]["claimed"] == anomaly["claimed"]
    assert fleet.version("m0") == "1.0.0"


def test_malformed_telemetry_batches_are_counted_logged_and_acknowledged(fleet, caplog, monkeypatch):
    model = "digits"
    monkeypatch.setattr(telemetry, "_warned", {})  # no earlier test's warning holds this one back
    fleet.enroll("m0")
    fleet.start_server()
    wait_for(fleet.server.connected.is_set, "the fleet to connect")
    forger = Forger(fleet.url, device_tls(fleet.tmp / "m0"), subscribe=wire.topic("m0", "acks"))  # m0 runs no agent
    caplog.set_level(logging.WARNING, logger="edgeops.fleet.telemetry")
    try:
        no_dropped = json.loads(wire.telemetry_batch("m0", _inferences(model, "1.0.0", 3, True, 1), 0))
        del no_dropped["dropped"]
        forger.publish(wire.topic("m0", "telemetry"), wire.encode(no_dropped))
        forger.publish(wire.topic("m0", "telemetry"), wire.telemetry_batch("m1", _inferences(model, "1.0.0", 2, True, 4), 0))
        wait_for(lambda: len(forger.messages) == 2, "two acks")
        counts = wait_for(lambda: (t := registry.device_detail(fleet.db, "m0")["telemetry"]) and t["rejected_batches"] == 2 and t,
                          "two refused batches counted")
    finally:
        forger.close()
    assert sorted(wire.parse_telemetry_ack(p) for _, p in forger.messages) == [[1, 2, 3], [4, 5]]
    assert counts["received"] == 0
    assert fleet.db.execute("select count(*) from telemetry").fetchone()[0] == 0
    warnings = [r.getMessage() for r in caplog.records if "refused a telemetry batch from m0" in r.getMessage()]
    assert len(warnings) == 1 and "'dropped'" in warnings[0], warnings  # the second one within WARN_EVERY_S: counted only
    devices = registry.status(fleet.db)["devices"]
    assert devices[0]["telemetry"]["rejected_batches"] == 2
