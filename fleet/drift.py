"""The fleet's view of drift: merge the devices' drift windows per model version, test the merged counts
with the devices' own math (edgeops.protocol.drift), say which versions need retraining, and export
the samples the devices captured as a retraining dataset.

Input: the `telemetry` table (device, seq, kind, t, model, version, body), records of kind "drift" and
"sample" (bodies documented in edgeops.agent.drift); other kinds are not read here.

Merge: a version's windows are summed bin by bin per baseline, i.e. per reference digest, because
bundles of one version built for different profiles can carry different output bins. Within a
baseline the sum is exact (same bins, counts add) and equals the counts of all its samples binned at
once. Every window carries its reference counts, so the merged test needs no bundle.

Persistence rule: a device's drift on a version persists when at least PERSISTENT (2) of its last
RECENT (3) windows on that version alarmed. One alarmed window can be chance (each window alarms with
probability <= alpha, 1 % by default, on stationary data); two of three happen by chance with
probability about 3 * alpha**2 (3 in 10,000), while a real shift is usually caught in its first
window (docs/drift.md), so the rule costs at most one window of delay. It is per device because
devices see different populations: a drift on a few devices is diluted below the PSI floor in the
version-wide merge, yet it is what their users get.

Statuses: a device is "retraining recommended" when its drift persists, "drifting" when its latest
window alarmed, "ok" otherwise. A version takes the worst status of its devices, and is at least
"drifting" when its merged counts alarm.

Invariants: records are read in (device, seq) order, so "latest" is the device's order; malformed
bodies are skipped and counted, never fatal; a window's counts are added only when its keys and bin
counts match its baseline's reference counts.
"""

from __future__ import annotations

import json
from collections import Counter, deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import sqlite_utils

from edgeops.fleet import derived
from edgeops.protocol.bundle import atomic_write, canonical_json, npz_bytes
from edgeops.protocol.drift import ALPHA, PSI_FLOOR, decode_sample, window_test
from edgeops.protocol.errors import EdgeopsError

RECENT = 3
PERSISTENT = 2
TOP_FEATURES = 5
OK, DRIFTING, RETRAIN = "ok", "drifting", "retraining recommended"
_RANK = {OK: 0, DRIFTING: 1, RETRAIN: 2}


def _is_counts(value: Any) -> bool:
    return isinstance(value, list) and all(type(c) is int and c >= 0 for c in value)


def _valid_window(body: Any) -> bool:
    """A drift body with what the merge needs: a digest, and counts on the same bins as its reference counts."""
    if not isinstance(body, dict):
        return False
    counts, ref = body.get("counts"), body.get("reference_counts")
    return (isinstance(body.get("reference"), str) and type(body.get("alarm")) is bool
            and type(body.get("samples")) is int and isinstance(body.get("drifted"), list)
            and isinstance(counts, dict) and isinstance(ref, dict) and counts.keys() == ref.keys()
            and all(_is_counts(ref[k]) and _is_counts(counts[k]) and len(ref[k]) == len(counts[k]) for k in ref))


@dataclass
class _Baseline:
    """All windows binned on one reference, summed."""

    reference_counts: dict[str, list[int]]
    counts: dict[str, np.ndarray]
    windows: int = 0
    samples: int = 0

    def add(self, body: dict[str, Any]) -> None:
        for key, counts in body["counts"].items():
            self.counts[key] += counts
        self.windows += 1
        self.samples += body["samples"]

    def summary(self, digest: str) -> dict[str, Any]:
        counts = {key: values.tolist() for key, values in self.counts.items()}
        return {"reference": digest, "windows": self.windows, "samples": self.samples, "counts": counts,
                "reference_counts": self.reference_counts,
                **window_test(self.reference_counts, counts, ALPHA, PSI_FLOOR)}


@dataclass
class _Device:
    windows: int = 0
    alarmed: int = 0
    recent: deque[bool] = field(default_factory=lambda: deque(maxlen=RECENT))
    drifted: list[str] = field(default_factory=list)  # what drifted in its latest window
    last_seen: float = 0.0

    def status(self) -> str:
        if sum(self.recent) >= PERSISTENT:
            return RETRAIN
        return DRIFTING if self.recent and self.recent[-1] else OK

    def summary(self) -> dict[str, Any]:
        return {"status": self.status(), "windows": self.windows, "alarmed": self.alarmed,
                "recent": list(self.recent), "drifted": self.drifted, "last_seen": self.last_seen}


