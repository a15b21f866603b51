"""A target being downloaded: blocks written at their offsets into `<sha256>.part`, and the index of
each block made durable appended to `<sha256>.have` (4-byte little-endian records).

Blocks arrive in any order on a broadcast stream, so progress is a set of blocks, not a length.
Invariants:
- an index is in `.have` only after its block's bytes were fsync'd into `.part` (data first, then
  the log), so after a crash or a power cut every block the log names is on disk, and a restarted
  agent asks only for the others;
- a torn last record (a crash mid-append) is ignored, and cut off before the next append so records
  stay aligned; it named a block that is simply fetched again;
- reading progress (the constructor) changes nothing on disk, so anyone may inspect a download;
- nothing here is trusted: the finished file is hashed against signed metadata before any use.

A full disk (ENOSPC) while writing a block is the caller's to handle: the agent discards the
partial download (so it does not keep the disk full) and tries again later; `check_room` refuses
to start a download whose missing blocks cannot fit.
"""

from __future__ import annotations

import errno
import os
import shutil
import struct
from pathlib import Path

from edgeops.protocol.wire import MAX_BLOCK

RECORD = struct.Struct("<I")


class PartialDownload:
    def __init__(self, path: Path, length: int):
        self.path = path
        self.length = length
        self.log = path.with_suffix(".have")
        self.count = -(-length // MAX_BLOCK)
        self.have = self._load()
        self.resumed = len(self.have)  # blocks already stored when this download (re)started

    def _load(self) -> set[int]:
        if not self.path.exists() or not self.log.exists():  # a log without its data names nothing
            return set()
        data = self.log.read_bytes()
        whole = len(data) - len(data) % RECORD.size
        return {index for (index,) in RECORD.iter_unpack(data[:whole]) if index < self.count}

    def missing(self) -> list[int]:
        return [index for index in range(self.count) if index not in self.have]

    def check_room(self) -> None:
        """Raise OSError(ENOSPC) when the blocks still missing do not fit in the free space."""
        needed = sum(self.block_size(index) for index in self.missing())
        free = shutil.disk_usage(self.path.parent).free
        if needed > free:
            raise OSError(errno.ENOSPC, f"{needed} bytes to download, {free} free", str(self.path.parent))

    def block_size(self, index: int) -> int:
        return min(MAX_BLOCK, self.length - index * MAX_BLOCK)

    def write(self, blocks: dict[int, bytes]) -> None:
        """Store blocks durably: data synced, then their indices logged and synced."""
        fresh = not self.path.exists()
        with open(self.path, "w+b" if fresh else "r+b") as fh:
            for index, data in sorted(blocks.items()):
                fh.seek(index * MAX_BLOCK)
                fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        with open(self.log, "wb" if fresh else "ab") as fh:
            torn = fh.tell() % RECORD.size
            if torn:
                fh.truncate(fh.tell() - torn)
            fh.write(b"".join(RECORD.pack(index) for index in sorted(blocks)))
            fh.flush()
            os.fsync(fh.fileno())
        self.have.update(blocks)

    def finish(self) -> Path:
        """The complete file (cut to `length`, should an old partial have been longer); the log goes."""
        with open(self.path, "ab") as fh:
            fh.truncate(self.length)
        self.log.unlink(missing_ok=True)
        return self.path


def discard(path: Path) -> None:
    """Remove a partial download and its log."""
    path.unlink(missing_ok=True)
    path.with_suffix(".have").unlink(missing_ok=True)


def disk_full(exc: BaseException | None) -> bool:
    """Whether `exc`, or the error that caused it, is a full disk (or quota)."""
    while exc is not None:
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        exc = exc.__cause__
    return False
