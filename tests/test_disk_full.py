"""A full disk under a running agent: its state directory on a small tmpfs (tests/mounts.py), filled
to the last byte by another file, as a runaway log would. Real agent processes, a secured Mosquitto,
a fleet server, real signed releases of the digits model.

- Full during a download: the partial download is deleted (it would hold the disk full), the fleet
  sees the release `failed` with reason `disk-full: ...`, the installed model keeps serving, no new
  download starts while there is no room for it, and once the space is freed the release installs.
- Full during outbox writes: the outbox drops its oldest records, counted, instead of failing;
  records kept + dropped = records made; `PRAGMA integrity_check` passes; inference keeps answering;
  the fleet gets the dropped count once the broker is back.
In both, the agent process stays up: its start counter (state/boots.json) does not grow.
- Restarted on a full disk: the agent stays up, serves inference and reports to the fleet, while
  the start count, the time floor and api.json wait in memory; once space is freed they are written.
  In-process, on a tmpfs: a start count not on disk never rolls back, and the floor on disk stays
  the older one until there is room.
"""

from __future__ import annotations

import json
import re
import sqlite3
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
import mounts  # noqa: E402
from fleetkit import AT_ONCE, wait_for  # noqa: E402
from test_fleet_faults import DEVICE, fleet, release_bundle, wait_active  # noqa: E402,F401  (fleet: fixture)
from test_power_cut import serving  # noqa: E402
from test_telemetry_faults import configure, infer_many  # noqa: E402

from edgeops.agent.boots import BootGuard  # noqa: E402
from edgeops.agent.clock import Clock, Evidence  # noqa: E402
from edgeops.agent.partial import PartialDownload  # noqa: E402
from edgeops.fleet import registry, telemetry  # noqa: E402
from edgeops.fleet.home import push  # noqa: E402


@pytest.fixture
def small_disk(tmp_path):
    """`small_disk(where, size_kb)`: a tmpfs mounted at `where`, unmounted at the end even on failure
    (request this fixture before the ones that start processes writing to it)."""
    mounts.require()
    made: list[mounts.Mount] = []

    def make(where: Path, size_kb: int) -> mounts.Mount:
        made.append(mounts.tmpfs(where, size_kb))
        return made[-1]

    yield make
    for disk in made:
        disk.cleanup()


@pytest.fixture(scope="module")
def pixels(digits_model) -> np.ndarray:
    return np.load(digits_model.eval)["pixels"]


def starts(device_dir: Path) -> int:
    """The agent's start count on its active model (agent/boots.py; no file before a start with a
    model installed): a crash loop would raise it."""
    try:
        return json.loads((device_dir / "state" / "boots.json").read_text())["starts"]
    except FileNotFoundError:
        return 0


def execution(home, release: int) -> tuple[str, str]:
    row = registry.open_db(home.db_path).execute("select state, reason from executions where device = ? and release_id = ?",
                                                 [DEVICE, release]).fetchone()
    return (row[0], row[1]) if row else ("", "")


def deployed(small_disk, fleet, bundle: Path, tmp_path: Path, size_kb: int, **options):
    """The device's state on a tmpfs of `size_kb`, and its agent (with `options`) serving release
    1.0.0: (the tmpfs, the agent, its start count)."""
    configure(fleet.device_dir, healthy_after_s=3600.0, **options)  # the start count moves only if the agent restarts
    disk = small_disk(fleet.device_dir / "state", size_kb)
    first = push(fleet.home, [release_bundle(bundle, "1.0.0", tmp_path)], {}, plan=AT_ONCE)
    agent = fleet.agent()
    wait_active(fleet.home, first, "1.0.0", agent)
    return disk, agent, starts(fleet.device_dir)


def test_disk_full_during_a_download_is_cleaned_up_reported_and_retried(small_disk, fleet, digits_bundle, pixels, tmp_path):
    disk, agent, before = deployed(small_disk, fleet, digits_bundle.path, tmp_path, 10 * 1024)
    state = disk.where

    bundle = release_bundle(digits_bundle.path, "1.1.0", tmp_path, padding=2_000_000)
    length = bundle.stat().st_size
    fleet.spy.delay = 0.05  # the stream takes about a second: the disk fills in the middle of it
    release = push(fleet.home, [bundle], {}, plan=AT_ONCE)
    [target] = registry.releases(registry.open_db(fleet.home.db_path))[-1]["targets"]
    part = state / "downloads" / f"{target['sha256']}.part"
    wait_for(lambda: part.exists() and len(PartialDownload(part, length).have) >= 2, "the download to start")
    filler = mounts.fill(disk.where)

    wait_for(lambda: execution(fleet.home, release)[0] == "failed", "the device to report the release failed")
    assert execution(fleet.home, release)[1].startswith("disk-full: ")
    assert "No space left on device" in agent.log.read_text()  # a block write failed
    assert not part.exists() and not part.with_suffix(".have").exists()
    assert serving(fleet.device_dir, pixels[:2]) == "1.0.0"
    # It tries again, and starts no download while there is no room for one.
    wait_for(lambda: "bytes to download" in execution(fleet.home, release)[1], "the agent to try again and find no room")
    assert execution(fleet.home, release)[0] == "failed" and not part.exists()

    filler.unlink()
    wait_active(fleet.home, release, "1.1.0", agent)
    assert serving(fleet.device_dir, pixels[:2]) == "1.1.0"
    assert agent.proc.poll() is None and starts(fleet.device_dir) == before
    assert not list((state / "downloads").iterdir())


