"""Shared pieces for fleet tests: real brokers (Mosquitto and the embedded amqtt), a restartable
Mosquitto secured with the files `edgeops fleet mosquitto-config` writes, releases built from the
real digits MLP for two profiles, and waiting on conditions with a deadline."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

from edgeops.compiler.build import BuildRequest, build
from edgeops.fleet.broker import EmbeddedBroker, free_port
from realparts import missing
from edgeops.fleet.home import FleetHome
from edgeops.fleet.plan import make_plan
from edgeops.fleet.mosquitto import write_config
from edgeops.protocol.mqtt import BrokerAddress

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
    binary = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None)
    if binary is None:
        missing("mosquitto is not installed (apt-get install mosquitto)")
    return binary


def mosquitto_broker(tmp_path: Path):
    binary = mosquitto_binary()
    port = free_port()
    conf = tmp_path / "mosquitto.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\nset_tcp_nodelay true\n")
    proc = subprocess.Popen([binary, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(lambda: _listening(port), "mosquitto to listen", 10)
    return f"mqtt://127.0.0.1:{port}", proc.terminate


class Mosquitto:
    """A real Mosquitto run from a config file on a fixed port; `stop()` then `start()` restarts it on
    the same port, with whatever it persisted (a SIGTERM'd Mosquitto saves its persistence file)."""

    def __init__(self, conf: Path, port: int):
        self.conf, self.port, self.log = conf, port, conf.with_suffix(".log")
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def start(self) -> "Mosquitto":
        with open(self.log, "a") as log:
            self.proc = subprocess.Popen([mosquitto_binary(), "-c", str(self.conf)], stdout=log, stderr=log)
        wait_for(lambda: _listening(self.port) or self.proc.poll() is not None, "mosquitto to listen", 10)
        assert self.proc.poll() is None, f"mosquitto exited: {self.log.read_text()[-2000:]}"
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)


def secured_mosquitto(home: FleetHome, conf_dir: Path, ingest_workers: int = 0) -> Mosquitto:
    """Mosquitto on the fleet's broker port with the generated passwd/acl/config (with logins for
    `ingest_workers` ingest workers), plus persistence.

    Run again (write the files, then restart) after enrolling more devices."""
    files = write_config(home, conf_dir, "127.0.0.1", ingest_workers)
    extra = ["persistence true", f"persistence_location {files['conf'].parent}/", f"log_dest file {conf_dir / 'broker.log'}",
             "log_type all"]
    if os.geteuid() == 0:  # as root Mosquitto switches to user `mosquitto`, who cannot read the 0600 passwd
        extra.append("user root")
    with open(files["conf"], "a") as fh:
        fh.write("\n".join(extra) + "\n")
    return Mosquitto(files["conf"], BrokerAddress.parse(home.config["broker"]).port).start()


def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
        return True
    except OSError:
        return False


@pytest.fixture(params=["mosquitto", "amqtt"])
def broker(request, tmp_path):
    if request.param == "mosquitto":
        url, stop = mosquitto_broker(tmp_path)
    else:
        embedded = EmbeddedBroker("127.0.0.1", free_port()).start()
        url, stop = embedded.url, embedded.stop
    yield url
    stop()


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


