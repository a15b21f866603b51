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
- drops go strictly oldest first, and only `acknowledge` deletes otherwise, so every seq up to the
  drop watermark (the highest seq ever dropped, persistent) was either stored by the fleet or
  dropped: the fleet counts drops exactly from it, even of records it got before they were dropped
  (docs/protocol.md, `telemetry`). Records dropped before they had a seq (the oldest of a batch
  larger than the whole outbox, a batch a full disk refused) are counted apart, `dropped_unsequenced`;
- a record leaves only through `acknowledge` (once the fleet acknowledged storing it) or the bound above
  (lowered while the disk is full, see below);
- no VACUUM: deleted pages are reused by later inserts, so the file stays at its high-water mark
  instead of shrinking and growing again;
- one Outbox object per file: it keeps the stored size in memory (read once at open).

A full disk: SQLite in WAL mode needs free space even to delete (the WAL grows) and to checkpoint
(the database file grows to what the WAL holds), so at zero free bytes it can do nothing. The outbox
therefore keeps `<file>-reserve` (RESERVE bytes, allocated at open) and checkpoints every
CHECKPOINT_PAGES pages, which bounds what a checkpoint may still need. On SQLITE_FULL it gives the
reserve back, checkpoints, and caps itself at the bytes it stores: from then on an append drops the
oldest records (counted in `dropped`) and reuses their pages, as when the byte bound is reached. If
even that fails, it halves the cap, and at zero the batch itself is dropped and counted. The cap
is lifted, and the reserve taken again, once the disk has room for twice the reserve.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path

from edgeops.protocol.errors import EdgeopsError

log = logging.getLogger(__name__)
RECORD_OVERHEAD = 32  # bytes counted per record on top of its body: seq, kind, time and row overhead
DEFAULT_MAX_BYTES = 16 * 1024 * 1024
RESERVE = 1024 * 1024  # room given back on a full disk so SQLite can checkpoint and recycle its pages
CHECKPOINT_PAGES = 200  # of 4 KiB: what a checkpoint may have to add to the database file stays < RESERVE


@dataclass(frozen=True)
class Drops:
    """What the outbox ever dropped (cumulative): `total` records, of which `unsequenced` had no
    seq yet; every seq <= `watermark` was acknowledged or dropped."""

    total: int
    watermark: int
    unsequenced: int


@dataclass(frozen=True)
class Record:
    seq: int
    kind: str
    t: float
    body: str  # JSON


def _open_wal(path: str | Path) -> sqlite3.Connection:
    """Open in WAL mode; on a disk too full for the `-shm` index file, in exclusive locking mode,
    which keeps that index in memory (the agent is the outbox's only user), so an agent restarted on
    a full disk still starts, and its writes then meet SQLITE_FULL, which `append` handles."""
    db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
    try:
        db.execute("PRAGMA journal_mode=WAL")
    except sqlite3.OperationalError as exc:
        if exc.sqlite_errorcode != sqlite3.SQLITE_IOERR_SHMSIZE:
            raise
        db.close()
        log.warning("no room for the outbox's shared-memory file: opening %s in exclusive mode", path)
        db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        db.execute("PRAGMA locking_mode=EXCLUSIVE")
        db.execute("PRAGMA journal_mode=WAL")
    return db


