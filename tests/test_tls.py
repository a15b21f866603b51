"""Mutual TLS end to end, with the fleet's own Mosquitto, a real fleet server and real agents:
- an eavesdropper on the path (a TCP relay that logs every byte between the agents, the fleet and
  the broker, or between an operator's CLI and the HTTPS API) sees none of the model's bytes, keys,
  tokens or fleet data in clear;
- `edgeops device revoke` with the broker `fleet serve` runs: the device's connection is closed
  within 5 s, it is refused from then on, and a regenerated configuration and a new enrollment do
  not bring it back; re-enrolling the id needs --re-enroll and yields new credentials;
- `edgeops device renew` reaches the device over its connection, and a certificate the fleet CA did
  not sign, offered on the same topic, is refused;
- a device accepts only the broker's certificate, not another server certificate of the fleet CA.
"""

from __future__ import annotations

import json
import socket
import sys
import threading
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from click.testing import CliRunner

from edgeops.agent.service import Agent
from edgeops.cli import cli
from edgeops.fleet import ca, mosquitto, registry, telemetry
from edgeops.fleet.home import enroll_device, push, renew_device, revoke_device
from edgeops.fleet.server import FleetServer
from edgeops.protocol import certs, wire
from edgeops.protocol.errors import EdgeopsError
from edgeops.protocol.mqtt import TlsFiles

sys.path.insert(0, str(Path(__file__).parent))
from fleetkit import (AT_ONCE, PROFILES, FleetBroker, attacker_tls, device_tls, free_port,  # noqa: E402,F401
                      new_fleet, releases, wait_for)


class Relay:
    """A TCP relay from a local port to the broker that keeps a copy of every byte, both ways."""

    def __init__(self, target_port: int):
        self.target_port = target_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.seen = bytearray()
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                with self._lock:
                    self.seen += data
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self.listener.close()


def point_at(device_dir: Path, url: str) -> None:
    config = json.loads((device_dir / "device.json").read_text())
    (device_dir / "device.json").write_text(json.dumps({**config, "broker": url}))


def run_agents(device_dirs: list[Path]):
    stop = threading.Event()
    agents = [Agent(d) for d in device_dirs]
    threads = [threading.Thread(target=a.run, args=(stop,), daemon=True) for a in agents]
    for t in threads:
        t.start()

    def halt() -> None:
        stop.set()
        for t in threads:
            t.join(timeout=10)
    return agents, halt


def test_an_eavesdropper_on_the_path_sees_nothing_in_clear(releases, tmp_path):
    home = new_fleet(tmp_path)
    broker = FleetBroker(home, "127.0.0.1").start()
    relay = Relay(broker.port)
    url = f"mqtts://127.0.0.1:{relay.port}"  # the broker's certificate covers 127.0.0.1: TLS checks pass through the relay
    devices = {"dev-a": "x86-vnni", "dev-b": "rpi4"}
    for device_id, profile in devices.items():
        enroll_device(home, device_id, profile, {"site": "lab"}, tmp_path / device_id)
        point_at(tmp_path / device_id, url)
    server = FleetServer(home, url).start()
    agents, halt = run_agents([tmp_path / d for d in devices])
    try:
        push(home, [releases[("1.0.0", p)] for p in PROFILES], {"site": "lab"}, plan=AT_ONCE)
        for agent in agents:
            wait_for(lambda a=agent: (a.installed() or {}).get("version") == "1.0.0", f"{agent.config.id} to install over TLS")
    finally:
        halt()
        server.stop()
        relay.close()
        broker.stop()
    seen = bytes(relay.seen)
    bundle = releases[("1.0.0", "x86-vnni")].read_bytes()
    assert len(seen) > len(bundle), "the relay did not carry the transfer"
    secrets = {"bundle slice": bundle[len(bundle) // 2: len(bundle) // 2 + 48],
               "api token": home.config["api_token"].encode(),
               "device key": b"".join((tmp_path / "dev-a/tls/device.key").read_bytes().splitlines()[1:2]),
               "topic names": wire.PREFIX.encode(), "device id in a payload": b'"device":"dev-a"'}
    leaked = [name for name, needle in secrets.items() if needle in seen]
    assert not leaked, f"seen in clear on the wire: {leaked}"
    assert b"-----BEGIN" not in seen


def listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def refused(port: int, tls: TlsFiles) -> bool:
    """True if the broker does not let a client with `tls` in: the handshake fails, the connection
    drops, or the CONNACK is a refusal."""
    answered, accepted = threading.Event(), []
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="probe", clean_session=True, protocol=mqtt.MQTTv311)
    c.tls_set_context(tls.context())
    c.on_connect = lambda c_, u, f, rc, p: (accepted.append(not rc.is_failure), answered.set())
    c.on_disconnect = lambda *a: answered.set()
    try:
        c.connect("127.0.0.1", port, keepalive=5)
    except ConnectionRefusedError:
        raise AssertionError(f"nothing listens on {port}: the broker is down") from None
    except OSError:  # refused during the handshake
        return True
    c.loop_start()
    try:
        assert answered.wait(10), "the broker neither answered nor dropped the probe"
        return accepted != [True]
    finally:
        c.loop_stop()
        c.disconnect()


