"""Shared pieces for fleet tests: real brokers (Mosquitto and the embedded amqtt), releases built
from the real digits MLP for two profiles, and waiting on conditions with a deadline."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

from edgeops.compiler.build import BuildRequest, build
from edgeops.fleet.broker import EmbeddedBroker

DEADLINE_S = 60
PROFILES = ("x86-vnni", "rpi4")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(condition, what: str, timeout: float = DEADLINE_S):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def mosquitto_broker(tmp_path: Path):
    binary = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None)
    if binary is None:
        if os.environ.get("CI") == "true":
            pytest.fail("mosquitto is not installed (CI installs it with apt-get)")
        pytest.skip("mosquitto is not installed")
    port = free_port()
    conf = tmp_path / "mosquitto.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n")
    proc = subprocess.Popen([binary, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(lambda: _listening(port), "mosquitto to listen", 10)
    return f"mqtt://127.0.0.1:{port}", proc.terminate


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


