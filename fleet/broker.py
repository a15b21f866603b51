"""The broker `edgeops fleet serve` runs when no `--broker` is given: a private Mosquitto, configured
by fleet/mosquitto.py (mutual TLS with the fleet CA, per-device ACL, CRL) in the fleet's `broker/`
folder, with persistence there.

Mosquitto replaced the embedded amqtt broker, which could not be made as strict: amqtt delivered
every retained message on the broker to any new subscription, granted a device's subscription to
another device's topics, and ignored persistent sessions (docs/security.md).

Invariants:
- The broker runs only while `fleet serve` does, as the same user; one a killed server left running
  is stopped by the next start, found by its pid file. A port something else holds fails the start.
- start, stop and refresh are serialized. `refresh()` rewrites the files from the registry and the
  CA and reloads them (SIGHUP: new CRL and ACL), or restarts the broker when a device was revoked,
  so the revoked device's open connection is closed too (every other client reconnects to its
  persisted session).
"""

from __future__ import annotations

import getpass
import logging
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

from edgeops.fleet import mosquitto
from edgeops.protocol import mqtt as mqttlib
from edgeops.protocol.errors import EdgeopsError

if TYPE_CHECKING:
    from edgeops.fleet.home import FleetHome

log = logging.getLogger(__name__)
START_TIMEOUT_S = 10.0


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free right now on `host`, for a broker or server started just after."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def mosquitto_binary() -> str:
    """The path of the `mosquitto` program (EDGEOPS_MOSQUITTO, else found on PATH or where packages
    put it); a one-line instruction if it is not installed."""
    if "EDGEOPS_MOSQUITTO" in os.environ:
        found = shutil.which(os.environ["EDGEOPS_MOSQUITTO"])
    else:
        found = shutil.which("mosquitto") or next((p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto",
                                                              "/opt/homebrew/sbin/mosquitto") if Path(p).exists()), None)
    if found is None:
        raise EdgeopsError("Mosquitto is not installed: `apt-get install mosquitto` (Debian, Ubuntu) or "
                           "`brew install mosquitto`, or give `--broker mqtts://HOST:PORT` of a broker you run")
    return found


class ManagedBroker:
    """A private Mosquitto for one fleet, listening where the fleet's broker URL says."""

    def __init__(self, home: FleetHome, bind: str | None = None, ingest_workers: int = 0):
        self.home, self.ingest_workers = home, ingest_workers
        address = mqttlib.BrokerAddress.parse(home.broker_url)
        self.port = address.port
        self.bind = bind or address.host
        self.folder = home.path / "broker"
        self.log_path = self.folder / "mosquitto.log"
        self.proc: subprocess.Popen | None = None
        self._lock = threading.RLock()  # the server's refresh and a caller's stop never interleave

    def _write(self) -> Path:
        extra = ["persistence true", f"persistence_location {self.folder.resolve()}/",
                 f"log_dest file {self.log_path.resolve()}", "log_type error", "log_type warning", "log_type notice",
                 f"pid_file {(self.folder / 'mosquitto.pid').resolve()}",
                 f"user {getpass.getuser()}"]  # Mosquitto started as root would otherwise switch to user mosquitto
        return mosquitto.write_config(self.home, self.folder, self.bind, self.ingest_workers, extra)["conf"]

    def start(self) -> "ManagedBroker":
        with self._lock:
            return self._start()

    def _start(self) -> "ManagedBroker":
        binary = mosquitto_binary()
        conf = self._write()
        _stop_leftover(self.folder / "mosquitto.pid")
        if _listening(self.bind, self.port):
            raise EdgeopsError(f"{self.bind}:{self.port} is taken (another `fleet serve` of this fleet, or another "
                               "broker?): stop it, or give this fleet's broker URL another port")
        self.proc = subprocess.Popen([binary, "-c", str(conf)], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + START_TIMEOUT_S
        while not _listening(self.bind, self.port):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise EdgeopsError(f"Mosquitto did not start on {self.bind}:{self.port}: {self._log_tail()}")
            time.sleep(0.05)
        log.info("Mosquitto %d listening on %s:%d (TLS, client certificates)", self.proc.pid, self.bind, self.port)
        return self

    def refresh(self, restart: bool) -> None:
        """Rewrite the files and reload them; restart instead when a connection must be closed."""
        with self._lock:
            if restart:
                self.stop()
                self.start()
                return
            self._write()
            if self.proc is not None and self.proc.poll() is None:
                os.kill(self.proc.pid, signal.SIGHUP)

    def stop(self) -> None:
        with self._lock:
            self._stop()

    def _stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()  # Mosquitto saves its persistence file on SIGTERM
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def _log_tail(self) -> str:
        try:
            return " ".join(self.log_path.read_text().splitlines()[-3:]) or "no log"
        except OSError:
            return "no log"


def _stop_leftover(pid_file: Path) -> None:
    """Stop the Mosquitto a killed `fleet serve` left running on this fleet's folder (an orphan), if any."""
    try:
        pid = int(pid_file.read_text().strip())
        orphaned = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1] == "1"  # its server is gone
        if b"mosquitto" not in Path(f"/proc/{pid}/cmdline").read_bytes() or not orphaned:
            return  # another process now, or the broker of a `fleet serve` still running: not ours to stop
        os.kill(pid, signal.SIGTERM)
    except (OSError, ValueError):
        return
    deadline = time.monotonic() + START_TIMEOUT_S
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    log.warning("stopped the broker (pid %d) a previous `fleet serve` left running", pid)


def _listening(host: str, port: int) -> bool:
    try:
        socket.create_connection((host if host not in ("0.0.0.0", "::") else "127.0.0.1", port), timeout=0.2).close()
        return True
    except OSError:
        return False
