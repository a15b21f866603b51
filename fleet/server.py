"""`edgeops fleet serve`: the fleet's MQTT side — desired releases out, fetches answered, states in.

Invariants:
- Every device's retained `desired` message equals `registry.desired()` for it, as the rollout
  engine (fleet/rollout.py, run every ENGINE_S here) set it; it is republished whenever that
  changes, so a device that connects later still gets it.
- Fetches are answered only for TUF metadata and content-addressed targets of the repository
  (`wire.FETCH_PATH`); the device verifies everything it receives, so the fleet need not be trusted
  for integrity, only for availability. Targets go out on their broadcast streams (fleet/streams.py).
- paho's network thread only parses and hands off: state reports and telemetry are written by one
  writer thread (fleet/ingest.Writer), a burst in one transaction, and stream blocks are sent by
  another, so neither a slow disk nor a big release delays answering the next message.
- Device messages are acknowledged to the broker (manual PUBACK) only after the transaction that
  stored them committed, so a fleet server killed mid-write gets them again from its persistent
  session instead of losing them.
- With `share`, telemetry comes through the shared subscription of that group, so ingest workers
  (`edgeops fleet ingest`, fleet/ingest.py) take their part of it; everything else stays here.
- A malformed message is logged and dropped; no message can stop the server.
- Online TUF metadata (snapshot, timestamp) is re-signed before it expires.
- Each enrolled device's newest certificate is its retained `cert` message (a renewal reaches it
  over its existing connection; it checks the CA signature, so the fleet is not trusted for it).
- With a broker it runs (fleet/broker.py), a certificate issued or revoked since the last round
  makes the broker reload its CRL and ACL, and a revocation restarts it, which closes the revoked
  device's connection, within one round (ENGINE_S).
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt

from edgeops.fleet import ca, hooks, ingest, registry, rollout, telemetry, trust
from edgeops.fleet.api import DEFAULT_HTTP, ApiServer, serve_options
from edgeops.fleet.broker import ManagedBroker
from edgeops.fleet.home import CONFIG, FleetHome, withdraw_rolled_back
from edgeops.fleet.mosquitto import FLEET_USER
from edgeops.fleet.streams import Streams
from edgeops.protocol import mqtt as mqttlib
from edgeops.protocol import wire
from edgeops.protocol.errors import EdgeopsError

log = logging.getLogger(__name__)
POLL_SECONDS = 0.1
ENGINE_S = 1.0  # how often the rollout engine runs: time-outs, assignments, gates, advances
DRIFT_CHECK_S = 5.0  # how often flagged model versions are looked for, with --on-drift


@dataclass
class _Retained:
    """What this server last published, retained, on one leaf of every device's topics."""
    leaf: str
    sent: dict[str, bytes] = field(default_factory=dict)  # device -> payload
    generation: tuple | None = None  # the registry's generation when `sent` was last brought up to date

    def forget(self) -> None:
        self.sent.clear()
        self.generation = None