def test_a_revoked_device_is_dropped_within_5s_and_never_comes_back(releases, tmp_path):
    home = new_fleet(tmp_path)
    broker = FleetBroker(home, "127.0.0.1").start()
    for device_id in ("dev-a", "dev-b"):
        enroll_device(home, device_id, "x86-vnni", {"site": "lab"}, tmp_path / device_id)
    server = FleetServer(home, home.broker_url, broker=broker).start()  # as `fleet serve` runs it
    agents, halt = run_agents([tmp_path / "dev-a", tmp_path / "dev-b"])
    victim, other = agents
    try:
        wait_for(lambda: victim.link.connected.is_set() and other.link.connected.is_set(), "both devices to connect")
        db = registry.open_db(home.db_path)
        wait_for(lambda: registry.device(db, "dev-a")["online"], "the fleet to see dev-a online")

        result = CliRunner().invoke(cli, ["device", "revoke", "dev-a", "--fleet", str(home.path), "--reason", "stolen"])
        assert result.exit_code == 0, result.output
        wait_for(lambda: not victim.link.connected.is_set(), "the revoked device's connection to close", 5)
        wait_for(lambda: listening(broker.port), "the broker to listen again after its restart", 10)
        assert refused(broker.port, device_tls(tmp_path / "dev-a"))
        assert registry.device(db, "dev-a") is None and "dev-a" in registry.revoked_ids(db)
        assert all(d["id"] != "dev-a" for d in registry.status(db)["devices"])
        # what still arrives from it (a message the broker had queued) is refused and counted, never stored
        before = registry.status(db)["revoked"][0]["refused_messages"]  # what really came in since, if anything
        registry.record_reports(db, [("dev-a", {"device": "dev-a", "online": True})])
        telemetry.ingest(db, [("dev-a", {"device": "dev-a", "dropped": 0, "drop_watermark": 0, "dropped_unsequenced": 0,
                                         "records": [{"seq": 99, "kind": "inference", "t": 1.0, "body": {"ok": True}}]})])
        assert registry.status(db)["revoked"][0] | {"revoked_at": 0} == {"id": "dev-a", "revoked_at": 0, "reason": "stolen",
                                                                        "refused_messages": before + 2}
        assert db["telemetry"].count_where("device = 'dev-a' and seq = 99") == 0

        # the others carry on: a release reaches them, never the revoked one
        release = push(home, [releases[("1.0.0", "x86-vnni")]], {"site": "lab"}, plan=AT_ONCE)
        wait_for(lambda: (other.installed() or {}).get("version") == "1.0.0", "dev-b to install")
        assert victim.installed() is None
        assert registry.desired(db, "dev-a") is None
        assert db["executions"].count_where("device = ? and release_id = ?", ["dev-a", release]) == 0

        # nothing regenerated later brings it back: another configuration written, a device enrolled
        # (the server reloads the broker for it), the broker restarted
        mosquitto.write_config(home, tmp_path / "elsewhere")
        enroll_device(home, "dev-c", "x86-vnni", {"site": "lab"}, tmp_path / "dev-c")
        wait_for(lambda: not refused(broker.port, device_tls(tmp_path / "dev-c")), "the new device to be let in", 10)
        assert refused(broker.port, device_tls(tmp_path / "dev-a"))
        broker.stop()
        broker.start()
        assert refused(broker.port, device_tls(tmp_path / "dev-a"))
        assert "user dev-a\ntopic deny #" in (tmp_path / "elsewhere/acl").read_text()
        with pytest.raises(EdgeopsError, match="--re-enroll"):
            enroll_device(home, "dev-a", "x86-vnni", {"site": "lab"}, tmp_path / "dev-a-again")
        enroll_device(home, "dev-a", "x86-vnni", {"site": "lab"}, tmp_path / "dev-a-new", re_enroll=True)
        assert (tmp_path / "dev-a-new/tls/device.key").read_bytes() != (tmp_path / "dev-a/tls/device.key").read_bytes()
        wait_for(lambda: not refused(broker.port, device_tls(tmp_path / "dev-a-new")), "the re-enrolled device to be let in", 10)
        assert refused(broker.port, device_tls(tmp_path / "dev-a"))  # the old credentials stay revoked
    finally:
        halt()
        server.stop()
        broker.stop()


