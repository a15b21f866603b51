"""Exact drop accounting between a real outbox (agent/outbox.py) and the fleet's real ingest
(fleet/telemetry.py), both on SQLite files, with the wire format in between (protocol/wire.py):
the outbox overflows while records are in flight, the network loses, delays, reorders and replays
batches and loses acks, and once it heals received + dropped == made, exactly. Also: agents from
before the drop watermark, and outbox files from before it."""

from __future__ import annotations

import json
import random
import sqlite3
import sys
from pathlib import Path

import pytest

from edgeops.agent.outbox import RECORD_OVERHEAD, Outbox
from edgeops.fleet import registry, telemetry
from edgeops.protocol import wire

sys.path.insert(0, str(Path(__file__).parent))
from telemetrykit import certificate  # noqa: E402

DEVICE = "dev-1"
SIZE = 100  # every record made by `records()` counts exactly this many bytes against the outbox's bound


def records(n: int, start: int = 0) -> list[tuple[str, float, str]]:
    """`n` inference records of SIZE counted bytes each, their JSON bodies numbered from `start`."""
    bodies = [f'{{"i":{i}}}' for i in range(start, start + n)]
    return [("inference", float(i), body.ljust(SIZE - RECORD_OVERHEAD)) for i, body in enumerate(bodies, start)]


def fleet_db(tmp_path: Path):
    db = registry.open_db(tmp_path / "fleet.db")
    registry.enroll(db, DEVICE, "rpi4", {}, certificate(tmp_path / "pki", DEVICE))
    return db


def batch(box: Outbox, after: int, limit: int) -> tuple[bytes, list[int]]:
    """A telemetry payload of the oldest `limit` records after `after`, as the forwarder builds it."""
    pending, drops = box.pending(limit, after), box.drops()
    payload = wire.telemetry_batch(DEVICE, [(r.seq, r.kind, r.t, r.body) for r in pending],
                                   drops.total, drops.watermark, drops.unsequenced)
    return payload, [r.seq for r in pending]


def deliver(db, box: Outbox, payload: bytes, ack: bool) -> None:
    """The fleet stores the batch; the agent forgets what the fleet's ack names, unless the ack is lost."""
    [(_, seqs)] = telemetry.ingest(db, [(DEVICE, wire.parse_telemetry(payload))])
    if ack:
        box.acknowledge(seqs)


def stored(db) -> set[int]:
    return {seq for (seq,) in db.execute("select seq from telemetry where device = ?", [DEVICE])}


@pytest.mark.parametrize("seed", range(8))
def test_drops_are_counted_exactly_through_a_lossy_reordering_network(tmp_path, seed):
    rng = random.Random(seed)
    db, box = fleet_db(tmp_path), Outbox(tmp_path / "outbox.db", max_bytes=20 * SIZE)
    made, network, sent_up_to = 0, [], 0
    for step in range(300):
        if rng.random() < 0.5:  # the agent records; now and then a batch larger than the whole outbox
            n = 25 if rng.random() < 0.03 else rng.randint(1, 4)
            box.append(records(n, made))
            made += n
        if rng.random() < 0.4:  # the forwarder sends (and, as after a lost ack, sometimes again from the start)
            if rng.random() < 0.1:
                sent_up_to = 0
            payload, seqs = batch(box, sent_up_to, rng.randint(1, 6))
            if seqs:
                network.append(payload)
                sent_up_to = seqs[-1]
        if network and rng.random() < 0.4:  # a batch arrives (any of those under way), or is lost, or replayed
            payload = network.pop(rng.randrange(len(network)))
            if rng.random() < 0.8:
                deliver(db, box, payload, ack=rng.random() < 0.6)
            if rng.random() < 0.2:
                network.append(payload)
    assert box.drops().total > box.drops().unsequenced > 0, "no overflow in flight: the test proves nothing"
    rng.shuffle(network)  # the heal: what was under way arrives, late, then everything left is sent
    for payload in network:
        deliver(db, box, payload, ack=True)
    while box.count():
        deliver(db, box, batch(box, 0, 6)[0], ack=True)
    counts = telemetry.counts(db, DEVICE)
    assert counts["received"] == len(stored(db))
    assert counts["received"] + counts["dropped"] == made, (counts, made)
    # The outbox also dropped records the fleet had stored (a cumulative count alone would count them twice).
    assert box.drops().total > counts["dropped"], "nothing dropped in flight: the test proves nothing"