@dataclass
class FleetServer:
    home: FleetHome
    broker_url: str
    on_drift: str | None = None  # shell command run once per model version flagged for retraining (fleet/hooks.py)
    share: str | None = None  # shared-subscription group for telemetry, with the ingest workers (fleet/ingest.py)
    broker: ManagedBroker | None = None  # the broker `fleet serve` runs, refreshed on enrollments and revocations

    def __post_init__(self) -> None:
        self.db = ingest.open_registry(self.home)
        self._db_lock = threading.Lock()
        self._desired = _Retained("desired")
        self._certs = _Retained("cert")
        self._withdraw_error = ""  # logged once, not every round
        self._targets: dict[str, bytes] = {}
        self._stop = threading.Event()
        self.connected = threading.Event()
        self._cleared: set[str] = set()  # revoked devices whose retained messages this run deleted
        self._identities = registry.identities_generation(self.db)
        self.client = mqttlib.client(FLEET_USER, self.broker_url, self.home.client_tls())
        self.client.manual_ack_set(True)
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self._subscriptions = [(f"{wire.PREFIX}/+/{leaf}", 1) for leaf in ("fetch", "state")]
        self._subscriptions.append((ingest.telemetry_filter(self.share), 1))
        self.client.on_subscribe = lambda *args: log.info("subscribed to %s", ", ".join(t for t, _ in self._subscriptions))
        self.writer = ingest.Writer(self.client, self._store)
        self.streams = Streams(self._read, lambda topic, payload: self.client.publish(topic, payload, qos=1))

    def start(self) -> "FleetServer":
        self.client.loop_start()
        self._threads = [threading.Thread(target=run, name=f"edgeops-fleet-{name}", daemon=True)
                         for name, run in (("loop", self._loop), ("reports", lambda: self.writer.run(self._stop)),
                                           ("streams", lambda: self.streams.run(self._stop)))]
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=10)
        self.client.loop_stop()
        self.client.disconnect()

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            log.error("broker refused the fleet: %s", reason_code)
            return
        client.subscribe(self._subscriptions)
        if self.share is not None:  # a session persisted from a run without --share would get every message too
            client.unsubscribe(ingest.telemetry_filter())
        for retained in (self._desired, self._certs):  # republish every one after a (re)connect
            retained.forget()
        self.connected.set()

    def _on_message(self, client, userdata, message: mqtt.MQTTMessage) -> None:
        stored = False
        try:
            device_id, leaf = wire.parse_topic(message.topic)
            if not message.payload:  # a retained message being cleared, e.g. by `_clear_revoked`
                return
            if message.retain and leaf != "state":  # only state is retained in the protocol: old junk
                raise wire.WireError("a retained message on a leaf the protocol never retains")
            if leaf == "fetch":
                self._answer_fetch(device_id, message.payload)
            elif leaf in ("state", "telemetry"):
                self.writer.put((leaf, device_id, ingest.parse_report(leaf, message.payload, device_id), message.mid))
                stored = True  # acknowledged by the writer, after its commit
        except wire.WireError as exc:
            telemetry.warn_limited(f"dropped {message.topic}", "dropped message on %s: %s", message.topic, exc)
        except Exception:  # a bug must not take the server down; it is logged with its traceback
            log.exception("error handling message on %s", message.topic)
        finally:
            if not stored:
                client.ack(message.mid, message.qos)

    def _answer_fetch(self, device_id: str, payload: bytes) -> None:
        request = wire.parse_fetch_request(payload)
        reply_topic = wire.topic(device_id, "blocks")
        try:
            if "blocks" in request:
                self.streams.request(request["path"], request["blocks"])
                return
            data = self._read(request["path"])
        except OSError:
            self.client.publish(reply_topic, wire.error_reply(request["req"], request["path"], "not found"), qos=1)
            return
        offset = min(request["offset"], len(data))
        block = data[offset : offset + request["length"]]
        self.client.publish(reply_topic, wire.block_reply(request["req"], request["path"], offset, len(data), block), qos=1)

    def _read(self, path: str) -> bytes:
        """Repository file bytes. Targets are content-addressed, so they never change and are read
        once, not once per 128 KiB block; metadata changes and is read fresh."""
        if not path.startswith("targets/"):
            return (self.home.repo / path).read_bytes()
        if path not in self._targets:
            self._targets[path] = (self.home.repo / path).read_bytes()
        return self._targets[path]

    def _store(self, burst: list[ingest.Report]) -> list[tuple[str, list[int]]]:
        """State reports and telemetry of one burst, in one transaction per kind (ingest.Writer)."""
        states = [(d, m) for leaf, d, m, _ in burst if leaf == "state"]
        batches = [(d, m) for leaf, d, m, _ in burst if leaf == "telemetry"]
        with self._db_lock:
            if states:  # an empty transaction still costs a lock round
                registry.record_reports(self.db, states)
            return telemetry.ingest(self.db, batches) if batches else []

    def publish_desired(self) -> None:
        """Publish each device's desired release (retained) where it changed since last published."""
        self._publish(self._desired, registry.generation, lambda db: {
            device_id: wire.encode(release or {"release_id": None}) for device_id, release in registry.all_desired(db).items()})

    def publish_certificates(self) -> None:
        """Publish (retained) each device's newest certificate where it changed since last published."""
        self._publish(self._certs, registry.identities_generation, lambda db: {
            device_id: cert["pem"].encode() for device_id, cert in registry.latest_certificates(db).items()})

    def _publish(self, retained: _Retained, generation_of: Callable[[Any], tuple],
                 payloads_of: Callable[[Any], dict[str, bytes]]) -> None:
        """Publish `retained`'s leaf for each device whose payload changed, reading the payloads only
        when the registry's `generation_of` moved since the last time."""
        with self._db_lock:
            generation = generation_of(self.db)
            if generation == retained.generation:
                return
            payloads = payloads_of(self.db)
        for device_id, payload in payloads.items():
            if retained.sent.get(device_id) != payload:
                self.client.publish(wire.topic(device_id, retained.leaf), payload, qos=1, retain=True)
                retained.sent[device_id] = payload
        retained.generation = generation

    def _follow_identities(self) -> None:
        """Reload the broker this server runs after certificates were issued or revoked, and re-sign
        the CRL before it expires (the broker would then refuse every client)."""
        with self._db_lock:
            now = registry.identities_generation(self.db)
            revoked_ids = registry.revoked_ids(self.db)
            if ca.crl_due(self.home.pki):
                ca.write_crl(self.home.pki, registry.revoked_serials(self.db))
                log.warning("re-signed the CRL%s", "; reloading the broker" if self.broker else
                            ": give it to your broker (`edgeops fleet mosquitto-config`) and reload it")
                if self.broker is not None:
                    self.broker.refresh(restart=False)
        self._clear_revoked(revoked_ids)
        if now == self._identities:
            return
        revoked = now[2] != self._identities[2]
        self._identities = now
        if self.broker is not None:
            log.warning("certificates %s: %s the broker", "revoked" if revoked else "issued",
                        "restarting" if revoked else "reloading")
            self.broker.refresh(restart=revoked)

    def _clear_revoked(self, revoked_ids: list[str]) -> None:
        """Delete the retained messages under each revoked device's topics, once per run: a state it
        left must not be read as a re-enrolled device's, nor a `desired` or `cert` kept for it."""
        for device_id in revoked_ids:
            if device_id not in self._cleared:
                for leaf in (*wire.DEVICE_PUBLISHES, *wire.DEVICE_SUBSCRIBES):
                    self.client.publish(wire.topic(device_id, leaf), b"", qos=1, retain=True)
                for retained in (self._desired, self._certs):
                    retained.sent.pop(device_id, None)
                self._cleared.add(device_id)

    def _withdraw(self) -> None:
        """Unsign the bundles of rolled-back rollouts, so devices accept their previous release again."""
        try:
            withdrawn = withdraw_rolled_back(self.home, self.db)
        except EdgeopsError as exc:  # the targets key is offline
            if str(exc) != self._withdraw_error:
                log.warning("a rolled-back release stays signed, so its devices keep it: %s; withdraw it with "
                            "`edgeops rollout rollback ID --fleet DIR --key TARGETS_KEY`", exc)
            self._withdraw_error = str(exc)
            return
        for rollout_id, names in withdrawn.items():
            rollout.record(self.db, rollout_id, "withdraw", f"unsigned {', '.join(names)}: its devices may return "
                                                            "to their previous release")

    def _loop(self) -> None:
        """Each duty in its own round: one that fails (logged) never keeps the others from running,
        above all not revocations and certificates."""
        due = {"engine": 0.0, "refresh": 0.0, "drift": 0.0}
        duties = [("engine", ENGINE_S, self._engine_round), ("identities", ENGINE_S, self._follow_identities),
                  ("desired", 0.0, self.publish_desired), ("certificates", ENGINE_S, self.publish_certificates),
                  ("refresh", None, self._refresh_metadata)]
        if self.on_drift:
            duties.append(("drift", DRIFT_CHECK_S, self._run_drift_hooks))
        while not self._stop.is_set():
            if self.connected.is_set():
                for name, every, duty in duties:
                    if time.monotonic() < due.get(name, 0.0):
                        continue
                    try:
                        wait = duty()
                    except Exception:  # keep serving; the next round retries
                        log.exception("fleet loop error in %s", name)
                        wait = None
                    due[name] = time.monotonic() + (every if every is not None else wait or ENGINE_S)
            self._stop.wait(POLL_SECONDS)

    def _engine_round(self) -> None:
        with self._db_lock:
            rollout.tick(self.db)
            self._withdraw()

    def _refresh_metadata(self) -> float:
        """Re-sign online TUF metadata; returns the seconds until the next time."""
        with self.home.repo_lock():
            trust.refresh_online(self.home.repo, self.home.expiry())
        return self.home.expiry().timestamp.total_seconds() / 2

    def _run_drift_hooks(self) -> None:
        with self._db_lock:
            hooks.run_new(self.db, self.on_drift, self.home.path)