@dataclass
class _Version:
    model: str
    version: str
    devices: dict[str, _Device] = field(default_factory=dict)
    baselines: dict[str, _Baseline] = field(default_factory=dict)
    captured: int = 0
    skipped: int = 0
    first_seen: float = float("inf")
    last_seen: float = float("-inf")
    seqs: dict[str, int] = field(default_factory=dict)  # per device, the highest seq added

    def freeze(self) -> dict[str, Any]:
        """As JSON, to store and `thaw` later (fleet/derived.py)."""
        return {"model": self.model, "version": self.version, "captured": self.captured, "skipped": self.skipped,
                "first_seen": self.first_seen, "last_seen": self.last_seen, "seqs": self.seqs,
                "baselines": {digest: [b.reference_counts, {k: c.tolist() for k, c in b.counts.items()}, b.windows,
                                       b.samples] for digest, b in self.baselines.items()},
                "devices": {name: [d.windows, d.alarmed, list(d.recent), d.drifted, d.last_seen]
                            for name, d in self.devices.items()}}

    @classmethod
    def thaw(cls, data: dict[str, Any]) -> "_Version":
        baselines = {digest: _Baseline(ref, {k: np.array(c, dtype=np.int64) for k, c in counts.items()}, windows, samples)
                     for digest, (ref, counts, windows, samples) in data["baselines"].items()}
        devices = {name: _Device(windows, alarmed, deque(recent, maxlen=RECENT), drifted, last_seen)
                   for name, (windows, alarmed, recent, drifted, last_seen) in data["devices"].items()}
        return cls(data["model"], data["version"], devices, baselines, data["captured"], data["skipped"],
                   data["first_seen"], data["last_seen"], data["seqs"])

    def add(self, device: str, kind: str, t: float, body: Any) -> None:
        self.first_seen, self.last_seen = min(self.first_seen, t), max(self.last_seen, t)
        if kind == "sample":
            self.captured += 1
            return
        if not _valid_window(body):
            self.skipped += 1
            return
        baseline = self.baselines.get(body["reference"])
        if baseline is None:
            ref = body["reference_counts"]
            baseline = self.baselines[body["reference"]] = _Baseline(
                ref, {key: np.zeros(len(values), dtype=np.int64) for key, values in ref.items()})
        elif body["reference_counts"] != baseline.reference_counts:
            self.skipped += 1
            return
        baseline.add(body)
        state = self.devices.setdefault(device, _Device())
        state.windows += 1
        state.alarmed += body["alarm"]
        state.recent.append(body["alarm"])
        state.drifted = [str(key) for key in body["drifted"]]
        state.last_seen = max(state.last_seen, t)

    def summary(self) -> dict[str, Any]:
        devices = {name: state.summary() for name, state in sorted(self.devices.items())}
        baselines = [baseline.summary(digest) for digest, baseline in sorted(self.baselines.items())]
        statuses = [d["status"] for d in devices.values()] + [DRIFTING for b in baselines if b["alarm"]]
        features = [{"feature": key, "reference": b["reference"], "psi": b["psi"][key], "p_adj": b["p_adj"][key],
                     "drifted": key in b["drifted"]} for b in baselines for key in b["psi"]]
        return {
            "model": self.model, "version": self.version,
            "status": max(statuses, key=_RANK.__getitem__, default=OK),
            "first_seen": self.first_seen, "last_seen": self.last_seen,
            "windows": sum(b["windows"] for b in baselines), "samples": sum(b["samples"] for b in baselines),
            "captured": self.captured, "skipped": self.skipped,
            "devices": devices, "baselines": baselines,
            "top_features": sorted(features, key=lambda f: -f["psi"])[:TOP_FEATURES],
        }


def _select(db: sqlite_utils.Database, columns: str, kinds: tuple[str, ...], model: str | None = None,
            version: str | None = None, tail: str = "ORDER BY device, seq") -> Iterator[tuple]:
    """Rows of the drift-related telemetry records, streamed (the table can be large)."""
    if "telemetry" not in db.table_names():
        return iter(())
    where = [f"kind IN ({', '.join('?' * len(kinds))})", "model IS NOT NULL", "version IS NOT NULL"]
    params: list[Any] = list(kinds)
    for column, value in (("model", model), ("version", version)):
        if value is not None:
            where.append(f"{column} = ?")
            params.append(value)
    return iter(db.execute(f"SELECT {columns} FROM telemetry WHERE {' AND '.join(where)} {tail}", params))


