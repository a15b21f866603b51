"""Crash-loop protection: count the agent's starts on each installed model, and give up on a model
that keeps the agent from staying up.

A model can pass its self-test and still take the process down in service (a kernel that crashes
on field data, memory that runs out under load). The agent counts every start on the active model
before serving it, and clears the count once it has served for `healthy_after_s`. When the count
passes `limit`, the model goes back to the one before it (SlotStore.revert) and its bundle is
quarantined: the agent reports it failed and does not install it again.

Invariants: the count is written (atomically, fsync'd) before the model is served, so a crash at any
point after it still counts (unless the disk is full, below); only a model that served
`healthy_after_s` clears it; a quarantined target stays quarantined for the life of the state
directory.

A full disk (ENOSPC) must not become a crash loop of its own: the count is then kept in memory, the
active model serves anyway, and `flush` (called often by the agent) writes it once there is room.
A count that is not on disk never triggers a rollback (going back writes the slot pointer, which
needs room too). The count on disk cannot grow while the disk stays full, so no healthy model is
rolled back for it; the price is that a model that crashes is caught only by the starts counted
after space is freed.
"""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path
from typing import Any

from edgeops.agent.partial import disk_full
from edgeops.protocol.bundle import atomic_write, canonical_json

log = logging.getLogger(__name__)
DEFAULT_LIMIT = 3  # starts in a row without staying up
DEFAULT_HEALTHY_AFTER_S = 30.0


class BootGuard:
    def __init__(self, path: str | Path, limit: int = DEFAULT_LIMIT):
        self.path, self.limit = Path(path), limit
        self._unsaved: dict[str, Any] | None = None  # newer than the file: a full disk kept it from being written
        self._lock = threading.Lock()  # healthy() runs on a timer thread, flush() on the agent's

    def _read(self) -> dict[str, Any]:
        if self._unsaved is not None:
            return self._unsaved
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {"target": None, "starts": 0, "quarantined": []}
        return data if isinstance(data, dict) else {"target": None, "starts": 0, "quarantined": []}

    def _write(self, data: dict[str, Any]) -> None:
        try:
            atomic_write(self.path, canonical_json(data))
        except OSError as exc:
            if not disk_full(exc):
                raise
            if self._unsaved is None:
                log.warning("cannot count starts in %s (%s): crash-loop protection waits until there is room",
                            self.path, exc)
            self._unsaved = data
            return
        if self._unsaved is not None:
            log.info("%s is written again", self.path)
        self._unsaved = None

    def flush(self) -> None:
        """Write what a full disk held back, if anything; cheap to call often."""
        with self._lock:
            if self._unsaved is not None:
                self._write(self._unsaved)

    def start(self, target: str) -> bool:
        """Count a start on `target`; True when it is one start too many (a crash loop) and on disk."""
        with self._lock:
            data = self._read()
            starts = data.get("starts", 0) + 1 if data.get("target") == target else 1
            self._write({**data, "target": target, "starts": starts})
            return starts > self.limit and self._unsaved is None

    def healthy(self) -> None:
        """The active model has served long enough: its starts no longer count against it."""
        with self._lock:
            data = self._read()
            if data.get("starts"):
                self._write({**data, "starts": 0})

    def quarantine(self, target: str) -> None:
        with self._lock:
            data = self._read()
            self._write({**data, "target": None, "starts": 0,
                         "quarantined": sorted({*data.get("quarantined", []), target})})

    def quarantined(self, target: str) -> bool:
        return target in self._read().get("quarantined", [])
