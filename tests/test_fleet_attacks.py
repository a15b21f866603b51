"""The attacks of GitHub issue 3, each staged against a real fleet over a real broker.

Every test runs a real FleetServer and real agents (edgeops.agent.service.Agent, in threads, each
with its device certificate) on the fleet's own Mosquitto (mutual TLS with the fleet CA, the generated
ACL), installs a first release, then stages one attack. For each attack three things must hold:
- the device refuses: its installed() is still the previous version;
- the previous model keeps serving: the active slot, re-read from disk, loads and passes its self-test;
- the fleet sees the refusal: an `executions` row in state "rejected" (trust refusals) or "failed",
  whose reason names the cause (the machine-readable code of docs/protocol.md); or, when the attack
  replays a `desired` for a release the device no longer runs, an anomaly naming the cause while the
  fleet's own record of that release stays as it was (the fleet decides; devices only report).

Attacks are staged with the means an attacker would have: a key root does not trust, write access to
the fleet's file store, a man in the middle on the fleet's replies (a wrapper on the server's MQTT
publish that rewrites block replies after the real server produced them), a recorder on the broker
(a client with every right on it: an attacker who owns the broker, fleetkit.attacker_tls), a fleet
whose online metadata refresh stopped.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from securesystemslib.signer import CryptoSigner
from tuf.api.metadata import Metadata

from edgeops.agent import runtime
from edgeops.agent.service import Agent
from edgeops.agent.slots import SlotStore
from edgeops.fleet import registry, trust
from edgeops.fleet import server as server_module
from edgeops.fleet.home import FleetHome, enroll_device
from edgeops.fleet.server import FleetServer
from edgeops.protocol import mqtt as mqttlib
from edgeops.protocol import wire
from edgeops.protocol.bundle import read_bundle

sys.path.insert(0, str(Path(__file__).parent))
from fleetkit import AT_ONCE, PROFILES, attacker_tls, fleet_home, releases, wait_for  # noqa: E402,F401  (fixtures)

DEVICES = {"dev-x86": "x86-vnni", "dev-pi": "rpi4"}
OTHER = {"x86-vnni": "rpi4", "rpi4": "x86-vnni"}
LONG = trust.Expiry()


# ------------------------------------------------------------------------------------------ the rig

@dataclass
class Rig:
    """A fleet home, its server and one running agent per device in DEVICES."""

    home: FleetHome
    server: FleetServer
    releases: dict[tuple[str, str], Path]
    agents: dict[str, Agent]
    stop: threading.Event = field(default_factory=threading.Event)
    threads: list[threading.Thread] = field(default_factory=list)

    def start(self) -> Rig:
        self.server.start()
        for agent in self.agents.values():
            thread = threading.Thread(target=agent.run, args=(self.stop,), daemon=True)
            thread.start()
            self.threads.append(thread)
        return self

    def close(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=10)
        self.server.stop()

    @cached_property
    def db(self):
        return registry.open_db(self.home.db_path)

    # The two halves of `edgeops push` (fleet.home.push), so an attack can be staged between signing
    # and announcing, when no device has heard of the release yet.
    def sign(self, version: str, bundles: dict[str, Path] | None = None, expiry: trust.Expiry | None = None) -> list[dict[str, Any]]:
        """Sign one bundle per profile into the repository; the targets rows of a release."""
        bundles = bundles or {p: self.releases[(version, p)] for p in PROFILES}
        rows = []
        with self.home.repo_lock():
            for profile, path in bundles.items():
                manifest = read_bundle(path).manifest
                custom = {"model": manifest["name"], "version": manifest["version"], "profile": manifest["profile"]}
                target = trust.add_target(self.home.repo, path.name, path, custom, None, expiry or self.home.expiry())
                rows.append({"profile": profile, "target": path.name, "sha256": target.hashes["sha256"],
                             "length": target.length})
        return rows

    def announce(self, version: str, rows: list[dict[str, Any]]) -> int:
        return registry.create_release(self.db, "digits", version, {"site": "lab"}, rows, AT_ONCE)

    def push(self, version: str, expiry: trust.Expiry | None = None) -> int:
        release = self.announce(version, self.sign(version, expiry=expiry))
        for agent in self.agents.values():
            wait_for(lambda a=agent: (a.installed() or {}).get("version") == version, f"{agent.config.id} to run {version}")
        wait_for(lambda: {r["device"]: r["state"] for r in self.db["executions"].rows_where("release_id = ?", [release])}
                 == {d: "active" for d in self.agents}, f"the fleet to see release {release} active")
        return release

    def stored(self, row: dict[str, Any]) -> Path:
        return self.home.repo / "targets" / f"{row['sha256']}.{row['target']}"

    # What every attack must end with.
    def refused(self, release: int, states: tuple[str, ...], cause: str, devices=None) -> dict[str, dict[str, Any]]:
        """Wait until the fleet records each device's refusal of `release`; return the rows."""
        devices = list(devices or self.agents)

        def rows():
            found = {r["device"]: r for r in self.db["executions"].rows_where("release_id = ?", [release])}
            return found if all(d in found and found[d]["state"] in states and cause in found[d]["reason"]
                                for d in devices) else None

        try:
            return wait_for(rows, f"the fleet to see {devices} refuse release {release} ({'/'.join(states)}, {cause!r})")
        except AssertionError:
            seen = [dict(r) for r in self.db["executions"].rows_where("release_id = ?", [release])]
            raise AssertionError(f"fleet saw for release {release}: {seen}") from None

    def anomalous(self, release: int, cause: str, devices=None) -> dict[str, dict[str, Any]]:
        """Wait until each device's refusal of `release`, which the fleet no longer assigns it, is an
        anomaly naming `cause`; the fleet's executions of `release` stay active. Returns the anomalies."""
        devices = list(devices or self.agents)

        def claims():
            found = {d: registry.anomaly(self.db, d) for d in devices}
            return found if all(a and a["claimed"].startswith(f"release {release} rejected: ") and cause in a["claimed"]
                                for a in found.values()) else None

        found = wait_for(claims, f"anomalies from {devices} refusing release {release} ({cause!r})")
        rows = {r["device"]: r["state"] for r in self.db["executions"].rows_where("release_id = ?", [release])}
        assert rows == dict.fromkeys(devices, "active"), rows
        return found

    def still_serving(self, version: str, devices=None) -> None:
        """The device kept its previous model: reported, on disk, loadable and passing its self-test."""
        for device_id in devices or self.agents:
            agent = self.agents[device_id]
            assert (agent.installed() or {}).get("version") == version, f"{device_id} runs {agent.installed()}"
            on_disk = SlotStore(agent.config.path / "state").active()  # re-read and re-verified from disk
            assert on_disk is not None and on_disk.slot == agent.installed()["slot"]
            bundle = read_bundle(on_disk.path)
            assert bundle.manifest["version"] == version and bundle.manifest["profile"] == agent.config.profile
            runtime.selftest(runtime.load(bundle.model_bytes, bundle.manifest), bundle)
            assert not list((agent.config.path / "state" / "downloads").glob("*.part")), "refused download left behind"
            row = registry.device(self.db, device_id)
            assert row["installed_version"] == version, f"the fleet thinks {device_id} runs {row['installed_version']}"