def _load(text: str) -> Any:
    try:
        return json.loads(text)
    except (TypeError, ValueError):
        return None


def _add_rows(versions: dict[tuple[str, str], _Version], rows: Iterator[tuple], strict: bool) -> bool:
    """Add (device, seq, kind, t, model, version, body) rows, in (device, seq) order, to `versions`.
    `strict` (adding to versions built from earlier rows): False, leaving `versions` half-changed, when
    a row could have changed what the earlier rows gave (a seq at or below one already added for its
    device and version, or a window disagreeing with its baseline's reference counts), so the caller
    rebuilds from every row."""
    for device, seq, kind, t, name, version, text in rows:
        entry = versions.setdefault((name, version), _Version(name, version))
        body = _load(text) if kind == "drift" else None
        if strict and (seq <= entry.seqs.get(device, seq - 1) or (
                isinstance(body, dict) and isinstance(body.get("reference"), str) and body["reference"] in entry.baselines
                and body.get("reference_counts") != entry.baselines[body["reference"]].reference_counts)):
            return False
        entry.add(device, kind, float(t or 0.0), body)
        entry.seqs[device] = seq
    return True


_ROWS = "device, seq, kind, t, model, version, body"


def _fold(db: sqlite_utils.Database, previous: int | None, now: int) -> None:
    """Bring the stored versions, report and flags up to date with the records up to rowid `now`
    (fleet/derived.py): add the drift and sample records past `previous` to the stored versions, or
    build them from every record (first use, or a record that could change what came before)."""
    versions = None
    if previous is not None:
        rows = db.execute(f"SELECT {_ROWS} FROM telemetry WHERE rowid > ? AND rowid <= ? AND kind IN ('drift', 'sample') "
                          "AND model IS NOT NULL AND version IS NOT NULL ORDER BY device, seq", [previous, now]).fetchall()
        if not rows:
            return
        versions = {(v["model"], v["version"]): _Version.thaw(v) for v in derived.blob(db, "drift.state") or []}
        if not _add_rows(versions, iter(rows), strict=True):
            versions = None
    if versions is None:
        versions = {}
        _add_rows(versions, _select(db, _ROWS, ("drift", "sample")), strict=False)
    ordered = [versions[key] for key in sorted(versions)]
    summaries = [v.summary() for v in ordered]
    derived.put_blob(db, "drift.state", [v.freeze() for v in ordered])
    derived.put_blob(db, "drift.report", summaries)
    derived.put_blob(db, "drift.summary", [drifting_only(v) for v in summaries])
    retraining: dict[str, list[tuple[str, str]]] = {}
    for v in summaries:
        retraining.setdefault(v["model"], []).extend(
            (v["version"], name) for name, d in v["devices"].items() if d["status"] == RETRAIN)
    derived.put_blob(db, "drift.flags", {"retraining": retraining, "flagged": [
        {"model": v["model"], "version": v["version"], "last_seen": v["last_seen"], "top_features": v["top_features"],
         "devices": [name for name, d in v["devices"].items() if d["status"] == RETRAIN]}
        for v in summaries if v["status"] == RETRAIN]})


def _stored(db: sqlite_utils.Database, name: str) -> Any:
    """The blob `name` ("drift.report", "drift.summary" or "drift.flags") brought up to date; None
    without a telemetry table."""
    if "telemetry" not in db.table_names():
        return None
    derived.since(db, "drift", lambda previous, now: _fold(db, previous, now))
    return derived.blob(db, name)


def _unknown_model(db: sqlite_utils.Database, model: str) -> EdgeopsError:
    names = sorted((_stored(db, "drift.flags") or {"retraining": {}})["retraining"])
    return EdgeopsError(f"no drift telemetry from model {model!r} (models with drift telemetry: "
                        f"{', '.join(names) if names else 'none yet'})")


def report(db: sqlite_utils.Database, model: str | None = None, every_device: bool = True) -> dict[str, Any]:
    """Per model version: merged counts and test per baseline, each device's status, the version's status,
    first/last seen times and the features that drift most (by PSI); all models when `model` is None.
    Kept up to date in the registry from the records added since (fleet/derived.py), not recomputed.
    `every_device` False: each version as `drifting_only` gives it, from its own kept copy, so reading
    it costs what the devices that drift weigh, not the fleet."""
    stored = _stored(db, "drift.report" if every_device else "drift.summary")
    if stored is None and not every_device:  # kept by an edgeops from before the summary
        stored = [drifting_only(v) for v in _stored(db, "drift.report") or []]
    versions = [v for v in stored or [] if model is None or v["model"] == model]
    if model is not None and not versions:
        raise _unknown_model(db, model)
    return {"alpha": ALPHA, "psi_floor": PSI_FLOOR, "persistence": f"{PERSISTENT} of the last {RECENT} windows",
            "versions": versions}


