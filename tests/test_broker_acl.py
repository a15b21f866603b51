"""Broker access control on the fleet's real Mosquitto, configured with the files `edgeops fleet
mosquitto-config` writes (mutual TLS with the fleet CA, identity from the certificate, the generated
ACL and CRL): the fleet and its devices work with their certificates, a device can neither publish
nor read under another device's id, and every client without a valid certificate from the fleet CA
(none, another CA's, an expired one, a revoked one) is refused at connect.

A denial is silent in MQTT 3.1.1 (Mosquitto acknowledges a refused QoS 1 publish and drops it), so
each check ends with an allowed message sent after the refused ones, on the same connection: once
the observer received it, anything refused would have arrived before it.
"""

from __future__ import annotations

import datetime as dt
import json
import ssl
import sys
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from edgeops.agent.service import Agent
from edgeops.fleet import ca, mosquitto, registry
from edgeops.fleet.home import enroll_device, push, revoke_device
from edgeops.fleet.mosquitto import FLEET_USER
from edgeops.fleet.server import FleetServer
from edgeops.protocol import wire
from edgeops.protocol.mqtt import BrokerAddress, TlsFiles

sys.path.insert(0, str(Path(__file__).parent))
from fleetkit import AT_ONCE, device_tls, new_fleet, secured_mosquitto, wait_for  # noqa: E402

DEVICES = ("dev-a", "dev-b")
REFUSAL_WAIT_S = 5  # how long a refused client is watched for a CONNACK that must never come


@pytest.fixture
def fleet_broker(tmp_path):
    """A fleet with two enrolled devices and its Mosquitto secured by the generated files."""
    home = new_fleet(tmp_path)
    for device_id in DEVICES:
        enroll_device(home, device_id, "x86-vnni", {"site": "lab"}, tmp_path / device_id)
    broker = secured_mosquitto(home)
    yield broker
    broker.stop()


@pytest.fixture
def fleet(fleet_broker):
    return fleet_broker.home


class Client:
    """A plain paho client that records what it receives and the outcome of its CONNECT.

    `tls` None connects in plain TCP; a TlsFiles with `cert` None offers no client certificate.
    With `expect_refusal` the connection may fail in the handshake, or the broker may close it
    before any CONNACK: `accepted` is then False, and `error` holds what the handshake raised."""

    def __init__(self, url: str, tls: TlsFiles | None, expect_refusal: bool = False):
        self.messages: list[tuple[str, bytes]] = []
        self.connack: list[mqtt.ReasonCode] = []
        self.granted: list[list[mqtt.ReasonCode]] = []
        self.disconnects = 0
        self.error: Exception | None = None
        address = BrokerAddress.parse(url)
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="", clean_session=True, protocol=mqtt.MQTTv311)
        if tls is not None:
            context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(tls.ca))
            if tls.cert is not None:
                context.load_cert_chain(str(tls.cert), str(tls.key))
            self.client.tls_set_context(context)
        self.client.reconnect_delay_set(min_delay=1, max_delay=2)
        self.client.on_connect = lambda c, u, f, rc, p: self.connack.append(rc)
        self.client.on_disconnect = lambda c, u, f, rc, p: self._disconnected()
        self.client.on_message = lambda c, u, m: self.messages.append((m.topic, m.payload))
        self.client.on_subscribe = lambda c, u, mid, codes, p: self.granted.append(codes)
        try:
            self.client.connect(address.host, address.port)
        except (ssl.SSLError, OSError) as exc:  # the handshake itself refused (TLS 1.2 checks the client there)
            if not expect_refusal:
                raise
            self.error = exc
            return
        self.client.loop_start()
        if expect_refusal:
            deadline = time.monotonic() + REFUSAL_WAIT_S
            while time.monotonic() < deadline and not self.connack and not self.disconnects:
                time.sleep(0.05)
        else:
            wait_for(lambda: self.connack, "CONNACK", 10)

    def _disconnected(self) -> None:
        self.disconnects += 1

    @property
    def accepted(self) -> bool:
        return any(not rc.is_failure for rc in self.connack)

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