def test_a_renewed_certificate_reaches_the_device_and_a_forged_one_is_refused(tmp_path):
    home = new_fleet(tmp_path)
    broker = FleetBroker(home, "127.0.0.1").start()
    enroll_device(home, "dev-a", "x86-vnni", {}, tmp_path / "dev-a", cert_days=2)
    server = FleetServer(home, home.broker_url, broker=broker).start()
    agents, halt = run_agents([tmp_path / "dev-a"])
    cert_path = tmp_path / "dev-a/tls/device.pem"
    before = cert_path.read_bytes()
    try:
        wait_for(agents[0].link.connected.is_set, "the device to connect")
        expiring = CliRunner().invoke(cli, ["status", "--fleet", str(home.path)])
        flat = " ".join(expiring.output.split())
        assert "dev-a's certificate expires in 2 days" in flat, expiring.output

        # a forged renewal: right subject and key, signed by another CA; published by someone who owns the broker
        other_ca = tmp_path / "rogue-ca"
        ca.create_ca(other_ca)
        forged = ca.issue(other_ca, "dev-a", 3650, public_key=certs.public_key(before)).cert
        attacker = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="x", protocol=mqtt.MQTTv311)
        attacker.tls_set_context(attacker_tls(home).context())
        attacker.connect("127.0.0.1", broker.port)
        attacker.loop_start()
        attacker.publish(wire.topic("dev-a", "cert"), forged, qos=1).wait_for_publish(10)
        attacker.loop_stop()
        attacker.disconnect()

        renewed = renew_device(home, "dev-a", days=400)
        wait_for(lambda: cert_path.read_bytes() == renewed, "the renewed certificate to reach the device")
        assert certs.serial_and_expiry(renewed)[1] > certs.serial_and_expiry(before)[1]
        assert certs.public_key(renewed) == certs.public_key(before)
        agents[0].link.client.reconnect()  # the next connection uses it
        wait_for(agents[0].link.connected.is_set, "the device to reconnect with its renewed certificate")
        assert "certificate expires" not in " ".join(CliRunner().invoke(cli, ["status", "--fleet", str(home.path)]).output.split())
    finally:
        halt()
        server.stop()
        broker.stop()
    with pytest.raises(EdgeopsError, match="not signed by the pinned fleet CA"):
        certs.check_renewal((tmp_path / "dev-a/tls/ca.pem").read_bytes(), renewed, forged)