def drifting_only(version: dict[str, Any]) -> dict[str, Any]:
    """A version of `report()` listing only its devices whose status is not ok, with `device_statuses`
    counting all of them per status: its size follows the devices that drift, not the fleet."""
    statuses = Counter(d["status"] for d in version["devices"].values())
    return {**version, "devices": {name: d for name, d in version["devices"].items() if d["status"] != OK},
            "device_statuses": dict(sorted(statuses.items()))}


def flagged(db: sqlite_utils.Database) -> list[dict[str, Any]]:
    """Model versions whose status is "retraining recommended", with the devices whose drift persists:
    what the fleet's on-drift hook acts on."""
    stored = _stored(db, "drift.flags")
    return [] if stored is None else stored["flagged"]


def retraining(db: sqlite_utils.Database, model: str) -> set[tuple[str, str]] | None:
    """(version, device) pairs of `model` whose drift persists ("retraining recommended"), for the
    rollout engine's drift gate; None without drift telemetry from the model."""
    stored = _stored(db, "drift.flags")
    if stored is None or model not in stored["retraining"]:
        return None
    return {(version, device) for version, device in stored["retraining"][model]}


def _newest_with_samples(db: sqlite_utils.Database, model: str) -> str | None:
    """The version whose latest captured sample is the most recent."""
    row = next(_select(db, "version", ("sample",), model, tail="GROUP BY version ORDER BY MAX(t) DESC LIMIT 1"), None)
    return None if row is None else row[0]


def _stacked(bodies: list[Any]) -> tuple[dict[str, np.ndarray], int]:
    """Distinct decodable samples stacked per input name (first axis = samples), keeping the most common
    layout (names, shapes, dtypes); returns the arrays and how many records were not used (duplicates,
    undecodable, other layouts)."""
    samples = {}
    for body in bodies:
        try:
            if isinstance(body, dict) and isinstance(body.get("npz"), str) and body["npz"] not in samples:
                samples[body["npz"]] = decode_sample(body)
        except EdgeopsError:
            continue
    layouts = Counter(_layout(s) for s in samples.values())
    if not layouts:
        return {}, len(bodies)
    layout = layouts.most_common(1)[0][0]
    kept = [s for s in samples.values() if _layout(s) == layout]
    return {name: np.stack([s[name] for s in kept]) for name, _, _ in layout}, len(bodies) - len(kept)


def _layout(sample: dict[str, np.ndarray]) -> tuple:
    return tuple((name, array.shape, array.dtype.str) for name, array in sorted(sample.items()))


def export(db: sqlite_utils.Database, model: str, version: str | None, outdir: Path) -> dict[str, Any]:
    """Write a retraining dataset to `outdir`: `samples.npz` (the captured inputs of a model version,
    stacked per input name like the compiler's data files) and `summaries.json` (its drift report).
    `version` None takes the newest version with captured samples."""
    if next(_select(db, "1", ("drift", "sample"), model, tail="LIMIT 1"), None) is None:
        raise _unknown_model(db, model)
    version = version if version is not None else _newest_with_samples(db, model)
    bodies = [_load(row[0]) for row in _select(db, "body", ("sample",), model, version)] if version is not None else []
    arrays, unused = _stacked(bodies)
    if not arrays:
        raise EdgeopsError(f"no usable captured samples from model {model!r}"
                           f"{'' if version is None else f' version {version!r}'}: enable sample capture on its "
                           "devices and export again after they have reported")
    summary = next(v for v in report(db, model)["versions"] if v["version"] == version)
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    atomic_write(outdir / "samples.npz", npz_bytes(arrays))
    atomic_write(outdir / "summaries.json", canonical_json(summary))
    count = len(next(iter(arrays.values())))
    return {"model": model, "version": version, "samples": count, "unused": unused,
            "inputs": {name: list(array.shape[1:]) for name, array in arrays.items()},
            "files": [str(outdir / "samples.npz"), str(outdir / "summaries.json")], "status": summary["status"]}
