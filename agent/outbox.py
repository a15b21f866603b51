"""The agent's outbox: every record the fleet should get (inference results, device metrics, drift
windows, captured samples) waits here, in SQLite, until the fleet has acknowledged storing it.

Durability: WAL with `synchronous=FULL`, and records are appended in group commits (`append`
takes a batch; the agent's recorder commits at least every 50 ms). A record is durable once the
`append` that carried it returned: a kill -9 or a power cut loses nothing appended, only records
still waiting in the recorder's memory (at most ~50 ms of them). `synchronous=NORMAL` was measured
to lose every commit since the last checkpoint in a simulated power cut (field notes); FULL lost none.

Invariants:
- `seq` strictly increases and is never reused, even after deletes and restarts (AUTOINCREMENT), so
  (device, seq) names one record forever and the fleet can ingest idempotently;
- the records' stored size (sum of `size`) never exceeds `max_bytes`: an append that would cross it
  deletes the oldest records first, in the same transaction, and adds their number to the
  persistent `dropped` counter, which is reported to the fleet so every drop is accounted for;
- a record leaves only through `acknowledge` (once the fleet acknowledged storing it) or the bound above;
- no VACUUM: deleted pages are reused by later inserts, so the file stays at its high-water mark
  instead of shrinking and growing again;
- one Outbox object per file: it keeps the stored size in memory (read once at open).
"""

from __future__ import annotations

import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path

from edgeops.protocol.errors import EdgeopsError

RECORD_OVERHEAD = 32  # bytes counted per record on top of its body: seq, kind, time and row overhead
DEFAULT_MAX_BYTES = 16 * 1024 * 1024


@dataclass(frozen=True)
class Record:
    seq: int
    kind: str
    t: float
    body: str  # JSON


class Outbox:
    def __init__(self, path: str | Path, max_bytes: int = DEFAULT_MAX_BYTES):
        if max_bytes < 512:
            raise EdgeopsError(f"the outbox needs at least 512 bytes, not {max_bytes}")
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        try:
            self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("create table if not exists records (seq integer primary key autoincrement, "
                             "kind text not null, t real not null, body text not null, size integer not null)")
            self._db.execute("create table if not exists counters (name text primary key, value integer not null)")
            self._db.execute("insert or ignore into counters values ('dropped', 0)")
            self._bytes = self._db.execute("select coalesce(sum(size), 0) from records").fetchone()[0]
        except sqlite3.DatabaseError as exc:
            raise EdgeopsError(f"the outbox {path} is unusable ({exc}); move it aside and restart the agent") from None

    def append(self, records: list[tuple[str, float, str]]) -> int:
        """Store (kind, time, JSON body) records in one transaction; returns how many old ones were dropped."""
        sized = [(kind, t, body, len(body) + RECORD_OVERHEAD) for kind, t, body in records]
        incoming = sum(r[3] for r in sized)
        while sized and incoming > self.max_bytes:  # a batch larger than the whole outbox keeps its newest
            incoming -= sized.pop(0)[3]
        dropped = len(records) - len(sized)
        with self._lock:
            freed = 0
            with self._transaction():
                excess = self._bytes + incoming - self.max_bytes
                if excess > 0:
                    count, freed = self._drop_oldest(excess)
                    dropped += count
                self._db.executemany("insert into records (kind, t, body, size) values (?, ?, ?, ?)", sized)
                if dropped:
                    self._db.execute("update counters set value = value + ? where name = 'dropped'", [dropped])
            self._bytes += incoming - freed
        return dropped

    def _drop_oldest(self, excess: int) -> tuple[int, int]:
        """Delete the fewest oldest records that free `excess` bytes: (records, bytes) freed."""
        freed, last, count = 0, None, 0
        for seq, size in self._db.execute("select seq, size from records order by seq"):
            freed, last, count = freed + size, seq, count + 1
            if freed >= excess:
                break
        if last is not None:
            self._db.execute("delete from records where seq <= ?", [last])
        return count, freed

    def pending(self, limit: int, after: int = 0, max_bytes: int | None = None) -> list[Record]:
        """The oldest records with seq > `after`: at most `limit`, and at most `max_bytes` of bodies
        (but always at least one, so a big record cannot block the queue)."""
        with self._lock:
            rows = self._db.execute("select seq, kind, t, body from records where seq > ? order by seq limit ?",
                                    [after, limit]).fetchall()
        batch, total = [], 0
        for row in rows:
            total += len(row[3]) + RECORD_OVERHEAD
            if batch and max_bytes is not None and total > max_bytes:
                break
            batch.append(Record(*row))
        return batch

    def acknowledge(self, seqs: list[int]) -> None:
        """Forget records the broker has acknowledged."""
        with self._lock:
            freed = 0
            with self._transaction():
                for start in range(0, len(seqs), 500):  # within SQLite's limit on bound parameters
                    chunk = seqs[start : start + 500]
                    marks = ",".join("?" * len(chunk))
                    freed += self._db.execute(f"select coalesce(sum(size), 0) from records where seq in ({marks})",
                                              chunk).fetchone()[0]
                    self._db.execute(f"delete from records where seq in ({marks})", chunk)
            self._bytes -= freed

    def dropped(self) -> int:
        """How many records were ever dropped to keep within `max_bytes` (persistent, cumulative)."""
        with self._lock:
            return self._db.execute("select value from counters where name = 'dropped'").fetchone()[0]

    def count(self) -> int:
        with self._lock:
            return self._db.execute("select count(*) from records").fetchone()[0]

    def stored_bytes(self) -> int:
        return self._bytes

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _transaction(self):
        return _Transaction(self._db)


class _Transaction:
    """BEGIN IMMEDIATE ... COMMIT (ROLLBACK on error) on an autocommit connection."""

    def __init__(self, db: sqlite3.Connection):
        self._db = db

    def __enter__(self) -> None:
        self._db.execute("begin immediate")

    def __exit__(self, kind, value, traceback) -> None:
        self._db.execute("rollback" if kind else "commit")
