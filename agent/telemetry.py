"""What the device tells the fleet about its work: inference records, device metrics and drift
windows go into the outbox (agent/outbox.py) from a recorder thread, and a forwarder sends the
outbox to the fleet in QoS 1 batches (docs/protocol.md, `telemetry`).

Invariants:
- inference never waits for this module: `observe` only enqueues; the recorder turns observations
  into records and commits them in groups at least every COMMIT_S;
- a record is deleted from the outbox only when the fleet acknowledged it (its `acks` message, sent
  after the fleet's database committed the batch), not on the broker's PUBACK: a broker that lost
  the fleet's session acknowledges and drops what no one subscribes to. Anything unacknowledged
  after a reconnection, a restart or ACK_TIMEOUT_S is sent again, so the fleet may see a record
  twice and ingests by (device, seq), counting it once;
- every batch carries the outbox's drop counters (agent/outbox.Drops), so the fleet can account
  exactly for records dropped while the outbox was full, even those it stored before;
- the forwarder lingers: it sends once a full batch (BATCH_RECORDS or BATCH_BYTES) is waiting or
  the oldest unsent record has waited `forward_linger_s`, so a busy device sends few large messages
  (the fleet's cost is per message) instead of one per commit. Durability is the outbox's, unchanged;
  re-sends after a reconnection or a lost ack go at once.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from typing import Any

import numpy as np

from edgeops.agent.drift import DriftMonitor, sample_record
from edgeops.agent.metrics import DeviceMetrics
from edgeops.agent.outbox import Outbox
from edgeops.agent.serving import Observation
from edgeops.protocol import wire
from edgeops.protocol.errors import EdgeopsError

log = logging.getLogger(__name__)
COMMIT_S = 0.05
BATCH_RECORDS = 500
BATCH_BYTES = 128 * 1024
IN_FLIGHT = 4
ACK_TIMEOUT_S = 10.0
MAX_LISTED = 64  # per-sample classes/confidences listed in one inference record


class Telemetry:
    def __init__(self, device_id: str, outbox: Outbox, metrics: DeviceMetrics, metrics_interval_s: float = 30.0,
                 drift_window: int = 500, capture: int = 0, forward_linger_s: float = 1.0):
        """Drift is tracked per served model in windows of `drift_window` samples (agent/drift.py);
        with `capture` > 0, up to that many input samples per window are sent for retraining."""
        if not 0 <= forward_linger_s <= 60:
            raise EdgeopsError(f"agent.forward_linger_s must be 0 to 60 seconds, not {forward_linger_s}")
        self._linger = forward_linger_s
        self._unsent_since: float | None = None  # monotonic time the forwarder first saw unsent records
        self.device_id = device_id
        self.outbox = outbox
        self._metrics = metrics
        self._metrics_interval = metrics_interval_s
        self._drift_window, self._capture = drift_window, capture
        self._monitor: tuple[Any, DriftMonitor | None] | None = None  # (served model, its monitor)
        self._queue: queue.SimpleQueue[tuple[str, float, dict[str, Any]] | Observation] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._lock = threading.Lock()
        self._in_flight: dict[tuple[int, int], float] = {}  # (first seq, last seq) of a batch -> sent at
        self._acked: queue.SimpleQueue[list[int]] = queue.SimpleQueue()
        self._sent_up_to = 0
        self._epoch: int | None = None

    # ---- recording (any thread)

    def observe(self, observation: Observation) -> None:
        self._queue.put(observation)

    def record(self, kind: str, body: dict[str, Any], t: float | None = None) -> None:
        self._queue.put((kind, time.time() if t is None else t, body))

    # ---- the recorder thread

    def run_recorder(self, stop: threading.Event) -> None:
        """Commit queued records every COMMIT_S, and sample device metrics every interval, until `stop`."""
        next_metrics = time.monotonic()
        while not stop.is_set():
            if time.monotonic() >= next_metrics:
                self.record("metrics", self._metrics.sample())
                next_metrics = time.monotonic() + self._metrics_interval
            self.flush()
            stop.wait(COMMIT_S)
        self.flush()

    def flush(self) -> int:
        """Commit everything queued so far; returns how many records were stored."""
        rows: list[tuple[str, float, str]] = []
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            try:
                rows.extend(self._records(item))
            except Exception:  # a record that cannot be summarized must not stop the recorder
                log.exception("could not record an observation")
        if rows:
            try:
                self.outbox.append(rows)
            except Exception:  # an I/O error (a full disk is handled by the outbox): lost, logged only
                log.exception("could not store %d records in the outbox", len(rows))
                return 0
            self._wake.set()
        return len(rows)

    def _records(self, item: tuple[str, float, dict[str, Any]] | Observation) -> list[tuple[str, float, str]]:
        if not isinstance(item, Observation):
            kind, t, body = item
            return [(kind, t, json.dumps(body, separators=(",", ":")))]
        served = item.served
        body: dict[str, Any] = {"model": served.name, "version": served.version,
                                "latency_ms": round(item.latency_ms, 4), "ok": item.error is None}
        if item.error is not None:
            body["error"] = item.error[:300]
        classifier = served.classifier_output()
        if item.outputs is not None and classifier in item.outputs:
            scores = np.asarray(item.outputs[classifier])
            scores = scores.reshape(-1, scores.shape[-1])[:MAX_LISTED] if scores.ndim else scores.reshape(1, 1)
            body["samples"] = int(len(scores))
            body["classes"] = scores.argmax(1).tolist()
            body["confidences"] = [round(float(c), 4) for c in scores.max(1)]
        rows = [("inference", item.t, json.dumps(body, separators=(",", ":")))]
        monitor = self._drift_monitor(served)
        if monitor is not None and item.outputs is not None:
            windows = monitor.observe(item.feed, item.outputs)
            if windows and self._capture:
                windows += self._sample_records(monitor.take_captured())
            for extra in windows:
                extra = {"model": served.name, "version": served.version, **extra}
                rows.append((extra.pop("kind"), item.t, json.dumps(extra, separators=(",", ":"))))
        return rows

    @staticmethod
    def _sample_records(samples: list[dict[str, np.ndarray]]) -> list[dict[str, Any]]:
        records = []
        for sample in samples:
            try:
                records.append(sample_record(sample))
            except EdgeopsError as exc:  # too big to send: that sample only is left out
                log.warning("not sending a captured sample: %s", exc)
        return records

    def _drift_monitor(self, served: Any) -> DriftMonitor | None:
        """The monitor of the served model, made when it is first seen; None without a usable reference."""
        if self._monitor is None or self._monitor[0] is not served:
            monitor = None
            if served.reference is not None:
                whole = frozenset((served.manifest.get("selftest") or {}).get("whole_inputs") or ())
                try:
                    monitor = DriftMonitor(served.reference, whole, self._drift_window, capture=self._capture)
                except EdgeopsError as exc:
                    log.warning("no drift monitoring for %s %s: %s", served.name, served.version, exc)
            self._monitor = (served, monitor)
        return self._monitor[1]

    # ---- the forwarder thread

    def run_forwarder(self, stop: threading.Event, link: Any) -> None:
        """Send the outbox through `link` (agent/transport.Link) until `stop`."""
        while not stop.is_set():
            wait = 1.0
            try:
                wait = self.forward(link)
            except Exception:  # e.g. the outbox's disk failing: keep the thread, try again later
                log.exception("could not forward the outbox")
            self._wake.wait(min(wait, 1.0))  # `stop` is seen within a second, however long the linger
            self._wake.clear()

    def forward(self, link: Any) -> float:
        """Publish batches of pending records while fewer than IN_FLIGHT are unacknowledged, and a
        full batch waits or the linger is over; returns how long the forwarder may sleep."""
        with self._lock:
            self._forget_acknowledged()
            if not link.connected.is_set():
                return 1.0
            if self._epoch != link.epoch or self._stale():
                # A new connection (or a lost ack): whatever was in flight is sent again from the start, now.
                self._epoch, self._in_flight, self._sent_up_to = link.epoch, {}, 0
                self._unsent_since = float("-inf")
            while len(self._in_flight) < IN_FLIGHT:
                lingering = self._lingering()
                if lingering:
                    return lingering
                batch = self.outbox.pending(BATCH_RECORDS, self._sent_up_to, BATCH_BYTES)
                if not batch:
                    self._unsent_since = None
                    return 1.0
                drops = self.outbox.drops()
                payload = wire.telemetry_batch(self.device_id, [(r.seq, r.kind, r.t, r.body) for r in batch],
                                               drops.total, drops.watermark, drops.unsequenced)
                if link.publish_telemetry(payload).rc != 0:
                    return 1.0
                self._in_flight[(batch[0].seq, batch[-1].seq)] = time.monotonic()
                self._sent_up_to = batch[-1].seq
            return 1.0

    def _lingering(self) -> float:
        """Seconds left to wait for a fuller batch; 0 when one should go now (or nothing waits)."""
        now = time.monotonic()
        if not self._linger or (self._unsent_since is not None and now - self._unsent_since >= self._linger):
            return 0.0
        records, size = self.outbox.waiting(self._sent_up_to, BATCH_RECORDS)
        if not records or records >= BATCH_RECORDS or size >= BATCH_BYTES:
            return 0.0
        if self._unsent_since is None:
            self._unsent_since = now
        return max(self._unsent_since + self._linger - now, 0.001)

    def _stale(self) -> bool:
        oldest = min(self._in_flight.values(), default=None)
        return oldest is not None and time.monotonic() - oldest > ACK_TIMEOUT_S

    def acknowledged(self, seqs: list[int]) -> None:
        """The fleet's ack (on paho's thread): only queued here, the forwarder deletes the records."""
        self._acked.put(seqs)
        self._wake.set()

    def _forget_acknowledged(self) -> None:
        seqs = []
        while not self._acked.empty():
            acked = self._acked.get_nowait()
            if acked:
                self._in_flight.pop((min(acked), max(acked)), None)
                seqs.extend(acked)
        if seqs:
            self.outbox.acknowledge(seqs)