def device_client(home, device_id: str) -> Client:
    return Client(home.broker_url, device_tls(home.path.parent / device_id))


def fleet_client(home) -> Client:
    return Client(home.broker_url, home.client_tls())


def refused(home, tls: TlsFiles | None) -> Client:
    """A connection attempt that must be refused; asserts it was, and that it got nothing."""
    client = Client(home.broker_url, tls, expect_refusal=True)
    try:
        assert not client.accepted, f"the broker accepted {tls}"
        assert client.error is not None or client.disconnects or not client.connack
        assert client.messages == []
    finally:
        client.close()
    return client


def expired_certificate(home, device_id: str, out: Path) -> TlsFiles:
    """A client certificate for `device_id` signed by the fleet CA, valid only in the past."""
    ca_cert = x509.load_pem_x509_certificate((home.pki / "ca.pem").read_bytes())
    ca_key = serialization.load_pem_private_key((home.pki / "ca.key").read_bytes(), password=None)
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_id)]))
            .issuer_name(ca_cert.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=30)).not_valid_after(now - dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    out.mkdir(parents=True, exist_ok=True)
    (out / "device.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (out / "device.key").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                       serialization.NoEncryption()))
    return TlsFiles(home.pki / "ca.pem", out / "device.pem", out / "device.key")


def test_generated_files_require_certificates(fleet, tmp_path):
    conf = (fleet.path / "broker" / "mosquitto.conf").read_text().splitlines()
    for line in ("require_certificate true", "use_identity_as_username true", "use_username_as_clientid true",
                 "allow_anonymous false", f"cafile {fleet.pki.resolve() / 'ca.pem'}",
                 f"crlfile {fleet.pki.resolve() / 'crl.pem'}", f"listener {BrokerAddress.parse(fleet.broker_url).port} 127.0.0.1"):
        assert line in conf, line
    assert not any(line.startswith("password_file") for line in conf)
    assert sum(line.startswith("listener") for line in conf) == 1  # no plaintext listener
    ca_cert = x509.load_pem_x509_certificate((fleet.pki / "ca.pem").read_bytes())
    db_bytes = (fleet.db_path).read_bytes()
    for device_id in DEVICES:
        device = json.loads((tmp_path / device_id / "device.json").read_text())
        assert "password" not in device and "username" not in device
        tls = device_tls(tmp_path / device_id)
        assert tls.ca.read_bytes() == (fleet.pki / "ca.pem").read_bytes()
        cert = x509.load_pem_x509_certificate(tls.cert.read_bytes())
        cert.verify_directly_issued_by(ca_cert)
        assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == device_id
        usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        assert list(usage) == [ExtendedKeyUsageOID.CLIENT_AUTH]
        assert tls.key.stat().st_mode & 0o777 == 0o600
        key_body = b"".join(tls.key.read_bytes().splitlines()[1:-1])
        assert key_body not in db_bytes  # the device's key lives only in its folder
    for path in (fleet.path / "fleet.json", fleet.pki / "ca.key", fleet.pki / "broker.key", fleet.pki / "fleet.key"):
        assert path.stat().st_mode & 0o777 == 0o600, path
    assert b"PRIVATE KEY" not in db_bytes


def test_fleet_and_devices_work_with_certificates(fleet, tmp_path, slot_releases):
    server = FleetServer(fleet, fleet.broker_url).start()
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
        for leaf in ("state", "fetch", "telemetry", "desired", "blocks", "acks", "cert"):
            intruder.publish(wire.topic("dev-b", leaf), forged, retain=True)  # acknowledged, then dropped
        for leaf in wire.DEVICE_SUBSCRIBES:  # nor may it write what the fleet sends to itself
            intruder.publish(wire.topic("dev-a", leaf), forged, retain=True)
        intruder.publish("elsewhere/topic", forged)
        intruder.publish(f"{wire.STREAMS}/{'0' * 64}", forged)  # streams are the fleet's to write
        intruder.publish(wire.topic("dev-a", "state"), b"sentinel")
        wait_for(lambda: observer.received(b"sentinel"), "the device's own state to arrive")
        assert [t for t, p in observer.messages if p == forged] == []
    finally:
        observer.close()  # the fleet's certificate runs one client at a time (its CN is the client id)
        intruder.close()
    late = fleet_client(fleet)  # a retained forgery would reach a later subscriber
    try:
        late.subscribe(f"{wire.PREFIX}/dev-b/#", f"{wire.PREFIX}/dev-a/#")
        late.client.publish(wire.topic("dev-b", "desired"), b"sentinel-2", qos=1)
        wait_for(lambda: late.received(b"sentinel-2"), "the fleet's own message to arrive")
        assert not late.received(forged)
    finally:
        late.close()


def test_forged_acks_from_another_device_are_dropped(fleet):
    """An ack tells a device its telemetry is stored, so it drops it from its outbox: another
    authenticated device must not be able to send one (it would erase the victim's telemetry)."""
    victim, forger = device_client(fleet, "dev-b"), device_client(fleet, "dev-a")
    try:
        assert not any(c.is_failure for c in victim.subscribe(wire.topic("dev-b", "acks")))
        forged = wire.telemetry_ack(list(range(1, 100)))
        forger.publish(wire.topic("dev-b", "acks"), forged)
        forger.publish(wire.topic("dev-b", "acks"), forged, retain=True)
        fleet_side = fleet_client(fleet)  # the fleet (or an ingest worker) may ack
        try:
            genuine = wire.telemetry_ack([7])
            fleet_side.publish(wire.topic("dev-b", "acks"), genuine)
        finally:
            fleet_side.close()
        wait_for(lambda: victim.received(genuine), "the fleet's ack to arrive")
        assert [p for _, p in victim.messages] == [genuine]
    finally:
        victim.close()
        forger.close()
    late = device_client(fleet, "dev-b")  # nor was a forgery retained for its next subscription
    try:
        late.subscribe(wire.topic("dev-b", "acks"))
        fleet_side = fleet_client(fleet)
        try:
            fleet_side.publish(wire.topic("dev-b", "acks"), b"sentinel")
        finally:
            fleet_side.close()
        wait_for(lambda: late.received(b"sentinel"), "the fleet's message to arrive")
        assert not late.received(forged)
    finally:
        late.close()


def test_device_reads_nothing_under_another_id(fleet):
    fleet_side, snoop = fleet_client(fleet), device_client(fleet, "dev-a")
    try:
        secret = b'{"release_id": 7, "target": "for-dev-b-only"}'
        fleet_side.publish(wire.topic("dev-b", "desired"), secret, retain=True)  # before the subscription
        snoop.subscribe("#", f"{wire.PREFIX}/+/state", f"{wire.PREFIX}/dev-b/desired", f"{wire.PREFIX}/dev-b/#",
                        wire.topic("dev-a", "desired"))
        for leaf in ("desired", "blocks", "state", "fetch", "acks", "cert"):
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


@pytest.mark.parametrize("who", ["plain TCP", "TLS without a client certificate", "another CA's certificate",
                                 "expired certificate"])
def test_clients_without_a_valid_certificate_are_refused_at_connect(fleet, tmp_path, who):
    if who == "plain TCP":
        tls = None
    elif who == "TLS without a client certificate":
        tls = TlsFiles(fleet.pki / "ca.pem", None, None)  # type: ignore[arg-type]
    elif who == "another CA's certificate":  # same name as an enrolled device, signed by a CA of its own
        ca.create_ca(tmp_path / "rogue-pki", "edgeops fleet CA")
        ca.write_issued(ca.issue(tmp_path / "rogue-pki", "dev-a"), tmp_path / "rogue.pem", tmp_path / "rogue.key")
        tls = TlsFiles(fleet.pki / "ca.pem", tmp_path / "rogue.pem", tmp_path / "rogue.key")
    else:
        tls = expired_certificate(fleet, "dev-a", tmp_path / "expired")
    refused(fleet, tls)
    right = device_client(fleet, "dev-a")
    assert right.accepted  # while the right certificate still works
    right.close()


def test_revoked_device_is_refused_and_stays_refused(fleet_broker, tmp_path):
    home = fleet_broker.home
    watcher = device_client(home, "dev-b")
    victim = device_client(home, "dev-a")  # connected when it is revoked
    try:
        serials = revoke_device(home, "dev-a", "stolen")
        crl = x509.load_pem_x509_crl((home.pki / "crl.pem").read_bytes())
        assert serials and all(crl.get_revoked_certificate_by_serial_number(s) is not None for s in serials)
        connects = len(victim.connack)
        fleet_broker.refresh(restart=True)  # closes the revoked device's open connection
        refused(home, device_tls(tmp_path / "dev-a"))
        wait_for(lambda: watcher.accepted and len(watcher.connack) >= 2, "the other device to reconnect")
        time.sleep(3)  # the old connection's client retried meanwhile (reconnect delay 1-2 s)
        assert not any(not rc.is_failure for rc in victim.connack[connects:]), "the revoked client got back in"
    finally:
        victim.close()
        watcher.close()
    # The files written again, more devices enrolled: the revocation holds.
    files = mosquitto.write_config(home, tmp_path / "regenerated", "127.0.0.1")
    assert "user dev-a\ntopic deny #" in files["acl"].read_text()
    enroll_device(home, "dev-c", "x86-vnni", {"site": "lab"}, tmp_path / "dev-c")
    fleet_broker.refresh(restart=False)
    refused(home, device_tls(tmp_path / "dev-a"))
    fleet_broker.stop()
    fleet_broker.start()
    refused(home, device_tls(tmp_path / "dev-a"))
    assert "user dev-a\ntopic deny #" in (fleet_broker.folder / "acl").read_text()
    for device_id in ("dev-b", "dev-c"):
        right = device_client(home, device_id)
        assert right.accepted, device_id
        right.close()


def test_cli_writes_the_files(cli_ok, cli_error, tmp_path):
    cli_ok("fleet", "init", tmp_path / "fleet", "--broker", "mqtts://127.0.0.1:18830")
    cli_ok("device", "enroll", "pi-001", "--profile", "rpi4", "--fleet", tmp_path / "fleet", "-o", tmp_path / "pi-001")
    output = cli_ok("fleet", "mosquitto-config", tmp_path / "fleet", "-o", tmp_path / "broker", "--bind", "127.0.0.1").output
    assert f"mosquitto -c {tmp_path / 'broker' / 'mosquitto.conf'}" in output
    assert not (tmp_path / "broker" / "passwd").exists()
    conf = (tmp_path / "broker" / "mosquitto.conf").read_text()
    assert "listener 18830 127.0.0.1" in conf and "require_certificate true" in conf
    assert "pattern write edgeops/v1/devices/%u/state" in (tmp_path / "broker" / "acl").read_text()
    assert f"user {FLEET_USER}" in (tmp_path / "broker" / "acl").read_text()
    assert all((tmp_path / "pi-001" / "tls" / name).exists() for name in ("ca.pem", "device.pem", "device.key"))
    for name in ("ca.pem", "ca.key"):  # a fleet from before certificates
        (tmp_path / "fleet" / "pki" / name).unlink()
    assert "predates certificates" in cli_error("fleet", "mosquitto-config", tmp_path / "fleet", "-o", tmp_path / "b2")
