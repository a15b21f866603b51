"""Shared pieces for fleet tests: fleets on their real, restartable Mosquitto secured as `edgeops
fleet serve` runs it (mutual TLS with the fleet CA, the generated ACL), releases built from the
real digits MLP for two profiles, and waiting on conditions with a deadline."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from edgeops.compiler.build import BuildRequest, build
from edgeops.fleet import ca
from edgeops.fleet.broker import ManagedBroker, free_port
from edgeops.fleet.broker import mosquitto_binary as broker_binary
from realparts import missing
from edgeops.fleet.home import FleetHome, init_fleet
from edgeops.fleet.plan import make_plan
from edgeops.protocol.errors import EdgeopsError
from edgeops.protocol.mqtt import TlsFiles

DEADLINE_S = 60
PROFILES = ("x86-vnni", "rpi4")
# For tests about delivery, not stages: all at once, never stopped by failures (they are the point).
AT_ONCE = make_plan(stages="100%", bake=0, min_calls=0, abort="failed>100%")


def wait_for(condition, what: str, timeout: float = DEADLINE_S):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def mosquitto_binary() -> str:
    try:
        return broker_binary()
    except EdgeopsError as exc:
        missing(str(exc))


ATTACKER = "_test-attacker"  # a client with every right on the broker: the tests' attacker who owns it


class FleetBroker(ManagedBroker):
    """The fleet's private Mosquitto as `fleet serve` runs it (TLS, client certificates, CRL, the
    generated ACL, persistence in the fleet's broker/ folder; stop() then start() restarts it on the
    same port with what it persisted), plus an ACL entry for ATTACKER, for the tests that play an
    attacker who owns the broker."""

    def _write(self) -> Path:
        conf = super()._write()
        with open(self.folder / "acl", "a") as fh:
            fh.write(f"\nuser {ATTACKER}\ntopic readwrite #\n")
        with open(conf, "a") as fh:
            fh.write("log_type all\n")  # the whole story in broker/mosquitto.log when a test fails
        return conf

    @property
    def url(self) -> str:
        return self.home.broker_url


def new_fleet(root: Path, lifetimes: dict[str, int] | None = None, name: str = "fleet") -> FleetHome:
    """A fleet (CA, registry, repository) whose broker URL is a free loopback port, with a
    certificate for ATTACKER in its pki/ (`attacker_tls`)."""
    mosquitto_binary()  # a missing broker fails (CI) or skips before any work
    home = init_fleet(root / name, f"mqtts://127.0.0.1:{free_port()}", lifetimes)
    ca.write_issued(ca.issue(home.pki, ATTACKER), home.pki / "attacker.pem", home.pki / "attacker.key")
    return home


def attacker_tls(home: FleetHome) -> TlsFiles:
    return home.client_tls("attacker")


def device_tls(device_dir: Path) -> TlsFiles:
    return TlsFiles(device_dir / "tls" / "ca.pem", device_dir / "tls" / "device.pem", device_dir / "tls" / "device.key")


def secured_mosquitto(home: FleetHome, conf_dir: Path | None = None, ingest_workers: int = 0) -> FleetBroker:
    """The fleet's Mosquitto, started (with certificates for `ingest_workers` ingest workers)."""
    return FleetBroker(home, "127.0.0.1", ingest_workers).start()


@pytest.fixture
def fleet_home(tmp_path):
    """A factory: `fleet_home(lifetimes=None, root=tmp_path)` makes a fleet and starts its Mosquitto;
    every broker started stops at teardown."""
    brokers: list[FleetBroker] = []

    def make(lifetimes: dict[str, int] | None = None, root: Path = tmp_path) -> FleetHome:
        home = new_fleet(root, lifetimes)
        brokers.append(secured_mosquitto(home))
        return home

    yield make
    for b in brokers:
        b.stop()


@pytest.fixture(scope="session")
def releases(digits_model, tmp_path_factory):
    """The digits MLP built for two profiles, as versions 1.0.0 and 1.1.0."""
    out = tmp_path_factory.mktemp("releases")
    built = {}
    for version in ("1.0.0", "1.1.0"):
        for profile in PROFILES:
            report = build(BuildRequest(digits_model.onnx, profile, digits_model.calib, digits_model.eval,
                                        name="digits", version=version, outdir=out))
            built[(version, profile)] = Path(report["bundle"])
    return built


