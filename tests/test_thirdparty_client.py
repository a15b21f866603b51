"""A device written by a third party from docs/protocol.md alone (tests/thirdparty/edgeops-device.c:
C, libmosquitto, cJSON, OpenSSL; no code shared with edgeops) against a real fleet on its own TLS
Mosquitto: the fleet's records must show what it did (online, telemetry counted, a malformed batch
refused, offline on a graceful stop and by its will when it dies)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from edgeops.fleet import registry, telemetry
from edgeops.fleet.home import enroll_device, push
from edgeops.fleet.server import FleetServer

sys.path.insert(0, str(Path(__file__).parent))
from fleetkit import AT_ONCE, PROFILES, fleet_home, releases, wait_for  # noqa: E402,F401  (fixtures)
from realparts import missing  # noqa: E402

SOURCE = Path(__file__).parent / "thirdparty" / "edgeops-device.c"
LIBRARIES = ("libmosquitto", "libcjson", "libcrypto")
PACKAGES = "gcc pkg-config libmosquitto-dev libcjson-dev libssl-dev"  # what .ci/run installs for it


@pytest.fixture(scope="session")
def device_program(tmp_path_factory) -> Path:
    """The third-party client, compiled (a missing compiler or library: skipped, or failed under CI=true)."""
    if not shutil.which("gcc") or not shutil.which("pkg-config"):
        missing(f"gcc and pkg-config are needed for the third-party client (apt-get install {PACKAGES})")
    flags = subprocess.run(["pkg-config", "--cflags", "--libs", *LIBRARIES], capture_output=True, text=True)
    if flags.returncode != 0:
        missing(f"the third-party client needs {', '.join(LIBRARIES)} (apt-get install {PACKAGES}): {flags.stderr.strip()}")
    program = tmp_path_factory.mktemp("thirdparty") / "edgeops-device"
    build = subprocess.run(["gcc", "-O2", "-Wall", "-Werror", "-Wno-unused-result", "-o", str(program), str(SOURCE),
                            *flags.stdout.split()], capture_output=True, text=True)
    assert build.returncode == 0, build.stderr
    return program


class Device:
    """The client running on a device folder; its stdout lines collected as they come."""

    def __init__(self, program: Path, folder: Path, *options: str):
        self.lines: list[str] = []
        self.process = subprocess.Popen([str(program), str(folder), *options], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.append(line.rstrip("\n"))

    def wait_for_line(self, prefix: str) -> str:
        def found():
            if self.process.poll() is not None and not any(line.startswith(prefix) for line in self.lines):
                self._reader.join(5)
                raise AssertionError(f"the client exited ({self.process.returncode}) before '{prefix}': "
                                     f"{self.process.stderr.read()}\n" + "\n".join(self.lines))
            return next((line for line in self.lines if line.startswith(prefix)), None)
        return wait_for(found, f"the client to print '{prefix}'")

    def finish(self, timeout: float = 30) -> None:
        self.process.stdin.write("\n")
        self.process.stdin.close()
        self.process.wait(timeout)
        self._reader.join(5)
        assert self.process.returncode == 0, self.process.stderr.read() + "\n".join(self.lines)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(10)


def _timestamp_version(home) -> int:
    return json.loads((home.repo / "metadata" / "timestamp.json").read_bytes())["signed"]["version"]


@pytest.fixture
def fleet(fleet_home, tmp_path, device_program):
    """A fleet serving on its TLS Mosquitto with one enrolled device folder, `tp-001` (rpi4), and a
    factory running the client on that folder; clients still running at teardown are killed."""
    home = fleet_home()
    enroll_device(home, "tp-001", "rpi4", {"site": "lab"}, tmp_path / "tp-001")
    server = FleetServer(home, home.broker_url).start()
    wait_for(server.connected.is_set, "the fleet server to connect")
    wait_for(lambda: _timestamp_version(home) >= 2, "the server's first metadata refresh")
    started: list[Device] = []

    def run(*options: str) -> Device:
        started.append(Device(device_program, tmp_path / "tp-001", *options))
        return started[-1]

    yield home, run
    for device in started:
        device.kill()
    server.stop()


def test_third_party_device_speaks_the_protocol(fleet):
    home, run = fleet
    device = run("--hold", "--bad-batch")
    device.wait_for_line("holding")
    out = "\n".join(device.lines)
    assert 'desired: {"release_id":null}' in out
    timestamp = (home.repo / "metadata" / "timestamp.json").read_bytes()
    assert f"fetch: metadata/timestamp.json: {len(timestamp)} bytes, as the reply header said" in out
    assert "fetch: metadata/2.root.json: not found" in out  # the pinned root is the newest
    assert f"timestamp: version {_timestamp_version(home)}," in out

    db = registry.open_db(home.db_path)
    wait_for(lambda: (registry.device(db, "tp-001") or {}).get("online"), "the fleet to see tp-001 online")
    seen = registry.device(db, "tp-001")
    assert seen["last_seen"] is not None and seen["installed_version"] is None
    summary = telemetry.device_summaries(db, "tp-001")["tp-001"]  # both batches were acknowledged: committed
    assert (summary["received"], summary["dropped"], summary["rejected_batches"], summary["inferences"]) == (1, 0, 1, 1)
    stored = list(db["telemetry"].rows_where("device = ?", ["tp-001"]))
    assert [(r["seq"], r["kind"], r["model"], r["version"]) for r in stored] == [(1, "inference", "thirdparty", "0.1.0")]
    assert registry.anomaly(db, "tp-001") is None

    device.finish()
    assert device.lines[-2] == 'state: {"device":"tp-001","online":false}'
    wait_for(lambda: registry.device(db, "tp-001")["online"] is False, "the fleet to see tp-001 offline")

    # A second run: seqs go on from the last one (never reused), the device is online again.
    again = run()
    again.finish()
    assert "telemetry: a batch with seq 3 acknowledged" in again.lines
    wait_for(lambda: telemetry.device_summaries(db, "tp-001")["tp-001"]["received"] == 2, "the second record stored")
    wait_for(lambda: registry.device(db, "tp-001")["online"] is False, "tp-001 offline after its second run")


def test_a_dead_third_party_device_is_marked_offline_by_its_will(fleet):
    home, run = fleet
    device = run("--hold")
    device.wait_for_line("holding")
    db = registry.open_db(home.db_path)
    wait_for(lambda: (registry.device(db, "tp-001") or {}).get("online"), "the fleet to see tp-001 online")
    device.kill()  # SIGKILL: no goodbye, the broker publishes the will
    wait_for(lambda: registry.device(db, "tp-001")["online"] is False, "the will to mark tp-001 offline")


def test_third_party_device_streams_its_signed_bundle(fleet, releases):
    """With a release out, `desired` names the bundle for its profile; the client finds it in the
    signed targets metadata, streams it in by bitmap and checks its signed length and sha256. It
    installs nothing and reports no execution: the fleet sees it queued, nothing else."""
    home, run = fleet
    release = push(home, [releases[("1.0.0", p)] for p in PROFILES], {"site": "lab"}, plan=AT_ONCE)
    bundle = releases[("1.0.0", "rpi4")]
    db = registry.open_db(home.db_path)
    online = run("--hold")  # the engine assigns online devices only
    online.wait_for_line("holding")
    wait_for(lambda: (registry.desired(db, "tp-001") or {}).get("release_id") == release, "the engine to assign tp-001")
    online.finish()
    device = run("--download")  # its desired is retained: it gets it on connecting
    device.finish(timeout=60)
    out = "\n".join(device.lines)
    assert f'"release_id":{release}' in out and f'"target":"{bundle.name}"' in out
    blocks = -(-bundle.stat().st_size // 131072)
    assert f"download: {bundle.name}: {bundle.stat().st_size} bytes in {blocks} blocks, sha256 as signed" in out
    rows = db.execute("select state from executions where device = ? and release_id = ?", ["tp-001", release]).fetchall()
    assert rows == [("queued",)] and registry.anomaly(db, "tp-001") is None