@pytest.fixture
def make_rig(fleet_home, releases, tmp_path):
    rigs = []

    def make(server_class: type[FleetServer] = FleetServer, lifetimes: dict[str, int] | None = None) -> Rig:
        home = fleet_home(lifetimes)  # the fleet and its Mosquitto, started
        for device_id, profile in DEVICES.items():
            enroll_device(home, device_id, profile, {"site": "lab"}, tmp_path / device_id)
        rig = Rig(home, server_class(home, home.broker_url), releases, {d: Agent(tmp_path / d) for d in DEVICES})
        rigs.append(rig)
        return rig.start()

    yield make
    for rig in rigs:
        rig.close()


# ------------------------------------------------------------------------------ a man in the middle

def intercept(server: FleetServer, rewrite: Callable[[str | None, dict[str, Any], bytes], bytes | None]) -> None:
    """Put a man in the middle of the fleet's blocks: `rewrite(device, header, data)` may replace a
    block the real server produced (None lets it through unchanged); `device` is None for a block
    broadcast on a target stream, which every device downloading that target receives."""
    publish = server.client.publish

    def tampered(topic, payload=None, *args, **kwargs):
        if topic.startswith(wire.STREAMS + "/"):
            header, data = wire.parse_stream_block(payload)
            payload = rewrite(None, header, data) or payload
        elif wire.parse_topic(topic)[1] == "blocks":
            header, data = wire.parse_block_reply(payload)
            payload = rewrite(wire.parse_topic(topic)[0], header, data) or payload
        return publish(topic, payload, *args, **kwargs)

    server.client.publish = tampered


