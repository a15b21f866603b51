"""Clocks set far back or far forward (issue 7): expired metadata never becomes valid again, and a
device whose clock is wrong says so and keeps serving.

The floor logic (agent/clock.py) is tested first with the wall and monotonic clocks given as plain
functions, so each case names its times. Then real agent processes run under libfaketime (Debian's
`faketime` package) against a real fleet server, a secured Mosquitto and real signatures: the fake
wall clock is read from a file the test rewrites, like `date -s` on the device, while
FAKETIME_DONT_FAKE_MONOTONIC=1 leaves the monotonic clock real, as a clock step does on Linux.

libfaketime 0.9.10 with FAKETIME_DONT_FAKE_MONOTONIC=1 makes Python's `time.sleep` fail with EINVAL
(clock_nanosleep on an absolute monotonic deadline); Event/Queue/select waits work. The agent never
calls time.sleep; paho-mqtt does only between reconnection attempts, and the broker stays up here.
Without DONT_FAKE_MONOTONIC, Python's timed waits hang instead. SQLite's own clock is faked too,
but the agent does not use it (its records carry Python's time.time()).
"""

from __future__ import annotations

import json
import sys
import urllib.request
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pytest
from edgeops.agent.clock import SKEW_S, Clock, Evidence
from edgeops.fleet import registry, trust
from edgeops.fleet import server as server_module
from edgeops.fleet.home import enroll_device
from edgeops.fleet.server import FleetServer
from edgeops.protocol import wire
from edgeops.protocol.bundle import read_bundle
from tuf.api.metadata import Metadata

sys.path.insert(0, str(Path(__file__).parent))
from fleetkit import AT_ONCE, new_fleet, secured_mosquitto, wait_for
from realparts import missing
from test_fleet_faults import AgentProcess, release_bundle

DAY = 86400.0
T = datetime(2026, 11, 23, tzinfo=timezone.utc).timestamp()  # "now" in the unit tests
YEAR_2001 = datetime(2001, 1, 1, tzinfo=timezone.utc).timestamp()


class Times:
    """A wall clock the test sets, and a monotonic clock it advances."""

    def __init__(self, wall: float):
        self.wall, self.mono = wall, 1000.0

    def clock(self, path: Path) -> Clock:
        return Clock(path, wall=lambda: self.wall, monotonic=lambda: self.mono)

    def pass_(self, seconds: float) -> None:
        self.wall += seconds
        self.mono += seconds


def fresh(issued: float, lifetime: float = DAY) -> Evidence:
    """What a fleet's just-signed metadata says: timestamp signed at `issued`, targets good for 90 days."""
    return Evidence(issued=issued, timestamp_expires=issued + lifetime, earliest_expires=issued + lifetime,
                    offline_expires=issued + 90 * DAY)


# ------------------------------------------------------------------------------------- floor logic

def test_a_clock_set_back_is_judged_by_the_floor_across_restarts(tmp_path):
    times = Times(T)
    clock = times.clock(tmp_path / "clock.json")
    clock.observe(fresh(issued=T - 60))
    assert clock.skew() is None and clock.now().timestamp() == T
    times.pass_(600)
    clock.tick()  # saved every SAVE_EVERY_S while the agent runs
    times.wall = YEAR_2001  # the RTC lost power: the agent restarts in 2001
    again = times.clock(tmp_path / "clock.json")
    assert again.floor() >= T + 540  # the anchor (signed time) advanced with the monotonic clock, then was saved
    assert again.now().timestamp() == again.floor()  # expiry is judged at the floor, not in 2001
    skew = again.skew()
    assert skew["status"] == "behind" and skew["skew_s"] < -25 * 365 * DAY and "2001-01-01" in skew["reason"]


def test_metadata_seen_expired_stays_expired_when_the_clock_goes_back(tmp_path):
    times = Times(T)
    clock = times.clock(tmp_path / "clock.json")
    clock.observe(fresh(issued=T - 2 * DAY))  # the fleet stopped re-signing: expired a day ago
    assert clock.floor() == T - DAY  # the mark: the expiry the wall clock saw pass
    times.wall = YEAR_2001
    assert times.clock(tmp_path / "clock.json").now().timestamp() >= T - DAY