def test_fleet_serve_without_mosquitto_says_how_to_install_it(tmp_path):
    home = new_fleet(tmp_path)
    result = CliRunner().invoke(cli, ["fleet", "serve", str(home.path), "--http", f"127.0.0.1:{free_port()}"],
                                env={"EDGEOPS_MOSQUITTO": str(tmp_path / "no-such-mosquitto")})
    assert result.exit_code != 0
    assert result.output.strip().splitlines()[-1].startswith("Error: Mosquitto is not installed: `apt-get install mosquitto`")


class ApiCertificateBroker(FleetBroker):
    """A broker that presents the fleet API's certificate: a server certificate of the same CA, for
    the same names, as someone holding the API's key (a reverse proxy) could."""

    def _write(self) -> Path:
        conf = super()._write()
        conf.write_text(conf.read_text().replace("broker.pem", "api.pem").replace("broker.key", "api.key"))
        return conf


def test_a_device_accepts_only_the_brokers_certificate(tmp_path, caplog):
    home = new_fleet(tmp_path)
    enroll_device(home, "dev-a", "x86-vnni", {}, tmp_path / "dev-a")
    broker = ApiCertificateBroker(home, "127.0.0.1").start()
    agents, halt = run_agents([tmp_path / "dev-a"])
    try:
        wait_for(lambda: "not the fleet's broker" in caplog.text, "the agent to refuse the API's certificate", 20)
        assert not agents[0].link.connected.is_set()
    finally:
        halt()
        broker.stop()


def test_an_eavesdropper_on_the_api_sees_no_token(tmp_path):
    from edgeops.fleet.api import ApiServer, serve_options

    home = new_fleet(tmp_path)
    enroll_device(home, "dev-a", "x86-vnni", {"site": "secret-site"}, tmp_path / "dev-a")
    api = ApiServer(home, f"127.0.0.1:{free_port()}", **serve_options(home, {"open_reads": False})).start()
    relay = Relay(int(api.url.rsplit(":", 1)[1].rstrip("/")))
    try:
        token = home.config["api_token"]
        result = CliRunner().invoke(cli, ["status", "--fleet", f"https://127.0.0.1:{relay.port}", "--token", token,
                                          "--ca", str(home.pki / "ca.pem"), "--json"])
        assert result.exit_code == 0, result.output
        assert json.loads(result.output)["devices"][0]["labels"] == {"site": "secret-site"}
    finally:
        relay.close()
        api.stop()
    seen = bytes(relay.seen)
    assert len(seen) > 1000, "the relay did not carry the exchange"
    assert token.encode() not in seen and b"secret-site" not in seen and b"Bearer" not in seen


def test_a_second_broker_for_the_same_fleet_is_refused_and_the_first_keeps_running(tmp_path):
    from edgeops.fleet.broker import ManagedBroker

    home = new_fleet(tmp_path)
    first = FleetBroker(home, "127.0.0.1").start()
    try:
        with pytest.raises(EdgeopsError, match="is taken"):
            ManagedBroker(home, "127.0.0.1").start()
        assert first.proc.poll() is None and listening(first.port)
    finally:
        first.stop()


def test_the_broker_a_killed_fleet_serve_left_is_stopped_by_the_next(tmp_path):
    import signal
    import subprocess

    from edgeops.fleet.broker import ManagedBroker

    home = new_fleet(tmp_path)
    port = int(home.broker_url.rsplit(":", 1)[1])
    serve = subprocess.Popen([sys.executable, "-m", "edgeops", "fleet", "serve", str(home.path), "--http",
                              f"127.0.0.1:{free_port()}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: listening(port), "fleet serve's broker to listen", 30)
        serve.send_signal(signal.SIGKILL)
        serve.wait(10)
        assert listening(port)  # the orphan goes on
        broker = ManagedBroker(home, "127.0.0.1").start()  # stops it, then takes its place
        try:
            assert broker.proc.poll() is None
            assert str(broker.proc.pid) == (home.path / "broker/mosquitto.pid").read_text().strip()
        finally:
            broker.stop()
    finally:
        if serve.poll() is None:
            serve.kill()
