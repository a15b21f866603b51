"""Crash-loop protection: count the agent's starts on each installed model, and give up on a model
that keeps the agent from staying up.

A model can pass its self-test and still take the process down in service (a kernel that crashes
on field data, memory that runs out under load). The agent counts every start on the active model
before serving it, and clears the count once it has served for `healthy_after_s`. When the count
passes `limit`, the model goes back to the one before it (SlotStore.revert) and its bundle is
quarantined: the agent reports it failed and does not install it again.

Invariants: the count is written (atomically, fsync'd) before the model is served, so a crash at any
point after it still counts; only a model that served `healthy_after_s` clears it; a quarantined
target stays quarantined for the life of the state directory.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from edgeops.protocol.bundle import atomic_write, canonical_json

DEFAULT_LIMIT = 3  # starts in a row without staying up
DEFAULT_HEALTHY_AFTER_S = 30.0


class BootGuard:
    def __init__(self, path: str | Path, limit: int = DEFAULT_LIMIT):
        self.path, self.limit = Path(path), limit

    def _read(self) -> dict[str, Any]:
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {"target": None, "starts": 0, "quarantined": []}
        return data if isinstance(data, dict) else {"target": None, "starts": 0, "quarantined": []}

    def _write(self, data: dict[str, Any]) -> None:
        atomic_write(self.path, canonical_json(data))

    def start(self, target: str) -> bool:
        """Count a start on `target`; True when it is one start too many (a crash loop)."""
        data = self._read()
        starts = data.get("starts", 0) + 1 if data.get("target") == target else 1
        self._write({**data, "target": target, "starts": starts})
        return starts > self.limit

    def healthy(self) -> None:
        """The active model has served long enough: its starts no longer count against it."""
        data = self._read()
        if data.get("starts"):
            self._write({**data, "starts": 0})

    def quarantine(self, target: str) -> None:
        data = self._read()
        self._write({**data, "target": None, "starts": 0,
                     "quarantined": sorted({*data.get("quarantined", []), target})})

    def quarantined(self, target: str) -> bool:
        return target in self._read().get("quarantined", [])
