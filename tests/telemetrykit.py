"""Shared pieces for tests of what the fleet shows (views, series, exposition): a real registry file,
devices reporting through `registry.record_reports`, and telemetry batches that go the devices' way
in: encoded by `wire.telemetry_batch`, parsed by `wire.parse_telemetry`, stored by `telemetry.ingest`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import sqlite_utils

from edgeops.fleet import ca, registry, telemetry
from edgeops.protocol import drift, wire

REFERENCE = {"input/x/0": [50, 50, 50, 50], "output/y/class": [100, 100]}


def certificate(pki: Path, device_id: str) -> bytes:
    """A real certificate for `device_id` from a CA in `pki` (made on first use): what enrollment records."""
    if not (pki / "ca.pem").exists():
        ca.create_ca(pki)
    return ca.issue(pki, device_id).cert


def fleet(tmp_path: Path, count: int, profile: str = "rpi4", online: bool = True) -> sqlite_utils.Database:
    """A registry with devices dev-00, dev-01, ... enrolled (and reported online when `online`)."""
    db = registry.open_db(tmp_path / "fleet.db")
    for i in range(count):
        registry.enroll(db, f"dev-{i:02d}", profile, {"site": "lab"}, certificate(tmp_path / "pki", f"dev-{i:02d}"))
    if online:
        registry.record_reports(db, [(f"dev-{i:02d}", {"online": True}) for i in range(count)])
    return db


def report(db: sqlite_utils.Database, device: str, release: int, state: str, reason: str = "",
           installed: tuple[str, str] | None = None) -> None:
    """A device's `state` message: its execution of `release`, and what it runs."""
    model, version = installed or (None, None)
    registry.record_reports(db, [(device, {"online": True, "installed": {"model": model, "version": version},
                                           "execution": {"release": release, "state": state, "reason": reason}})])


def send(db: sqlite_utils.Database, device: str, records: list[tuple[int, str, float, dict[str, Any]]],
         dropped: int = 0) -> None:
    """One telemetry batch of (seq, kind, t, body) records from `device`, as the fleet receives it."""
    payload = wire.telemetry_batch(device, [(seq, kind, t, json.dumps(body)) for seq, kind, t, body in records], dropped)
    telemetry.ingest(db, [(device, wire.parse_telemetry(payload))])


def inference(model: str, version: str, latency_ms: float, ok: bool = True) -> dict[str, Any]:
    """An inference record body as agent/telemetry.py writes it."""
    body: dict[str, Any] = {"model": model, "version": version, "latency_ms": latency_ms, "ok": ok}
    if not ok:
        body["error"] = "RuntimeError: input has the wrong shape"
    return body


def window(model: str, version: str, index: int, shifted: bool) -> dict[str, Any]:
    """A drift window body as agent/drift.py writes it, tested by the devices' own math: a shifted
    window puts every sample in the first input bin, which alarms."""
    counts = {"input/x/0": [100, 0, 0, 0] if shifted else [25, 25, 25, 25], "output/y/class": [50, 50]}
    return {"model": model, "version": version, "window": index, "samples": 100, "reference": "digest-1",
            "counts": counts, "reference_counts": REFERENCE, **drift.window_test(REFERENCE, counts)}