def test_disk_full_during_outbox_writes_drops_the_oldest_and_counts_them(small_disk, fleet, digits_bundle, pixels, tmp_path):
    # One metrics record per start, no drift records: what the outbox holds is one record per inference.
    disk, agent, before = deployed(small_disk, fleet, digits_bundle.path, tmp_path, 4 * 1024,
                                   metrics_interval_s=3600.0, drift_window=10**6)
    state = disk.where
    fleet_db = registry.open_db(fleet.home.db_path)
    outbox = sqlite3.connect(state / "outbox.db", isolation_level=None)
    try:
        count = lambda: outbox.execute("select count(*) from records").fetchone()[0]  # noqa: E731
        dropped = lambda: outbox.execute("select value from counters where name = 'dropped'").fetchone()[0]  # noqa: E731
        wait_for(lambda: fleet_db.execute("select count(*) from telemetry").fetchone()[0] == 1 and count() == 0,
                 "the start-up metrics record to reach the fleet")
        fleet.broker.stop()  # from here on every record stays in the outbox, or is dropped

        made = infer_many(fleet.device_dir, 100, 64, pixels)
        wait_for(lambda: count() == made, "the agent to record the first inferences")
        filler = mounts.fill(disk.where)

        def more() -> bool:
            nonlocal made
            made += infer_many(fleet.device_dir, 50, 64, pixels)  # each call is answered
            return dropped() > 0

        wait_for(more, "the outbox to drop records for want of space")
        wait_for(lambda: count() + dropped() == made, f"the agent to account for all {made} records")
        assert outbox.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        seqs = [seq for (seq,) in outbox.execute("select seq from records order by seq")]
        assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))  # the newest are kept, the oldest went
        assert serving(fleet.device_dir, pixels[:2]) == "1.0.0"
        made += 1
        assert agent.proc.poll() is None and starts(fleet.device_dir) == before

        filler.unlink()
        fleet.broker.start()
        wait_for(lambda: count() == 0, "the outbox to reach the fleet")
        counts = telemetry.counts(fleet_db, DEVICE)
        assert counts["dropped"] == dropped() > 0
        assert counts["received"] + counts["dropped"] == made + 1  # and the start-up metrics record
    finally:
        outbox.close()


def up(agent, condition):
    """`condition`, failing at once should the agent exit (a full disk must not stop it)."""
    def check():
        assert agent.proc.poll() is None, f"the agent exited:\n{agent.tail()}"
        return condition()
    return check


def test_start_count_and_time_floor_wait_in_memory_for_room(small_disk, tmp_path):
    disk = small_disk(tmp_path / "state", 64)
    guard = BootGuard(disk.where / "boots.json", limit=1)
    guard.start("m")  # one start on disk: the next one is one too many
    wall = [1_000_000.0]
    clock = Clock(disk.where / "clock.json", wall=lambda: wall[0])
    clock.observe(Evidence(issued=wall[0], timestamp_expires=wall[0] + 600, earliest_expires=wall[0] + 600,
                           offline_expires=wall[0] + 10**6))
    saved = wall[0]  # the floor clock.json holds
    filler = mounts.fill(disk.where)

    # A start that is not on disk never rolls back: going back would need the disk too.
    assert guard.start("m") is False
    assert json.loads((disk.where / "boots.json").read_text())["starts"] == 1
    wall[0] += 3600  # an hour on, a fresher timestamp: the floor moves on in memory only
    clock.observe(Evidence(issued=wall[0], timestamp_expires=wall[0] + 600, earliest_expires=wall[0] + 600,
                           offline_expires=wall[0] + 10**6))
    assert clock.floor() >= saved + 3600
    assert saved <= Clock(disk.where / "clock.json").floor() < saved + 3600  # a restart now: the older floor

    filler.unlink()
    guard.flush()
    clock.tick()
    assert json.loads((disk.where / "boots.json").read_text())["starts"] == 2
    assert Clock(disk.where / "clock.json").floor() >= saved + 3600


def test_an_agent_restarted_on_a_full_disk_stays_up_serves_reports_and_catches_up(small_disk, fleet, digits_bundle,
                                                                                   pixels, tmp_path):
    disk, agent, before = deployed(small_disk, fleet, digits_bundle.path, tmp_path, 4 * 1024)
    state = disk.where
    db = registry.open_db(fleet.home.db_path)
    agent.stop()
    seen = registry.device(db, DEVICE)["last_seen"]
    # The disk filled up while the agent ran: the outbox gave back its reserve, and that went too.
    (state / "outbox.db-reserve").unlink()
    filler = mounts.fill(disk.where)

    agent = fleet.agent()  # restarted, as a supervisor would, on a disk without a free byte
    url = wait_for(up(agent, lambda: re.search(r"the inference API serves at (\S+);", agent.log.read_text())),
                   "the agent to serve its API without state/api.json")[1]
    lookup = tmp_path / "lookup"  # what `edgeops agent infer` would read had the agent found room for it
    (lookup / "state").mkdir(parents=True)
    (lookup / "state" / "api.json").write_text(json.dumps({"url": url}))
    assert serving(lookup, pixels[:2]) == "1.0.0"
    wait_for(up(agent, lambda: registry.device(db, DEVICE)["last_seen"] > seen), "the restarted agent to report to the fleet")
    assert registry.device(db, DEVICE)["installed_version"] == "1.0.0"
    assert agent.proc.poll() is None, agent.tail()
    assert starts(fleet.device_dir) == before and not (state / "api.json").exists()

    filler.unlink()
    wait_for(up(agent, lambda: starts(fleet.device_dir) == before + 1), "the agent to write the start it counted in memory")
    wait_for(up(agent, lambda: serving(fleet.device_dir, pixels[:2]) == "1.0.0"), "the agent to write state/api.json")
    log = agent.log.read_text().split("--- agent start")[-1]
    assert "No space left on device" in log and "Traceback" not in log
    assert agent.proc.poll() is None
