"""Target streams: each requested block of a target is broadcast once on the target's stream topic,
however many devices asked for it (docs/protocol.md, "Streams").

Devices subscribe to the stream before asking, so every block published after a request reaches
every device downloading that target, and the broker does the fan-out. Invariants:
- a block is queued at most once at a time: a request for a block already queued joins it;
- a block is not sent again within HOLD_S of its last send: devices that ask for it just after it
  went by wait for the next round together, instead of each causing one more broadcast to all;
- blocks go out round-robin across targets, lowest index first within one, so a big target does not
  starve a small one, and at most WINDOW publishes are unacknowledged at once, which bounds memory;
- only content-addressed targets are streamed; devices verify every byte against signed metadata,
  so a lost, repeated or forged block costs a re-request, never an install of wrong bytes.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

from edgeops.protocol import wire

log = logging.getLogger(__name__)
WINDOW = 16
HOLD_S = 0.5


class Streams:
    def __init__(self, read: Callable[[str], bytes], publish: Callable[[str, bytes], Any]):
        """`read(path)` returns a target's bytes; `publish(topic, payload)` returns paho's MQTTMessageInfo."""
        self.read = read
        self.publish = publish
        self._queued: dict[str, dict[int, float]] = {}  # path -> block index -> not before (monotonic)
        self._last_sent: dict[tuple[str, int], float] = {}
        self._wake = threading.Condition()
        self.sent = 0  # blocks published, for benchmarks and /metrics

    def request(self, path: str, blocks: Iterable[int]) -> None:
        """Queue the blocks of `path` (readable, else OSError) that exist and are not queued already."""
        count = -(-len(self.read(path)) // wire.MAX_BLOCK)
        now = time.monotonic()
        with self._wake:
            queued = self._queued.setdefault(path, {})
            for index in blocks:
                if 0 <= index < count and index not in queued:
                    queued[index] = max(now, self._last_sent.get((path, index), -HOLD_S) + HOLD_S)
            if not queued:
                del self._queued[path]
            self._wake.notify()

    def pending(self) -> int:
        with self._wake:
            return sum(len(blocks) for blocks in self._queued.values())

    def run(self, stop: threading.Event) -> None:
        """Send queued blocks until `stop` is set."""
        in_flight: deque[Any] = deque()
        while not stop.is_set():
            with self._wake:
                batch, wait = self._due(time.monotonic())
                if not batch:
                    self._wake.wait(timeout=wait)
                    continue
            for path, index in batch:
                while len(in_flight) >= WINDOW:
                    _settle(in_flight.popleft())
                try:
                    in_flight.append(self._send(path, index))
                except Exception:  # e.g. the target vanished: devices re-request; the thread lives on
                    log.exception("could not send block %d of %s", index, path)

    def _due(self, now: float) -> tuple[list[tuple[str, int]], float]:
        """Take the lowest due block of each target; else how long until one is due (at most 0.5 s)."""
        batch, wait = [], 0.5
        for path, queued in list(self._queued.items()):
            due = [index for index, not_before in queued.items() if not_before <= now]
            if due:
                index = min(due)
                del queued[index]
                self._last_sent[(path, index)] = now
                batch.append((path, index))
                if not queued:
                    del self._queued[path]
            else:
                wait = min(wait, min(queued.values()) - now)
        return batch, max(wait, 0.001)

    def _send(self, path: str, index: int) -> Any:
        data = self.read(path)
        offset = index * wire.MAX_BLOCK
        payload = wire.stream_block(path, offset, len(data), data[offset : offset + wire.MAX_BLOCK])
        self.sent += 1
        return self.publish(wire.stream_topic(path), payload)


def _settle(info: Any) -> None:
    """Wait (bounded) for the broker to take a publish; a failed one is the device's to re-request."""
    try:
        info.wait_for_publish(timeout=10)
    except (RuntimeError, ValueError) as exc:
        log.debug("stream publish not acknowledged: %s", exc)