def reply(header: dict[str, Any], data: bytes) -> bytes:
    return wire.encode(header) + b"\n" + data


# -------------------------------------------------------------------------------------------- attacks

def test_targets_signed_with_a_key_root_does_not_trust(make_rig, tmp_path):
    rig = make_rig()
    rig.push("1.0.0")
    rows = rig.sign("1.1.0")
    # The attacker re-signs the newest targets metadata with a key of their own; the online roles
    # then refresh as usual, so devices fetch it.
    foreign = CryptoSigner.generate_ed25519()
    metadata = rig.home.repo / "metadata"
    newest = max(metadata.glob("*.targets.json"), key=lambda p: int(p.name.split(".")[0]))
    signed = Metadata.from_bytes(newest.read_bytes())
    signed.sign(foreign)  # replaces the fleet's signature
    newest.write_bytes(signed.to_bytes())
    with rig.home.repo_lock():
        trust.refresh_online(rig.home.repo, rig.home.expiry())
    release = rig.announce("1.1.0", rows)
    rig.refused(release, ("rejected",), "bad-signature")
    rig.still_serving("1.0.0")


def test_one_byte_flipped_in_the_stored_artifact(make_rig):
    rig = make_rig()
    rig.push("1.0.0")
    rows = rig.sign("1.1.0")
    for row in rows:  # the attacker edits the fleet's copy of each bundle
        stored = rig.stored(row)
        data = bytearray(stored.read_bytes())
        data[len(data) // 2] ^= 0x01
        stored.write_bytes(bytes(data))
    release = rig.announce("1.1.0", rows)
    rig.refused(release, ("rejected",), "hash-mismatch")
    rig.still_serving("1.0.0")


def test_one_byte_flipped_in_transit(make_rig):
    rig = make_rig()
    rig.push("1.0.0")
    flipped = []

    def flip(device_id, header, data):
        middle = header.get("total", 0) // 2
        if header["path"].startswith("targets/") and header["offset"] <= middle < header["offset"] + len(data):
            block = bytearray(data)
            block[middle - header["offset"]] ^= 0x80
            flipped.append(header["path"])
            return reply(header, bytes(block))
        return None

    intercept(rig.server, flip)
    rows = rig.sign("1.1.0")
    release = rig.announce("1.1.0", rows)
    rig.refused(release, ("rejected",), "hash-mismatch")
    assert {path.split(".", 1)[1] for path in flipped} == {row["target"] for row in rows}  # each bundle, in transit
    rig.still_serving("1.0.0")


def test_an_older_version_republished(make_rig):
    rig = make_rig()
    rig.push("1.1.0")
    release = rig.announce("1.0.0", rig.sign("1.0.0"))  # a newer release id carrying an older model
    rig.refused(release, ("rejected",), "rollback")
    rig.still_serving("1.1.0")


class Recorder:
    """A plain MQTT client recording every message under the devices' topics, retained or not: an
    attacker who owns the broker (the certificate with every right on it; one such client at a time)."""

    def __init__(self, home: FleetHome):
        self.messages: list[tuple[str, bytes]] = []
        self.subscribed = threading.Event()
        address = mqttlib.BrokerAddress.parse(home.broker_url)
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="attacker", clean_session=True,
                                  protocol=mqtt.MQTTv311)
        self.client.tls_set_context(attacker_tls(home).context())
        self.client.on_connect = lambda c, *_: c.subscribe([(f"{wire.PREFIX}/#", 1), (f"{wire.STREAMS}/#", 1)])
        self.client.on_subscribe = lambda *_: self.subscribed.set()
        self.client.on_message = lambda c, u, m: self.messages.append((m.topic, bytes(m.payload)))
        self.client.connect(address.host, address.port)
        self.client.loop_start()
        wait_for(self.subscribed.is_set, "the recorder to subscribe", 10)

    def recording(self) -> list[tuple[str, bytes]]:
        return list(self.messages)

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> None:
        self.client.publish(topic, payload, qos=1, retain=retain).wait_for_publish(10)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def desired_of(recording, release: int) -> dict[str, bytes]:
    """device -> the recorded `desired` message naming `release`."""
    found = {}
    for topic, payload in recording:
        if topic.startswith(wire.STREAMS):
            continue
        device_id, leaf = wire.parse_topic(topic)
        if leaf == "desired" and wire.decode(payload, {}).get("release_id") == release:
            found[device_id] = payload
    return found