def test_a_clock_set_forward_moves_the_floor_at_most_to_the_metadata_expiry(tmp_path):
    times = Times(T + 5 * 365 * DAY)  # five years ahead
    clock = times.clock(tmp_path / "clock.json")
    clock.observe(fresh(issued=T - 60))
    skew = clock.skew()
    assert skew["status"] == "ahead" and skew["skew_s"] > 4 * 365 * DAY, skew
    assert clock.floor() == T - 60 + DAY  # not five years: the expiry of what it trusts
    times.wall = T + 30  # corrected: not reported as behind, though the mark is ahead of it
    clock.observe(fresh(issued=T))  # the fleet's next timestamp is valid past the mark
    assert clock.skew() is None and clock.now().timestamp() < T + DAY


def test_only_newer_signed_times_move_the_floor_and_never_past_the_offline_expiry(tmp_path):
    times = Times(T)
    clock = times.clock(tmp_path / "clock.json")
    clock.observe(fresh(issued=T + 120))  # the fleet's clock is 2 minutes ahead of ours: within SKEW_S
    assert clock.floor() == T + 120 and clock.skew() is None
    clock.observe(fresh(issued=T - DAY))  # an older timestamp (a replay) does not move it back
    assert clock.floor() == T + 120
    forged = Evidence(issued=T + 10 * 365 * DAY, timestamp_expires=T + 10 * 365 * DAY,
                      earliest_expires=T + 10 * 365 * DAY, offline_expires=T + 30 * DAY)
    clock.observe(forged)  # a stolen online key, with the device's clock right: not believed
    assert clock.floor() == T + 120
    times.wall = YEAR_2001  # with the clock shown wrong it is, but never past the offline-signed expiry
    clock.observe(forged)
    assert clock.floor() == T + 30 * DAY


def test_a_fleet_that_sends_no_signed_time_still_gets_the_mark(tmp_path):
    times = Times(T)
    clock = times.clock(tmp_path / "clock.json")
    clock.observe(Evidence(issued=None, timestamp_expires=T + DAY, earliest_expires=T + DAY, offline_expires=T + 90 * DAY))
    assert clock.floor() == T  # the wall clock, while the metadata says it is plausible
    times.pass_(3 * DAY)
    clock.tick()
    assert clock.floor() == T + DAY  # never past what it trusts


def test_an_unreadable_clock_file_is_reported_not_fatal(tmp_path, caplog):
    (tmp_path / "clock.json").write_text("{not json")
    clock = Times(T).clock(tmp_path / "clock.json")
    assert clock.floor() == 0 and clock.now().timestamp() == T
    assert "unreadable" in caplog.text
    clock.observe(fresh(issued=T - 60))
    assert json.loads((tmp_path / "clock.json").read_text())["anchor"] == T - 60


def test_skew_within_tolerance_is_not_reported(tmp_path):
    times = Times(T - SKEW_S / 2)
    clock = times.clock(tmp_path / "clock.json")
    clock.observe(fresh(issued=T))
    assert clock.skew() is None and clock.tick() is False


def test_the_fleet_signs_its_issue_time_into_the_timestamp(tmp_path):
    before = datetime.now(timezone.utc).replace(microsecond=0)
    trust.init_repository(tmp_path / "repo", trust.Expiry())
    signed = Metadata.from_bytes(trust.read_metadata(tmp_path / "repo", "timestamp.json")).signed
    issued = datetime.strptime(signed.unrecognized_fields[wire.ISSUED_FIELD], wire.ISSUED_FORMAT).replace(tzinfo=timezone.utc)
    assert before <= issued <= datetime.now(timezone.utc) and issued < signed.expires


# ------------------------------------------------------------------ real agents under libfaketime

class Frozen:
    """edgeops.fleet.trust as the server sees it, with its automatic re-signing switchable off."""

    def __init__(self):
        self.frozen = False

    def __getattr__(self, name):
        return getattr(trust, name)

    def refresh_online(self, repo, expiry) -> None:
        if not self.frozen:
            trust.refresh_online(repo, expiry)


