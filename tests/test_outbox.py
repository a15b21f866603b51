"""The agent's outbox (agent/outbox.py) on real SQLite files: sequence numbers, the byte bound and its
drop counter, batching for the forwarder, acknowledgement, bounded file size under churn, a corrupt
file, and a process killed with SIGKILL in the middle of appending."""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from edgeops.agent.outbox import RECORD_OVERHEAD, Outbox
from edgeops.protocol.errors import EdgeopsError

sys.path.insert(0, str(Path(__file__).parent))
from fleetkit import wait_for  # noqa: E402

SIZE = 100  # every record made by `records()` counts exactly this many bytes against the bound


def records(n: int, start: int = 0, kind: str = "inference") -> list[tuple[str, float, str]]:
    """`n` records of exactly SIZE counted bytes, bodies numbered from `start`."""
    out = []
    for i in range(start, start + n):
        body = f'{{"i":{i:012d}}}'
        out.append((kind, float(i), body + " " * (SIZE - RECORD_OVERHEAD - len(body))))
    return out


def numbers(box: Outbox) -> list[int]:
    """The body numbers of every stored record, in seq order."""
    return [int(r.body.strip()[5:-1]) for r in box.pending(10**9)]


def stored_in_file(path: Path) -> int:
    """The bytes the records in the file count for, read without the Outbox object."""
    with sqlite3.connect(path) as db:
        return db.execute("select coalesce(sum(size), 0) from records").fetchone()[0]


def test_seq_strictly_increases_and_is_never_reused(tmp_path):
    path = tmp_path / "outbox.db"
    box = Outbox(path)
    box.append(records(10))
    first = [r.seq for r in box.pending(100)]
    assert first == sorted(first) and len(set(first)) == 10
    box.acknowledge(first)  # everything, the highest seq included: a plain rowid would hand it out again
    assert box.count() == 0
    box.append(records(3, 10))
    second = [r.seq for r in box.pending(100)]
    assert min(second) > max(first)
    box.acknowledge(second)
    box.close()

    box = Outbox(path)  # after a restart too
    box.append(records(5, 13))
    third = [r.seq for r in box.pending(100)]
    assert min(third) > max(second) and third == sorted(third) and len(set(third)) == 5
    assert numbers(box) == list(range(13, 18))
    box.close()


def test_full_outbox_drops_exactly_the_oldest_and_counts_them(tmp_path):
    path = tmp_path / "outbox.db"
    box = Outbox(path, max_bytes=10 * SIZE + 50)  # room for 10 records, not 11
    assert box.append(records(10)) == 0
    assert box.stored_bytes() == 10 * SIZE and box.dropped() == 0

    assert box.append(records(3, 10)) == 3
    assert numbers(box) == list(range(3, 13))
    assert box.dropped() == 3 and box.stored_bytes() == 10 * SIZE

    assert box.append(records(1, 13)) == 1
    assert numbers(box) == list(range(4, 14))
    assert box.dropped() == 4
    box.close()

    box = Outbox(path, max_bytes=10 * SIZE + 50)
    assert box.dropped() == 4, "the drop counter must survive a restart"
    assert box.stored_bytes() == 10 * SIZE == stored_in_file(path)
    assert box.append(records(2, 14)) == 2
    assert numbers(box) == list(range(6, 16)) and box.dropped() == 6
    box.close()