def test_replayed_release_messages(make_rig):
    rig = make_rig()
    recorder = Recorder(rig.home)
    try:
        first = rig.push("1.0.0")
        recording = recorder.recording()
        rig.push("1.1.0")
        old_desired = desired_of(recording, first)
        blocks = [(t, p) for t, p in recording if t.endswith("/blocks") or t.startswith(wire.STREAMS)]
        assert sorted(old_desired) == sorted(DEVICES) and blocks
        for device_id, payload in old_desired.items():  # retained, as the fleet published it
            recorder.publish(wire.topic(device_id, "desired"), payload, retain=True)
        for topic, payload in blocks:
            recorder.publish(topic, payload)
    finally:
        recorder.close()
    rig.anomalous(first, "rollback")
    rig.still_serving("1.1.0")


def test_replayed_metadata_answers(make_rig):
    """Stronger replay: a man in the middle answers the device's fetches with the replies recorded
    during release 1 (re-addressed to the new requests), so the device sees the old, validly signed
    metadata."""
    rig = make_rig()
    recorder = Recorder(rig.home)
    try:
        first = rig.push("1.0.0")
        recording = recorder.recording()
    finally:
        recorder.close()
    rig.push("1.1.0")
    recorded = {}
    for topic, payload in recording:
        if topic.startswith(wire.STREAMS):
            continue
        device_id, leaf = wire.parse_topic(topic)
        if leaf == "blocks":
            header, data = wire.parse_block_reply(payload)
            recorded[(device_id, header["path"], header.get("offset"))] = (header, data)
    assert any(path == "metadata/timestamp.json" for _, path, _ in recorded)
    replayed = []

    def replay(device_id, header, data):
        old = recorded.get((device_id, header["path"], header.get("offset")))
        if old is None or not header["path"].startswith("metadata/"):
            return None
        replayed.append(header["path"])
        return reply({**old[0], "req": header["req"]}, old[1])

    intercept(rig.server, replay)
    attacker = Recorder(rig.home)  # the recorder is gone: one attacker client at a time
    try:
        for device_id, payload in desired_of(recording, first).items():
            attacker.publish(wire.topic(device_id, "desired"), payload, retain=True)
    finally:
        attacker.close()
    claims = rig.anomalous(first, "rollback")
    # refused by TUF on the replayed metadata itself, not later by the model version check
    assert all("metadata is older than what this device trusts" in a["claimed"] for a in claims.values()), claims
    assert "metadata/timestamp.json" in replayed and not any(p.startswith("targets/") for p in replayed)
    rig.still_serving("1.1.0")