def test_a_late_record_lowers_dropped_and_replays_change_nothing(tmp_path):
    db, box = fleet_db(tmp_path), Outbox(tmp_path / "outbox.db", max_bytes=10 * SIZE)
    box.append(records(10))
    early, _ = batch(box, 0, 4)  # seqs 1-4 go out, then the outbox overflows before any ack
    box.append(records(6, 10))
    assert box.drops().watermark == 6 and box.drops().total == 6
    later, _ = batch(box, 0, 10)
    deliver(db, box, later, ack=True)
    assert telemetry.counts(db, DEVICE) == {"received": 10, "dropped": 6}
    deliver(db, box, early, ack=True)  # seqs 1-4 arrive after all: stored, so not lost
    assert telemetry.counts(db, DEVICE) == {"received": 14, "dropped": 2}
    for payload in (early, later, early):
        deliver(db, box, payload, ack=True)
    assert telemetry.counts(db, DEVICE) == {"received": 14, "dropped": 2}


def test_a_batch_larger_than_the_outbox_counts_its_unsequenced_records(tmp_path):
    db, box = fleet_db(tmp_path), Outbox(tmp_path / "outbox.db", max_bytes=10 * SIZE)
    box.append(records(13))  # the oldest 3 never get a seq
    assert box.drops() == type(box.drops())(total=3, watermark=0, unsequenced=3)
    deliver(db, box, batch(box, 0, 20)[0], ack=True)
    assert telemetry.counts(db, DEVICE) == {"received": 10, "dropped": 3}


def test_agents_without_the_watermark_are_counted_as_before(tmp_path):
    def legacy(seqs: list[int], dropped: int) -> bytes:
        return wire.telemetry_batch(DEVICE, [(seq, "metrics", 1.0, "{}") for seq in seqs], dropped)

    db = fleet_db(tmp_path)
    for payload in (legacy([5, 6], 4), legacy([7], 4), legacy([5, 6], 2)):
        telemetry.ingest(db, [(DEVICE, wire.parse_telemetry(payload))])
    assert telemetry.counts(db, DEVICE) == {"received": 3, "dropped": 4}
    # Upgraded: the watermark takes over, and a replayed message from before it changes nothing.
    exact = wire.telemetry_batch(DEVICE, [(8, "metrics", 1.0, "{}")], 5, watermark=4, unsequenced=0)
    for payload in (exact, legacy([7], 9)):
        telemetry.ingest(db, [(DEVICE, wire.parse_telemetry(payload))])
    assert telemetry.counts(db, DEVICE) == {"received": 4, "dropped": 4}


def test_an_outbox_from_before_the_watermark_starts_it_below_its_oldest_record(tmp_path):
    path = tmp_path / "outbox.db"
    with sqlite3.connect(path) as old:  # the schema and state an older agent left: seqs 1-5 gone, 6-7 waiting
        old.execute("create table records (seq integer primary key autoincrement, kind text not null, "
                    "t real not null, body text not null, size integer not null)")
        old.execute("create table counters (name text primary key, value integer not null)")
        old.execute("insert into counters values ('dropped', 3)")
        old.executemany("insert into records (kind, t, body, size) values ('metrics', 1, '{}', 34)", [()] * 7)
        old.execute("delete from records where seq <= 5")
    box = Outbox(path)
    assert box.drops() == type(box.drops())(total=3, watermark=5, unsequenced=0)
    assert [r.seq for r in box.pending(10)] == [6, 7]


@pytest.mark.parametrize("fields", [{"drop_watermark": 3}, {"dropped_unsequenced": 0},
                                    {"drop_watermark": -1, "dropped_unsequenced": 0},
                                    {"drop_watermark": 2**60, "dropped_unsequenced": 0},
                                    {"drop_watermark": True, "dropped_unsequenced": 0},
                                    {"drop_watermark": 1.5, "dropped_unsequenced": 0}])
def test_malformed_drop_counters_are_refused(fields):
    payload = json.dumps({"device": DEVICE, "dropped": 0, "records": [], **fields}).encode()
    with pytest.raises(wire.WireError):
        wire.parse_telemetry(payload)