def test_bound_holds_for_any_mix_of_sizes_and_acks(tmp_path):
    """Random bodies, appends and acks: the stored bytes never exceed the bound, each drop is of the
    fewest oldest records, and made == stored + acknowledged + dropped, exactly."""
    rng = random.Random(7)
    path = tmp_path / "outbox.db"
    bound = 8000
    box = Outbox(path, max_bytes=bound)
    made = acked = 0
    for _ in range(300):
        batch = [("metrics", 0.0, "x" * rng.randint(1, 900)) for _ in range(rng.randint(1, 3))]
        before = box.pending(10**9)
        dropped = box.append(batch)
        made += len(batch)
        after = box.pending(10**9)
        assert box.stored_bytes() <= bound
        # Exactly the `dropped` oldest went, and dropping one fewer would not have made room.
        assert [r.seq for r in after[: len(after) - len(batch)]] == [r.seq for r in before[dropped:]]
        if dropped:
            kept = sum(len(r.body) + RECORD_OVERHEAD for r in after)
            assert kept + len(before[dropped - 1].body) + RECORD_OVERHEAD > bound
        if rng.random() < 0.3 and after:
            chosen = rng.sample([r.seq for r in after], rng.randint(1, len(after)))
            box.acknowledge(chosen)
            acked += len(chosen)
        assert made == box.count() + acked + box.dropped()
        assert box.stored_bytes() == stored_in_file(path)
    assert box.dropped() > 0, "the bound was never reached: the test proves nothing"
    box.close()


def test_a_record_larger_than_the_whole_outbox_is_dropped_and_counted(tmp_path):
    box = Outbox(tmp_path / "outbox.db", max_bytes=1024)
    box.append(records(3))
    assert box.append([("sample", 0.0, "x" * 1024)]) == 1
    assert numbers(box) == [0, 1, 2] and box.dropped() == 1 and box.stored_bytes() == 3 * SIZE
    box.close()


def test_one_batch_larger_than_the_bound_keeps_only_its_newest_records(tmp_path):
    box = Outbox(tmp_path / "outbox.db", max_bytes=10 * SIZE)
    box.append(records(5))
    dropped = box.append(records(20, 5))
    assert box.stored_bytes() <= 10 * SIZE
    assert numbers(box) == list(range(15, 25))
    assert dropped == box.dropped() == 15
    box.close()


def test_pending_respects_its_limits_and_returns_at_least_one(tmp_path):
    box = Outbox(tmp_path / "outbox.db")
    box.append(records(20))
    seqs = [r.seq for r in box.pending(100)]
    assert len(seqs) == 20

    assert [r.seq for r in box.pending(5)] == seqs[:5]
    assert [r.seq for r in box.pending(5, after=seqs[3])] == seqs[4:9]
    assert [r.seq for r in box.pending(100, max_bytes=3 * SIZE + 50)] == seqs[:3]
    assert [r.seq for r in box.pending(100, after=seqs[10], max_bytes=3 * SIZE)] == seqs[11:14]
    assert [r.seq for r in box.pending(100, max_bytes=1)] == seqs[:1]  # never stuck behind a big record
    assert [r.seq for r in box.pending(2, max_bytes=10**6)] == seqs[:2]
    assert box.pending(100, after=seqs[-1]) == []
    first = box.pending(1)[0]
    assert (first.kind, first.t, first.body) == records(1)[0]
    box.close()


def test_acknowledge_removes_only_those_seqs(tmp_path):
    path = tmp_path / "outbox.db"
    box = Outbox(path)
    box.append(records(1200))
    seqs = [r.seq for r in box.pending(10**9)]
    gone = set(random.Random(3).sample(seqs, 1100))  # more than one chunk of bound parameters
    box.acknowledge(sorted(gone))
    assert [r.seq for r in box.pending(10**9)] == [s for s in seqs if s not in gone]
    assert box.stored_bytes() == 100 * SIZE == stored_in_file(path)

    box.acknowledge(sorted(gone)[:10] + [max(seqs) + 1000])  # already gone, or never existed: no effect
    assert box.count() == 100 and box.stored_bytes() == 100 * SIZE
    assert box.dropped() == 0
    box.close()
    assert Outbox(path).stored_bytes() == 100 * SIZE


def files_size(path: Path) -> int:
    return sum(p.stat().st_size for p in (path, Path(f"{path}-wal")) if p.exists())