class FrozenTrust:
    """edgeops.fleet.trust as the server sees it, except that it never re-signs online metadata."""

    def __getattr__(self, name):
        return getattr(trust, name)

    @staticmethod
    def refresh_online(repo, expiry) -> None:
        return None


def test_metadata_past_its_expiry(make_rig, monkeypatch):
    # The fleet's online refresh stops (a frozen or captured fleet server): snapshot and timestamp
    # are never re-signed, so what the devices can fetch expires.
    monkeypatch.setattr(server_module, "trust", FrozenTrust())
    rig = make_rig(lifetimes={"timestamp": 2})
    rig.push("1.0.0", expiry=LONG)  # the first release is signed with a timestamp that outlives the test
    rows = rig.sign("1.1.0")  # signs a timestamp valid for 2 s
    timestamp = rig.home.repo / "metadata" / "timestamp.json"
    wait_for(lambda: Metadata.from_bytes(timestamp.read_bytes()).signed.is_expired(), "the timestamp to expire", 10)
    release = rig.announce("1.1.0", rows)
    rig.refused(release, ("rejected",), "expired")
    rig.still_serving("1.0.0")
    # Once the fleet signs fresh metadata the same release goes through: a freeze is not a brick.
    with rig.home.repo_lock():
        trust.refresh_online(rig.home.repo, LONG)
    for agent in rig.agents.values():
        wait_for(lambda a=agent: (a.installed() or {}).get("version") == "1.1.0", f"{agent.config.id} to run 1.1.0")


def test_a_release_naming_another_profiles_bundle(make_rig):
    rig = make_rig()
    rig.push("1.0.0")
    rows = rig.sign("1.1.0")
    # Mix-and-match: each profile is given the (validly signed) bundle built for the other one.
    by_profile = {row["profile"]: row for row in rows}
    swapped = [{**by_profile[OTHER[p]], "profile": p} for p in PROFILES]
    release = rig.announce("1.1.0", swapped)
    rig.refused(release, ("rejected",), "wrong-profile")
    rig.still_serving("1.0.0")


def test_another_profiles_bundle_signed_as_ours(make_rig):
    """The targets key holder signs the rpi4 bundle under the x86 name with x86 custom metadata (and
    vice versa): the signed claim and the bundle's own manifest disagree."""
    rig = make_rig()
    rig.push("1.0.0")
    rows = []
    with rig.home.repo_lock():
        for profile in PROFILES:
            name = rig.releases[("1.1.0", profile)].name
            content = rig.releases[("1.1.0", OTHER[profile])]
            custom = {"model": "digits", "version": "1.1.0", "profile": profile}
            target = trust.add_target(rig.home.repo, name, content, custom, None, rig.home.expiry())
            rows.append({"profile": profile, "target": name, "sha256": target.hashes["sha256"], "length": target.length})
    release = rig.announce("1.1.0", rows)
    rig.refused(release, ("rejected", "failed"), "wrong-profile")
    rig.still_serving("1.0.0")


def test_content_longer_than_signed(make_rig):
    rig = make_rig()
    rig.push("1.0.0")
    extra = b"\0" * 4096

    def endless(device_id, header, data):
        if not header["path"].startswith("targets/") or "error" in header:
            return None
        if header["offset"] + len(data) == header["total"]:  # the last block runs on past the signed end
            data += extra[: wire.MAX_BLOCK - len(data)]
        return reply({**header, "total": header["total"] + len(extra)}, data)

    intercept(rig.server, endless)
    release = rig.announce("1.1.0", rig.sign("1.1.0"))
    rig.refused(release, ("rejected",), "length")
    rig.still_serving("1.0.0")
