"""The device's time floor: a time it has good reason to believe has already passed, kept across
restarts, so that signed metadata is judged at max(wall clock, floor). A clock set back (an RTC
reset to 1970 by a power cut, a hostile NTP server) then never makes expired metadata valid again.

The floor is the larger of two pieces of evidence, kept in `clock.json` (written atomically, fsync'd):
- `anchor`: the fleet's signed issue time of the newest verified timestamp metadata
  (`wire.ISSUED_FIELD`, covered by the timestamp key's signature). It advances with the monotonic
  clock, which neither NTP nor `date -s` can step. A signed time more than SKEW_S past both the wall
  clock and the floor is believed only while the wall clock is behind the anchor (or for the first
  one), and never past the expiry of the offline-signed root and targets metadata: a stolen online
  key alone cannot push devices' floors ahead.
- `mark`: min(wall clock, earliest expiry of the trusted metadata), at each refresh and tick:
  metadata the device saw expire stays expired. A clock set forward moves it at most to that
  expiry, which the fleet's next timestamp passes, so the overshoot does not outlive a correction.
Unsigned input (MQTT messages, a wall clock beyond the metadata's expiry) never moves the floor, a
replayed (older) timestamp carries an older issue time, and nothing moves the floor backwards.

A full disk (ENOSPC) does not stop the agent: the floor is kept in memory, and each tick tries to
save it again. That is safe: `clock.json` keeps the last floor saved (atomic_write leaves the old
file or the new one), older than the floor in memory but never moved backwards, so a restart
meanwhile judges at it, as after a power cut between two saves.

The wall clock is reported wrong ("behind") when it is more than SKEW_S behind the anchor, or
("ahead") when the fleet's newest timestamp is expired by the wall clock but not by the floor and
the two are more than SKEW_S apart: the clock was set forward, or the fleet stopped re-signing.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from edgeops.agent.partial import disk_full
from edgeops.protocol.bundle import atomic_write, canonical_json

log = logging.getLogger(__name__)
SKEW_S = 300.0  # a wall clock this far from the evidence is wrong, not merely drifting
SAVE_EVERY_S = 300.0  # how stale the anchor on disk may get while the agent runs


@dataclass(frozen=True)
class Evidence:
    """What the trusted metadata says about the time, in seconds since the epoch."""

    issued: float | None  # the newest timestamp's signed issue time (None from a fleet that sends none)
    timestamp_expires: float
    earliest_expires: float  # of every trusted top-level role
    offline_expires: float  # of root and targets, signed with keys kept off the fleet server


def _utc(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class Clock:
    """The floor of one device, persisted in `path`; one instance per agent process."""

    def __init__(self, path: str | Path, wall: Callable[[], float] = time.time,
                 monotonic: Callable[[], float] = time.monotonic):
        self.path = Path(path)
        self._wall, self._monotonic = wall, monotonic
        self._mark, self._anchor = self._load()
        self._base = self._saved_at = monotonic()
        self._evidence: Evidence | None = None
        self._ahead = False
        self._status: str | None = None  # the last status logged
        self._unsaved = False  # a full disk kept the floor from being saved

    def _load(self) -> tuple[float, float]:
        try:
            saved = json.loads(self.path.read_text())
            mark, anchor = float(saved["mark"]), float(saved["anchor"])
        except FileNotFoundError:
            return 0.0, 0.0
        except (OSError, ValueError, KeyError, TypeError) as exc:  # written atomically: only a hand edit gets here
            log.error("%s is unreadable (%s); the time floor starts again from the trusted metadata", self.path, exc)
            return 0.0, 0.0
        return (mark, anchor) if math.isfinite(mark) and math.isfinite(anchor) else (0.0, 0.0)

    def _anchor_now(self) -> float:
        return self._anchor + max(0.0, self._monotonic() - self._base) if self._anchor else 0.0

    def floor(self) -> float:
        """The latest time, in seconds since the epoch, the evidence says has passed."""
        return max(self._mark, self._anchor_now())

    def now(self) -> datetime:
        """The time to judge expiry by: the wall clock, or the floor when the clock is behind it."""
        return datetime.fromtimestamp(max(self._wall(), self.floor()), timezone.utc)

    def observe(self, evidence: Evidence, fetched: bool = True) -> None:
        """Take in what the trusted metadata says, and persist the floor. `fetched`: the metadata is
        the fleet's answer to a refresh just now, not what the device kept from before (which may
        have expired while it was off)."""
        wall, floor = self._wall(), self.floor()
        if evidence.issued is not None:
            signed = min(evidence.issued, evidence.offline_expires)
            # Believed when it is the first, or within SKEW_S of what the device knows, or when the
            # wall clock is shown wrong ("behind"): a stolen online key alone cannot move it far.
            believed = not self._anchor or signed <= max(wall, floor) + SKEW_S or wall < self._anchor_now() - SKEW_S
            if believed and signed > self._anchor_now():
                self._anchor, self._base = signed, self._monotonic()
        if wall < evidence.timestamp_expires:
            self._ahead = False
        elif fetched and evidence.timestamp_expires > self.floor() and wall - self.floor() > SKEW_S:
            self._ahead = True  # the fleet's newest timestamp is expired by the wall clock alone
        self._evidence = evidence
        self._advance()
        self._save()

    def tick(self) -> bool:
        """Advance and, now and then, persist the floor; True when the clock went wrong or right again."""
        self._advance()
        if self._unsaved or self._monotonic() - self._saved_at >= SAVE_EVERY_S:
            self._save()
        status = (self.skew() or {}).get("status")
        changed, self._status = status != self._status, status
        if changed and status:
            log.warning("wall clock is wrong: %s", self.skew()["reason"])
        elif changed:
            log.info("wall clock agrees with the trusted time again")
        return changed

    def skew(self) -> dict[str, Any] | None:
        """None while the wall clock looks right; else its status, skew_s (wall - floor) and reason,
        as reported to the fleet in the device's state."""
        wall, anchor, floor = self._wall(), self._anchor_now(), self.floor()
        if anchor - wall > SKEW_S:
            return {"status": "behind", "skew_s": round(wall - anchor), "wall": _utc(wall), "floor": _utc(floor),
                    "reason": f"the clock reads {_utc(wall)}, {round(anchor - wall)} s behind the time the fleet's "
                              f"signed metadata vouches for ({_utc(anchor)}); expiry is judged at that time instead"}
        if self._ahead and wall - floor > SKEW_S:
            return {"status": "ahead", "skew_s": round(wall - floor), "wall": _utc(wall), "floor": _utc(floor),
                    "reason": f"the clock reads {_utc(wall)}, {round(wall - floor)} s ahead of the trusted time "
                              f"({_utc(floor)}): the fleet's newest signed metadata looks expired only by this clock "
                              f"(set forward, or the fleet stopped re-signing); updates wait, the installed model serves"}
        return None

    def _advance(self) -> None:
        if self._evidence is not None:  # the wall clock counts up to the expiry of what the device trusts
            self._mark = max(self._mark, min(self._wall(), self._evidence.earliest_expires))

    def _save(self) -> None:
        self._anchor, self._base = self._anchor_now(), self._monotonic()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(self.path, canonical_json({"mark": self._mark, "anchor": self._anchor}))
        except OSError as exc:
            if not disk_full(exc):
                raise
            if not self._unsaved:  # tick() retries until it fits
                log.warning("cannot save the time floor (%s); kept in memory until there is room", exc)
            self._unsaved = True
            return
        if self._unsaved:
            log.info("the time floor is saved again in %s", self.path)
        self._unsaved, self._saved_at = False, self._base