def test_file_stays_flat_under_churn(tmp_path):
    """Months of append/forward/ack at the bound must not grow the file: freed pages are reused."""
    path = tmp_path / "outbox.db"
    bound = 256 * 1024
    box = Outbox(path, max_bytes=bound)
    made = 0

    def churn(rounds: int) -> None:
        nonlocal made
        for _ in range(rounds):
            box.append(records(200, made))  # past the bound: the oldest are dropped
            made += 200
            box.acknowledge([r.seq for r in box.pending(100)])  # the forwarder takes half

    churn(100)  # to the high-water mark of the database and of its WAL (checkpointed every 1000 pages)
    assert box.dropped() > 0
    warm_db, warm_total = path.stat().st_size, files_size(path)
    churn(300)  # three times as many records again
    assert box.stored_bytes() <= bound
    assert path.stat().st_size <= warm_db * 1.25 + 64 * 1024, (warm_db, path.stat().st_size)
    assert files_size(path) <= warm_total * 1.1 + 256 * 1024, (warm_total, files_size(path))
    assert path.stat().st_size < 16 * bound  # and the database is a small multiple of what it holds
    box.close()


@pytest.mark.parametrize("content", [b"this is not a database" * 200, b"SQLite format 3\x00" + bytes(range(256)) * 16])
def test_corrupt_outbox_is_one_line_error(tmp_path, content):
    path = tmp_path / "outbox.db"
    path.write_bytes(content)
    with pytest.raises(EdgeopsError) as error:
        Outbox(path)
    message = str(error.value)
    assert "\n" not in message and str(path) in message and "move it aside" in message


def test_too_small_bound_is_refused(tmp_path):
    with pytest.raises(EdgeopsError, match="the outbox needs at least"):
        Outbox(tmp_path / "outbox.db", max_bytes=100)


# A writer that appends numbered batches of 100 same-size records to a bounded outbox (room for
# exactly 5 batches, so the bound drops whole batches), printing each batch number once `append`
# returned. Every batch it printed must survive a SIGKILL.
WRITER = r"""
import sys
from edgeops.agent.outbox import RECORD_OVERHEAD, Outbox

path, start = sys.argv[1], int(sys.argv[2])
size = 64
box = Outbox(path, max_bytes=5 * 100 * size)
batch = start
while True:
    rows = []
    for n in range(100):
        body = '{"batch":"%08d","n":"%03d"}' % (batch, n)
        rows.append(("inference", float(batch), body + " " * (size - RECORD_OVERHEAD - len(body))))
    box.append(rows)
    print(batch, flush=True)
    batch += 1
"""


def test_kill_mid_append_leaves_only_whole_batches(tmp_path):
    path = tmp_path / "outbox.db"
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    start, last_seq = 0, 0
    for round_ in range(4):
        out = tmp_path / f"writer-{round_}.out"
        with open(out, "w") as fh:
            proc = subprocess.Popen([sys.executable, str(script), str(path), str(start)], stdout=fh,
                                    stderr=subprocess.STDOUT)
        try:
            wait_for(lambda out=out, proc=proc: len(out.read_text().splitlines()) >= 20 or proc.poll() is not None,
                     "the writer to append 20 batches", 60)
            assert proc.poll() is None, out.read_text()[-2000:]
            os.kill(proc.pid, signal.SIGKILL)
            assert proc.wait(10) == -signal.SIGKILL
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        printed = [int(line) for line in out.read_text().split()]

        box = Outbox(path, max_bytes=5 * 100 * 64)
        stored = box.pending(10**9)
        batches: dict[int, list[int]] = {}
        for record in stored:
            batches.setdefault(int(record.body[10:18]), []).append(int(record.body[25:28]))
        assert batches, "nothing survived"
        assert all(ns == list(range(100)) for ns in batches.values()), {b: len(ns) for b, ns in batches.items()}
        newest = max(batches)
        assert printed[-1] <= newest <= printed[-1] + 1  # every returned append is there; at most one more
        assert sorted(batches) == list(range(newest - 4, newest + 1))  # the 5 newest batches fit, no gap
        assert box.count() + box.dropped() == 100 * (newest + 1)  # the drop counter committed with them
        assert box.stored_bytes() <= box.max_bytes
        seqs = [r.seq for r in stored]
        assert seqs == sorted(seqs) and seqs[0] > last_seq  # a restarted writer never reuses a seq
        last_seq = seqs[-1]
        box.close()
        start = newest + 1