@pytest.fixture
def rig(tmp_path, monkeypatch):
    """A fleet whose timestamp lives 4 s (re-signed every 2 s), a secured Mosquitto, the fleet server,
    and one device whose agent process reads its wall clock from `rig.set_clock(...)`."""
    libs = sorted(Path("/usr/lib").glob("*/faketime/libfaketime.so.1"))
    if not libs:
        missing("libfaketime is not installed (apt-get install faketime)")
    signing = Frozen()
    monkeypatch.setattr(server_module, "trust", signing)
    home = new_fleet(tmp_path, {"timestamp": 4})
    device_dir = tmp_path / "dev-1"
    enroll_device(home, "dev-1", "x86-vnni", {}, device_dir)
    broker = secured_mosquitto(home, tmp_path / "broker")
    server = FleetServer(home, home.broker_url)
    server.start()
    fake = tmp_path / "faketime"
    fake.write_text("+0\n")
    agents: list[AgentProcess] = []

    class Rig:
        db = registry.open_db(home.db_path)

        def __init__(self):
            self.home, self.device_dir, self.signing = home, device_dir, signing

        def set_clock(self, spec: str) -> None:
            """libfaketime's FAKETIME syntax: "+0", "+1825d", "@2001-01-01 00:00:00"."""
            fake.write_text(spec + "\n")

        def agent(self) -> AgentProcess:
            for name, value in {"LD_PRELOAD": str(libs[0]), "FAKETIME_TIMESTAMP_FILE": str(fake),
                                "FAKETIME_NO_CACHE": "1", "FAKETIME_DONT_FAKE_MONOTONIC": "1"}.items():
                monkeypatch.setenv(name, value)  # for the agent process only: AgentProcess copies os.environ
            try:
                agents.append(AgentProcess(device_dir))
            finally:
                for name in ("LD_PRELOAD", "FAKETIME_TIMESTAMP_FILE", "FAKETIME_NO_CACHE", "FAKETIME_DONT_FAKE_MONOTONIC"):
                    monkeypatch.delenv(name)
            return agents[-1]

        def sign(self, version: str, bundle: Path, lifetime: trust.Expiry | None = None) -> dict:
            """Sign `bundle` as `version`, with the fleet's lifetimes unless given; the release's target row."""
            path = release_bundle(bundle, version, tmp_path)
            manifest = read_bundle(path).manifest
            with home.repo_lock():
                target = trust.add_target(home.repo, path.name, path, {"model": manifest["name"], "version": version,
                                                                       "profile": manifest["profile"]},
                                          None, lifetime or home.expiry())
            return {"profile": "x86-vnni", "target": path.name, "sha256": target.hashes["sha256"], "length": target.length}

        def announce(self, version: str, row: dict) -> int:
            return registry.create_release(self.db, "digits", version, {}, [row], AT_ONCE)

        def release(self, version: str, bundle: Path) -> int:
            return self.announce(version, self.sign(version, bundle))

        def execution(self, release: int) -> tuple[str | None, str]:
            row = self.db.execute("select state, reason from executions where device = 'dev-1' and release_id = ?",
                                  [release]).fetchone()
            return (row[0], row[1]) if row else (None, "")

        def wait_execution(self, release: int, state: str, *words: str, agent: AgentProcess) -> str:
            def seen():
                assert agent.proc.poll() is None, f"the agent died:\n{agent.tail()}"
                found, reason = self.execution(release)
                return reason or True if found == state and all(w in reason for w in words) else None
            try:
                return wait_for(seen, f"release {release} {state} {words}")
            except AssertionError as exc:
                raise AssertionError(f"{exc}; fleet saw {self.execution(release)}\n{agent.tail()}") from None

        def device_clock(self) -> str | None:
            return registry.device(self.db, "dev-1")["clock"]

    yield Rig()
    for agent in agents:
        agent.stop()
    server.stop()
    broker.stop()