def serve(home_dir: Path, broker_url: str | None, http: str = DEFAULT_HTTP, on_drift: str | None = None,
          share: str | None = None, api_options: dict | None = None) -> None:
    """Run until interrupted: a private Mosquitto (fleet/broker.py) unless `broker_url` is given, the
    fleet server (running `on_drift` for each model version flagged for retraining; taking telemetry
    through the shared subscription of group `share` if given), and the operators' HTTP API on `http` (HOST:PORT)
    with `api_options` (ApiServer's TLS, allowed hosts and open reads; `plain_http`): over HTTPS with
    the fleet's own certificate (pki/api.pem, issued if missing) unless tls_cert is given or plain_http."""
    home = FleetHome.open(home_dir)
    ingest.telemetry_filter(share)  # a bad group name fails before anything starts
    api = ApiServer(home, http, **serve_options(home, api_options or {}))  # binds now: a taken port or bad certificate fails first
    broker = None
    if broker_url is None:
        broker = ManagedBroker(home).start()
        broker_url = home.broker_url
    server = FleetServer(home, broker_url, on_drift, share, broker).start()
    api.start()
    log.warning("fleet serving %s on %s; HTTP API on %s (token: api_token in %s%s)", home_dir, broker_url, api.url,
                home.path / CONFIG, f"; its certificate's CA: {home.pki / 'ca.pem'}, for --ca" if api.tls else "")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())  # a service manager's stop: shut down as on Ctrl-C
    try:
        stop.wait()
    except KeyboardInterrupt:
        pass
    finally:
        api.stop()
        server.stop()
        if broker is not None:
            broker.stop()
