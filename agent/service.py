"""`edgeops agent run DEVICE_DIR`: follow the fleet's desired release, install it safely, report,
serve inference on the active model, and send telemetry.

For each desired release: refresh signed metadata → download the target (resumable) → verify it
against the metadata → install through the A/B slots (write, load, self-test, switch) → report.
Every outcome is reported on the device's retained `state` topic with the execution state and
reason. Invariants:
- nothing is installed unless the trust store verified it for this device's profile;
- a version older than the installed one is installed only if it is the one the device ran just
  before (state/previous.json) and the signed targets metadata no longer lists the installed one
  (the fleet withdrew it): that is how the fleet rolls an update back; any other is refused;
- any failure leaves the previous model active and serving;
- signed metadata is judged at the later of the wall clock and the time floor (agent/clock.py); a
  wall clock found wrong is logged and reported in `state.clock`, and the model keeps serving;
- a release that was rejected or failed is not retried until the fleet names a different one,
  while transient faults (fleet or broker unreachable, a full disk) are retried with backoff;
- a model the agent does not stay up on (more than `crash_loop_starts` starts in a row, none lasting
  `healthy_after_s`) is replaced by the one before it and never installed again (agent/boots.py);
- a full disk does not stop a start: what it keeps from being written (the start count, the time
  floor, state/api.json) is kept in memory, served from, and written once there is room;
- inference is served from the active slot only, and switches to a new model after its install
  completed (agent/serving.py), so apps never see a model that did not pass its self-test.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgeops.agent.boots import DEFAULT_HEALTHY_AFTER_S, DEFAULT_LIMIT, BootGuard
from edgeops.agent.metrics import DeviceMetrics
from edgeops.agent.outbox import DEFAULT_MAX_BYTES, Outbox
from edgeops.agent.partial import discard, disk_full
from edgeops.agent.serving import Limits, Serving
from edgeops.agent.slots import SlotStore, failpoint
from edgeops.agent.telemetry import Telemetry
from edgeops.agent.transport import FetchError, Link
from edgeops.agent.trust import ExpiredMetadata, TrustError, TrustStore
from edgeops.protocol.bundle import atomic_write, canonical_json, read_manifest
from edgeops.protocol.errors import EdgeopsError
from edgeops.protocol import certs
from edgeops.protocol.mqtt import KEEPALIVE_S, TlsFiles

log = logging.getLogger(__name__)
MAX_METADATA_BYTES = 4 * 1024 * 1024
RETRY_S = (1, 2, 5, 10, 30)
STOP_S = 1.5  # the longest a stop waits for each telemetry thread (they see `stop` within a second)


@dataclass(frozen=True)
class DeviceConfig:
    path: Path
    id: str
    profile: str
    broker: str
    labels: dict[str, str]
    tls: TlsFiles | None = None  # the fleet CA to pin, this device's certificate and key (device.json "tls")
    options: dict[str, Any] | None = None  # device.json "agent": outbox_bytes, metrics_interval_s, drift_window, capture,
    # keepalive_s (MQTT keepalive: a silent link to the broker is given up within twice this), ... (docs/agent.md)

    def option(self, name: str, default: Any) -> Any:
        value = (self.options or {}).get(name, default)
        kinds = (int, float) if isinstance(default, float) else type(default)
        if not isinstance(value, kinds) or isinstance(value, bool) != isinstance(default, bool):
            raise EdgeopsError(f"{self.path / 'device.json'}: agent.{name} must be a {type(default).__name__}")
        return value

    @classmethod
    def load(cls, device_dir: str | Path) -> "DeviceConfig":
        path = Path(device_dir)
        try:
            data = json.loads((path / "device.json").read_text())
            tls = data.get("tls")
            return cls(path, data["id"], data["profile"], data["broker"], data.get("labels", {}),
                       TlsFiles(path / tls["ca"], path / tls["cert"], path / tls["key"]) if tls else None,
                       data.get("agent") or {})
        except FileNotFoundError:
            raise EdgeopsError(f"{path} has no device.json; create it with `edgeops device enroll`") from None
        except (ValueError, KeyError, TypeError) as exc:
            raise EdgeopsError(f"{path / 'device.json'} is malformed ({exc}); enroll the device again") from None


class Agent:
    def __init__(self, device_dir: str | Path):
        self.config = DeviceConfig.load(device_dir)
        state = self.config.path / "state"
        self.trust = TrustStore(state / "trust")
        if not self.trust.has_root():
            self.trust.pin_root((self.config.path / "root.json").read_bytes())
        self.slots = SlotStore(state)
        self.slots.recover()
        self.boots = BootGuard(state / "boots.json", self.config.option("crash_loop_starts", DEFAULT_LIMIT))
        self.downloads = state / "downloads"
        self._desired: queue.Queue[dict[str, Any]] = queue.Queue()
        self._settled: set[tuple[Any, str]] = set()
        self._execution: dict[str, Any] | None = None  # the last execution reported, kept in later reports
        self._api_unsaved: str | None = None  # the API's address, when a full disk kept it out of api.json
        keepalive = self.config.option("keepalive_s", KEEPALIVE_S)
        if not 1 <= keepalive <= 65535:  # MQTT's two bytes; paho takes 0 as "never"
            raise EdgeopsError(f"{self.config.path / 'device.json'}: agent.keepalive_s must be 1 to 65535 seconds")
        self.link = Link(self.config.id, self.config.broker, self._desired.put, self.config.tls, keepalive,
                         self.trust.clock.floor)
        self.link.on_cert = self.renew_certificate
        outbox = Outbox(state / "outbox.db", self.config.option("outbox_bytes", DEFAULT_MAX_BYTES))
        self.telemetry = Telemetry(self.config.id, outbox, DeviceMetrics(state),
                                   float(self.config.option("metrics_interval_s", 30.0)),
                                   self.config.option("drift_window", 500), self.config.option("capture", 0),
                                   float(self.config.option("forward_linger_s", 1.0)))
        self.link.on_ack = self.telemetry.acknowledged
        defaults = Limits()
        self.serving = Serving(self.telemetry.observe, limits=Limits(
            *(self.config.option(name, getattr(defaults, name))
              for name in ("max_batch", "max_input_bytes", "max_concurrent", "allow_nonfinite"))))

    def infer(self, feed: dict[str, Any]) -> dict[str, Any]:
        """Run the active model on `feed` (input name -> array); the call is recorded for the fleet."""
        return self.serving.infer(feed)[1]

    def _serve_active(self) -> None:
        active = self.slots.active()
        try:
            self.serving.swap(active)
        except EdgeopsError as exc:  # installed and self-tested, yet it does not load now: keep what serves
            log.error("cannot serve the active model: %s", exc)
        if active is not None:
            failpoint(f"serving:{active.manifest['version']}")  # crash-loop tests: a model that kills the process

    def _guard_start(self) -> None:
        """Count this start on the active model; after too many in a row, go back to the one before."""
        active = self.slots.active()
        if active is None or not self.boots.start(active.target):
            return
        previous = self.slots.revert()
        self.boots.quarantine(active.target)
        self._previous_path.unlink(missing_ok=True)  # what preceded the model now active is unknown
        log.error("%s did not stay up for %d starts in a row: %s", active.target, self.boots.limit + 1,
                  f"back on {previous.target}" if previous else "no earlier model to go back to, serving it anyway")

    def installed(self) -> dict[str, Any] | None:
        active = self.slots.active()
        if active is None:
            return None
        m = active.manifest
        return {"model": m["name"], "version": m["version"], "target": active.target, "slot": active.slot}

    def report(self, release: Any = None, state: str | None = None, reason: str = "") -> None:
        """Publish the device's state; without `state`, the last execution reported stays in it."""
        if state:
            self._execution = {"release": release, "state": state, "reason": reason}
        execution = self._execution
        self.link.report({"online": True, "profile": self.config.profile, "installed": self.installed(),
                          "execution": execution, "clock": self.trust.clock.skew(), "cert_expires": self._cert_expires()})

    def _cert_expires(self) -> str | None:
        """When this device's certificate expires (UTC, ISO 8601), for the fleet's expiry warnings."""
        if self.config.tls is None:
            return None
        try:
            return certs.load(self.config.tls.cert.read_bytes()).not_valid_after_utc.strftime("%Y-%m-%dT%H:%M:%SZ")
        except (OSError, EdgeopsError):
            return None

    def renew_certificate(self, offered: bytes) -> None:
        """Replace this device's certificate with the one the fleet offers, if the pinned CA signed it
        for this device and key and it lasts longer (protocol/certs.py); it is used from the next connection."""
        tls = self.config.tls
        if tls is None:
            return
        try:
            current = tls.cert.read_bytes()
            if offered.strip() == current.strip():
                return
            renewed = certs.check_renewal(tls.ca.read_bytes(), current, offered)
            atomic_write(tls.cert, certs.pem(renewed))  # the certificate alone, whatever else came with it
        except (OSError, EdgeopsError) as exc:
            log.warning("refused the certificate offered on the cert topic: %s", exc)
            return
        log.warning("installed a renewed certificate, valid until %s; the next state report carries it",
                    self._cert_expires())

    def run(self, stop: threading.Event, api: str | None = None) -> None:
        """Serve until `stop` is set: connect, report, serve inference (on `api` HOST:PORT too, when
        given), send telemetry, and apply each desired release in turn."""
        from edgeops.agent.http_api import InferenceServer

        self._guard_start()
        self._serve_active()
        healthy = threading.Timer(float(self.config.option("healthy_after_s", DEFAULT_HEALTHY_AFTER_S)), self.boots.healthy)
        healthy.daemon = True
        healthy.start()
        server = InferenceServer(self.serving, api).start() if api else None
        if server is not None:
            self._publish_api(server.url)
        workers = [threading.Thread(target=self.telemetry.run_recorder, args=(stop,), name="edgeops-recorder", daemon=True),
                   threading.Thread(target=self.telemetry.run_forwarder, args=(stop, self.link), name="edgeops-forwarder",
                                    daemon=True)]
        for worker in workers:
            worker.start()
        self.link.start(stop)
        deadline = time.monotonic() + 30  # report once connected; stop stays responsive meanwhile
        while not stop.is_set() and not self.link.connected.wait(0.2) and time.monotonic() < deadline:
            pass
        self.report()
        try:
            self._follow(stop)
        finally:
            healthy.cancel()
            if server is not None:
                server.stop()
                self._api_path.unlink(missing_ok=True)
            for worker in workers:
                worker.join(timeout=STOP_S)
            self.link.stop()

    def _follow(self, stop: threading.Event) -> None:
        desired, attempt = None, 0
        while not stop.is_set():
            if self.trust.clock.tick():  # the wall clock went wrong, or right again: tell the fleet now
                self.report()
            self.boots.flush()  # what a full disk held back, now that there may be room
            if self._api_unsaved:
                self._publish_api(self._api_unsaved)
            try:
                desired = self._desired.get(timeout=0.5)
                while not self._desired.empty():  # only the newest matters
                    desired = self._desired.get_nowait()
                attempt = 0
            except queue.Empty:
                if desired is None:
                    continue
            try:
                settled = self.apply(desired)
            except Exception:  # a bug or a runtime fault (e.g. CPython gh-106905 in np.load) must not end updates
                log.exception("applying release %s failed unexpectedly; retrying", desired.get("release_id"))
                settled = False
            if settled:
                desired = None
            else:  # transient: back off, then retry the same release
                stop.wait(RETRY_S[min(attempt, len(RETRY_S) - 1)])
                attempt += 1

    def apply(self, desired: dict[str, Any]) -> bool:
        """Move towards `desired`; True when settled (installed, refused or nothing to do), False to retry."""
        release, target = desired.get("release_id"), desired.get("target")
        installed = self.installed()
        if release is None or not isinstance(target, str):
            return True
        if installed and installed["target"] == target:
            # Also the way out of a crash after the switch but before the report: say it is active,
            # and drop the download that is now installed.
            for stale in self.downloads.glob("*"):
                stale.unlink()
            self.report(release, "active")
            return True
        if (release, target) in self._settled:
            return True
        if self.boots.quarantined(target):
            self._settle(release, target, None)
            self.report(release, "failed", f"crash loop: the agent did not stay up on {target} "
                                           f"({self.boots.limit + 1} starts in a row); it went back and will not install it again")
            return True
        part = None
        try:
            self.report(release, "downloading")
            self.trust.refresh(lambda path: self.link.fetch(path, MAX_METADATA_BYTES))
            info = self.trust.target_info(target)
            part = self.downloads / f"{info.sha256}.part"
            self.link.download(f"targets/{info.sha256}.{target}", part, info.length)
            self.report(release, "verifying")
            # An older version only when it is the one this device ran just before, and the fleet's
            # targets key withdrew the active one: a signed rollback, not a replayed `desired`.
            going_back = (self._previous() or {}).get("target") == target and installed is not None \
                and not self.trust.listed(installed["target"])
            custom = self.trust.verify_target(target, part.read_bytes(), self.config.profile,
                                              installed["version"] if installed and not going_back else None)
            self._check_bundle(part, target, custom)
            self.report(release, "installing")
            self.slots.install(part, expected_sha256=info.sha256,
                               on_step=lambda step: self.report(release, step) if step == "self-test" else None)
        except ExpiredMetadata as exc:
            log.warning("not updating: %s", exc)
            self.report(release, "rejected", f"expired: {exc}")
            return False  # the fleet may refresh its metadata; keep serving and retry later
        except TrustError as exc:
            self._settle(release, target, part)
            self.report(release, "rejected", f"{exc.reason}: {exc}")
            return True
        except FetchError as exc:
            log.warning("download of %s interrupted: %s", target, exc)
            return False
        except (OSError, EdgeopsError) as exc:
            if disk_full(exc):  # transient: free what the release took, say so, keep serving, retry later
                if part is not None:
                    discard(part)
                log.error("no room for %s: %s", target, exc)
                self.report(release, "failed", f"disk-full: {exc}; retrying when there is room")
                return False
            if not isinstance(exc, EdgeopsError):
                raise
            self._settle(release, target, part)
            self.report(release, "failed", str(exc))
            return True
        discard(part)
        if installed:
            atomic_write(self._previous_path, canonical_json({"target": installed["target"], "version": installed["version"]}))
        self._serve_active()
        self.report(release, "active")
        return True

    @property
    def _api_path(self) -> Path:
        return self.config.path / "state" / "api.json"

    def _publish_api(self, url: str) -> None:
        """Tell local clients (`edgeops agent infer`) where the API is; on a full disk, log it instead
        and let _follow retry."""
        try:
            atomic_write(self._api_path, canonical_json({"url": url}))
        except OSError as exc:
            if not disk_full(exc):
                raise
            if self._api_unsaved is None:
                self._api_path.unlink(missing_ok=True)  # an earlier run's address would mislead clients
                log.warning("cannot write %s (%s): the inference API serves at %s; written once there is room",
                            self._api_path, exc, url)
            self._api_unsaved = url
            return
        self._api_unsaved = None

    @property
    def _previous_path(self) -> Path:
        return self.config.path / "state" / "previous.json"

    def _previous(self) -> dict[str, Any] | None:
        """The model this device ran before the active one, the only older one it accepts (a rollback)."""
        try:
            found = json.loads(self._previous_path.read_text())
        except (OSError, ValueError):
            return None
        return found if isinstance(found, dict) else None

    def _check_bundle(self, part: Path, target: str, custom: dict[str, Any]) -> None:
        """The bundle inside the signed bytes must be what its signed metadata claims, for this device.

        The signed custom fields are what verify_target checked; a bundle whose own manifest names
        another profile, model or version (signed by mistake or by a misused targets key) would
        otherwise be installed as if it were the claimed one.
        """
        manifest = read_manifest(part)  # the members are verified against it by the install
        if manifest["profile"] != self.config.profile:
            raise TrustError("wrong-profile", f"{target} holds a bundle built for profile {manifest['profile']!r}, "
                                              f"this device is {self.config.profile!r}")
        claimed = (custom.get("model"), custom.get("version"))
        if (manifest["name"], manifest["version"]) != claimed:
            raise TrustError("bad-metadata", f"{target} is signed as {claimed[0]} {claimed[1]} but holds "
                                             f"{manifest['name']} {manifest['version']}")

    def _settle(self, release: Any, target: str, part: Path | None) -> None:
        self._settled.add((release, target))
        if part is not None:
            discard(part)


def run_agent(device_dir: str | Path, api: str | None = None) -> None:
    """Run until interrupted (SIGINT/SIGTERM), with the inference API on `api` (HOST:PORT) if given."""
    import signal

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    Agent(device_dir).run(stop, api)