def serves(device_dir: Path, version: str) -> None:
    """The agent's HTTP API answers health and an inference with `version`."""
    url = json.loads((device_dir / "state" / "api.json").read_text())["url"]
    with urllib.request.urlopen(f"{url}/v1/health", timeout=10) as answer:
        health = json.load(answer)
    assert health["status"] == "ok" and health["version"] == version, health
    with urllib.request.urlopen(f"{url}/v1/model", timeout=10) as answer:
        (spec,) = json.load(answer)["inputs"]
    shape = [d if isinstance(d, int) else 1 for d in spec["shape"]]
    body = json.dumps({"inputs": {spec["name"]: np.zeros(shape, np.float32).tolist()}}).encode()
    request = urllib.request.Request(f"{url}/v1/infer", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as answer:
        result = json.load(answer)
    assert result["version"] == version and result["outputs"], result


def test_clock_set_far_back_after_metadata_expired(rig, digits_bundle):
    agent = rig.agent()
    v1 = rig.release("1.0.0", digits_bundle.path)
    rig.wait_execution(v1, "active", agent=agent)
    # The fleet stops re-signing; release 1.1.0 comes with a timestamp that expires before the device sees it.
    rig.signing.frozen = True
    row = rig.sign("1.1.0", digits_bundle.path)
    timestamp = rig.home.repo / "metadata" / "timestamp.json"
    wait_for(lambda: Metadata.from_bytes(timestamp.read_bytes()).signed.is_expired(), "the timestamp to expire", 10)
    v2 = rig.announce("1.1.0", row)
    rig.wait_execution(v2, "rejected", "expired", agent=agent)
    # The RTC loses power: the agent restarts with its clock in 2001, where that metadata looks valid.
    agent.stop()
    rig.set_clock("@2001-01-01 00:00:00")
    agent = rig.agent()
    reason = rig.wait_execution(v2, "rejected", "expired", "behind", agent=agent)
    assert "2001-01-01" in reason, reason
    wait_for(lambda: (rig.device_clock() or "").startswith("behind: the clock reads 2001-"), "the fleet to see the clock")
    serves(rig.device_dir, "1.0.0")
    from edgeops.fleet.rollout import attention
    assert any("wall clock behind" in a["reason"] for a in attention(rig.db, registry.devices(rig.db)))
    # Freshly signed metadata is judged at the floor, which the fleet's signed time keeps right: with
    # its clock still in 2001 the device installs 1.1.0 once the fleet signs again.
    rig.signing.frozen = False
    with rig.home.repo_lock():
        trust.refresh_online(rig.home.repo, rig.home.expiry())
    rig.wait_execution(v2, "active", agent=agent)
    serves(rig.device_dir, "1.1.0")
    assert rig.device_clock().startswith("behind")  # still wrong, still said
    rig.set_clock("+0")  # corrected
    wait_for(lambda: rig.device_clock() is None, "the fleet to see the clock right again")


def test_clock_set_far_forward_freezes_updates_until_corrected(rig, digits_bundle):
    agent = rig.agent()
    v1 = rig.release("1.0.0", digits_bundle.path)
    rig.wait_execution(v1, "active", agent=agent)
    rig.set_clock("+1825d")  # five years ahead, while it runs (a hostile NTP server)
    v2 = rig.release("1.1.0", digits_bundle.path)
    reason = rig.wait_execution(v2, "rejected", "expired", "ahead", agent=agent)
    assert "updates wait" in reason, reason
    wait_for(lambda: (rig.device_clock() or "").startswith("ahead:"), "the fleet to see the clock ahead")
    serves(rig.device_dir, "1.0.0")
    floor = json.loads((rig.device_dir / "state" / "trust" / "clock.json").read_text())
    assert floor["mark"] < datetime.now(timezone.utc).timestamp() + 3600  # five years did not reach the floor
    rig.set_clock("+0")  # corrected: the fleet's next timestamp (every 2 s) is valid past the floor
    rig.wait_execution(v2, "active", agent=agent)
    serves(rig.device_dir, "1.1.0")
    wait_for(lambda: rig.device_clock() is None, "the fleet to see the clock right again")