class Outbox:
    def __init__(self, path: str | Path, max_bytes: int = DEFAULT_MAX_BYTES):
        if max_bytes < 512:
            raise EdgeopsError(f"the outbox needs at least 512 bytes, not {max_bytes}")
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._reserve = Path(f"{path}-reserve")
        self._cap: int | None = None  # a lower bound than max_bytes, set when the disk is full
        self._unsaved_drops = 0  # dropped while not even the counter could be written
        try:
            self._db = _open_wal(path)
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute(f"PRAGMA wal_autocheckpoint={CHECKPOINT_PAGES}")
            self._db.execute("create table if not exists records (seq integer primary key autoincrement, "
                             "kind text not null, t real not null, body text not null, size integer not null)")
            self._db.execute("create table if not exists counters (name text primary key, value integer not null)")
            self._db.execute("insert or ignore into counters values ('dropped', 0)")
            self._db.execute("insert or ignore into counters values ('dropped_unsequenced', 0)")
            # An outbox from before the watermark: every seq below its oldest record is gone, acknowledged or dropped.
            self._db.execute("insert or ignore into counters select 'drop_watermark', coalesce((select min(seq) - 1 "
                             "from records), (select seq from sqlite_sequence where name = 'records'), 0)")
            self._bytes = self._db.execute("select coalesce(sum(size), 0) from records").fetchone()[0]
            self._take_reserve()
        except sqlite3.DatabaseError as exc:
            raise EdgeopsError(f"the outbox {path} is unusable ({exc}); move it aside and restart the agent") from None

    def append(self, records: list[tuple[str, float, str]]) -> int:
        """Store (kind, time, JSON body) records in one transaction; returns how many old ones were dropped."""
        sized = [(kind, t, body, len(body) + RECORD_OVERHEAD) for kind, t, body in records]
        with self._lock:
            if self._cap is not None:
                self._lift_cap()
            while True:
                try:
                    dropped = self._append(sized)
                except sqlite3.OperationalError as exc:
                    if exc.sqlite_errorcode != sqlite3.SQLITE_FULL:
                        raise
                    if self._shrink():
                        continue
                    self._unsaved_drops += len(sized)  # nothing left to give up but the batch itself
                    log.error("disk full: the outbox holds nothing more to drop; %d new records dropped", len(sized))
                    return len(sized)
                return dropped

    def _append(self, sized: list[tuple[str, float, str, int]]) -> int:
        bound = self.max_bytes if self._cap is None else min(self.max_bytes, self._cap)
        incoming = sum(r[3] for r in sized)
        kept = list(sized)
        while kept and incoming > bound:  # a batch larger than the whole outbox keeps its newest
            incoming -= kept.pop(0)[3]
        unsaved = self._unsaved_drops
        unsequenced = len(sized) - len(kept) + unsaved
        dropped = unsequenced
        freed = 0
        with self._transaction():
            excess = self._bytes + incoming - bound
            if excess > 0:
                count, freed = self._drop_oldest(excess)
                dropped += count
            self._db.executemany("insert into records (kind, t, body, size) values (?, ?, ?, ?)", kept)
            if dropped:
                self._db.execute("update counters set value = value + ? where name = 'dropped'", [dropped])
            if unsequenced:
                self._db.execute("update counters set value = value + ? where name = 'dropped_unsequenced'",
                                 [unsequenced])
        self._bytes += incoming - freed
        self._unsaved_drops = 0
        return dropped - unsaved

    def _shrink(self) -> bool:
        """The disk is full: hold fewer bytes from now on (see the module docstring). False when
        the outbox is already empty, so only the incoming batch can go."""
        if self._cap is None:
            self._reserve.unlink(missing_ok=True)
            try:
                self._db.execute("PRAGMA wal_checkpoint(RESTART)")  # makes the WAL's own space reusable
            except sqlite3.OperationalError:
                pass
            self._cap = self._bytes
            log.error("disk full: the outbox now drops its oldest records to stay within %d bytes", self._cap)
        elif self._cap > 0:
            self._cap //= 2
        else:
            return False
        return True

    def _lift_cap(self) -> None:
        """Back to `max_bytes` once the disk has room again (and the reserve is taken back)."""
        if shutil.disk_usage(self._reserve.parent).free >= 2 * RESERVE and self._take_reserve():
            self._cap = None
            log.info("the outbox has room again, up to %d bytes", self.max_bytes)

    def _take_reserve(self) -> bool:
        try:
            fd = os.open(self._reserve, os.O_WRONLY | os.O_CREAT, 0o600)
            try:
                os.posix_fallocate(fd, 0, RESERVE)
            finally:
                os.close(fd)
            return True
        except OSError as exc:
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            self._reserve.unlink(missing_ok=True)
            return False

    def _drop_oldest(self, excess: int) -> tuple[int, int]:
        """Delete the fewest oldest records that free `excess` bytes: (records, bytes) freed."""
        freed, last, count = 0, None, 0
        for seq, size in self._db.execute("select seq, size from records order by seq"):
            freed, last, count = freed + size, seq, count + 1
            if freed >= excess:
                break
        if last is not None:
            self._db.execute("delete from records where seq <= ?", [last])
            self._db.execute("update counters set value = max(value, ?) where name = 'drop_watermark'", [last])
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
        """Forget records the broker has acknowledged. On a full disk that cannot even record the
        deletion, they stay, are sent again, and the fleet ingests them once (by seq)."""
        with self._lock:
            for attempt in range(2):
                try:
                    self._acknowledge(seqs)
                    return
                except sqlite3.OperationalError as exc:
                    if exc.sqlite_errorcode != sqlite3.SQLITE_FULL:
                        raise
                    if attempt or not self._shrink():
                        log.warning("disk full: %d acknowledged records stay in the outbox for now", len(seqs))
                        return

    def _acknowledge(self, seqs: list[int]) -> None:
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
        """How many records were ever dropped to keep within `max_bytes` or a full disk (persistent,
        cumulative; plus any dropped while not even the counter could be written)."""
        with self._lock:
            return self._db.execute("select value from counters where name = 'dropped'").fetchone()[0] \
                + self._unsaved_drops

    def drops(self) -> Drops:
        """The drop counters a telemetry batch carries, read together."""
        with self._lock:
            values = dict(self._db.execute("select name, value from counters"))
        return Drops(values["dropped"] + self._unsaved_drops, values["drop_watermark"],
                     values["dropped_unsequenced"] + self._unsaved_drops)

    def waiting(self, after: int, limit: int) -> tuple[int, int]:
        """(records, stored bytes) of the oldest `limit` records with seq > `after`, without reading bodies."""
        with self._lock:
            return self._db.execute("select count(*), coalesce(sum(size), 0) from (select size from records "
                                    "where seq > ? order by seq limit ?)", [after, limit]).fetchone()

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
        if kind is None:
            try:
                self._db.execute("commit")
                return
            except sqlite3.Error:
                self._rollback()  # e.g. SQLITE_FULL at commit: leave no transaction open
                raise
        self._rollback()

    def _rollback(self) -> None:
        if self._db.in_transaction:  # SQLite may have rolled back already (SQLITE_FULL, SQLITE_IOERR)
            self._db.execute("rollback")
