"""The rollout engine: which device runs which release, stage by stage, gated by health.

Every release has one rollout (same id) that moves devices to it in stages (fleet/plan.py). `tick`
runs every second in the fleet server: it times out silent devices, assigns devices while the
current stage has room (devices that enroll or come online later join at the current stage), and
advances a stage once all its devices settled, the bake time passed and the health gates hold on
the minimum sample. Install failures past the abort criteria, or a failing gate, pause the rollout
or roll it back, as its plan says. Operators act through `act` (pause, resume, abort, rollback).

Invariants:
- Only this module writes `devices.desired_release`, always bumping `desired_seq` with it, in the
  same transaction as the decision that caused it; every decision is a `decisions` row with its reason.
- A device is assigned to a rollout at most once (its executions row), only while online, and only
  to a rollout newer than the one it is assigned to; a rollout never holds more devices than its
  current stage's quota, cancelled ones aside.
- Rolling back returns each device whose desired release is the rollout's to its previous release:
  the newest earlier one it reported active. A device without one keeps what it has.
- The engine's state is the database: a restarted fleet server continues where it stopped.

The fleet decides; devices only report (docs/protocol.md, "What the fleet does with a report that
disagrees with its records"):
- An `executions` row is created only here, when the engine assigns a device to a rollout; it is
  the fleet's record that the device is a member. A device's `state` report can move the state of a
  row the engine created (`report_verdict`), never create one: a claimed release the fleet did not
  assign to that device is an anomaly (registry.record_reports), counted nowhere.
- So every count of a rollout (quota, install success, the devices whose calls the gates read) is
  over the devices the engine assigned, whatever other devices say about themselves.
- The gates read a device's inference records only for versions the fleet assigned to it: the
  rollout's version on its active members, and for the baseline, the versions of earlier releases of
  the model that device was assigned. A record naming another version is the device's own
  telemetry (its summaries and series show it), never evidence about a rollout.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections import Counter
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Callable

import numpy as np
import sqlite_utils

from edgeops.fleet import derived
from edgeops.fleet.plan import IN_FLIGHT, Plan
from edgeops.fleet.sql import transaction
from edgeops.protocol.errors import EdgeopsError
from edgeops.protocol.wire import STATES

log = logging.getLogger(__name__)

ROLLOUT_STATES = ("running", "paused", "completed", "aborted", "rolled-back", "superseded")
OPEN = ("running", "paused")
FAILED = ("failed", "rejected", "timed-out")
SETTLED = ("active", *FAILED)
CLOSED = ("rolled-back", "cancelled")  # the engine's final word on an execution
# What a device may report; `queued` and the rest are the engine's.
DEVICE_STATES = (*(s for s in IN_FLIGHT if s != "queued"), "active", "failed", "rejected")
ACTIONS = ("pause", "resume", "abort", "rollback")
BASELINE_S = 7 * 86400  # how far back the previous version's telemetry counts as its baseline


def create_tables(db: sqlite_utils.Database) -> None:
    db.execute("create table if not exists rollouts (id integer primary key, model text not null, state text not null, "
               "plan text not null, stage integer not null, stage_settled_at real, created_at real not null, "
               "updated_at real not null)")
    db.execute("create table if not exists decisions (id integer primary key, rollout integer not null, t real not null, "
               "actor text not null, action text not null, reason text not null)")
    db.execute("create index if not exists decisions_by_rollout on decisions (rollout, id)")
    db.execute("create index if not exists executions_by_release on executions (release_id, state, device)")
    db.execute("create index if not exists devices_by_labels on devices (profile, labels)")  # _Fleet's groups


# ------------------------------------------------------------------------------------------ records

@dataclass
class _Rollout:
    id: int
    model: str
    version: str
    selector: dict[str, str]
    profiles: tuple[str, ...]
    state: str
    plan: Plan
    stage: int
    stage_settled_at: float | None
    created_at: float
    updated_at: float


@dataclass(slots=True)
class _Device:
    id: str
    profile: str
    labels: dict[str, str]
    online: bool
    desired_release: int | None


@dataclass(frozen=True)
class Gate:
    name: str
    value: str
    threshold: str
    ok: bool | None  # None: not enough data yet
    detail: str = ""


def _rollouts(db: sqlite_utils.Database, where: str = "1", args: list | None = None) -> list[_Rollout]:
    rows = db.execute(
        "select o.id, o.model, r.version, r.selector, o.state, o.plan, o.stage, o.stage_settled_at, o.created_at, "
        "o.updated_at, (select group_concat(profile, ' ') from release_targets t where t.release_id = o.id) "
        f"from rollouts o join releases r on r.id = o.id where {where} order by o.id desc", args or []).fetchall()
    return [_Rollout(row[0], row[1], row[2], json.loads(row[3]), tuple(sorted((row[10] or "").split())), row[4],
                     Plan.from_dict(json.loads(row[5])), *row[6:10]) for row in rows]


class _Fleet:
    """The devices rollouts draw from, read at most once per engine round or view, and only as far as
    asked: counting a rollout's targeted devices needs one row per (profile, labels) group, not one
    per device; the devices themselves are read only when one may be assigned."""

    def __init__(self, db: sqlite_utils.Database) -> None:
        self.db = db
        self._labels: dict[str, dict[str, str]] = {}  # devices share a few label sets: parse each once (read-only)

    def _parse(self, text: str) -> dict[str, str]:
        return self._labels.get(text) or self._labels.setdefault(text, json.loads(text))

    @cached_property
    def devices(self) -> list[_Device]:
        return [_Device(row[0], row[1], self._parse(row[2]), bool(row[3]), row[4]) for row in
                self.db.execute("select id, profile, labels, online, desired_release from devices order by id")]

    @cached_property
    def _groups(self) -> list[tuple[str, dict[str, str], int]]:
        return [(profile, self._parse(labels), n) for profile, labels, n in
                self.db.execute("select profile, labels, count(*) from devices group by profile, labels")]

    def targeted(self, r: _Rollout) -> list[_Device]:
        return [d for d in self.devices if d.profile in r.profiles and (not r.selector or _matches(r.selector, d.labels))]

    def count_targeted(self, r: _Rollout) -> int:
        return sum(n for profile, labels, n in self._groups if profile in r.profiles and _matches(r.selector, labels))


def _get(db: sqlite_utils.Database, rollout_id: int) -> _Rollout:
    found = _rollouts(db, "o.id = ?", [rollout_id])
    if not found:
        raise EdgeopsError(f"no rollout {rollout_id}; `edgeops status` lists them")
    return found[0]


def _decide(db: sqlite_utils.Database, rollout_id: int, actor: str, action: str, reason: str, now: float) -> None:
    db.execute("insert into decisions (rollout, t, actor, action, reason) values (?, ?, ?, ?, ?)",
               [rollout_id, now, actor, action, reason])
    log.info("rollout %d: %s by %s: %s", rollout_id, action, actor, reason)


def record(db: sqlite_utils.Database, rollout_id: int, action: str, reason: str, actor: str = "engine") -> None:
    """Record a decision taken outside the engine's round (e.g. the server withdrawing a bundle)."""
    with transaction(db):
        _decide(db, rollout_id, actor, action, reason, time.time())


def _set_state(db: sqlite_utils.Database, rollout_id: int, now: float, **fields: Any) -> None:
    sets = ", ".join(f"{name} = ?" for name in fields)
    db.execute(f"update rollouts set {sets}, updated_at = ? where id = ?", [*fields.values(), now, rollout_id])


def _set_desired(db: sqlite_utils.Database, device_id: str, release_id: int | None) -> None:
    db.execute("update devices set desired_release = ?, desired_seq = (select coalesce(max(desired_seq), 0) + 1 "
               "from devices) where id = ?", [release_id, device_id])


def _previous(db: sqlite_utils.Database, device_id: str, release_id: int) -> int | None:
    """The newest release before `release_id` that the device reported active: where a rollback takes it."""
    return db.execute("select max(release_id) from executions where device = ? and release_id < ? and state = 'active'",
                      [device_id, release_id]).fetchone()[0]


def report_verdict(reported: str, stored: str | None, release: int, desired: int | None) -> str:
    """What to do with a device's report that its execution of `release` is in state `reported`:
    "apply" it to the fleet's row, "ignore" it, or record an "anomaly". `stored` is the state of the
    fleet's row for (device, release), None when the engine never assigned that release to the
    device; `desired` is the release the fleet assigned it now.

    - never assigned, or a state only the engine sets (rolled-back, timed-out, cancelled): anomaly;
    - the fleet closed the row (rolled-back, cancelled): ignore, a late report does not undo it;
    - the release it is assigned now, or a row still in flight (late progress of a release it was
      moved off): apply;
    - a settled row of a release it is no longer assigned: ignore the same outcome again, and a
      different one is an anomaly (what a replayed or forged `desired` makes an agent report).
    """
    if stored is None or reported not in DEVICE_STATES:
        return "anomaly"
    if stored in CLOSED:
        return "ignore"
    if release == desired or stored in IN_FLIGHT:
        return "apply"
    return "ignore" if reported == stored else "anomaly"


def _matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


# ------------------------------------------------------------------------------------------ changes

def start(db: sqlite_utils.Database, release_id: int, model: str, plan: Plan) -> None:
    """Create the rollout of a new release, inside the caller's transaction; unfinished rollouts of
    the same model are superseded (their queued devices cancelled, the rest keep what they have)."""
    now = time.time()
    for older in _rollouts(db, "o.model = ? and o.state in ('running', 'paused')", [model]):
        _close(db, older, "superseded", f"superseded by rollout {release_id}", "engine", now, revert=False)
    db.execute("insert into rollouts (id, model, state, plan, stage, stage_settled_at, created_at, updated_at) "
               "values (?, ?, 'running', ?, 0, null, ?, ?)", [release_id, model, json.dumps(plan.to_dict()), now, now])
    _decide(db, release_id, "operator", "start",
            f"stages {','.join(s.label for s in plan.stages)}, bake {plan.bake_s:g}s, min {plan.min_calls} calls, "
            f"abort {plan.abort} -> {plan.on_failure}", now)


def act(db: sqlite_utils.Database, rollout_id: int, action: str, reason: str = "", actor: str = "operator") -> dict[str, Any]:
    """An operator's pause, resume, abort or rollback; EdgeopsError when the rollout's state does not allow it."""
    if action not in ACTIONS:
        raise EdgeopsError(f"unknown action {action!r}; one of {', '.join(ACTIONS)}")
    now = time.time()
    with transaction(db):
        r = _get(db, rollout_id)
        allowed = {"pause": ("running",), "resume": ("paused",), "abort": OPEN, "rollback": ROLLOUT_STATES}[action]
        if action == "rollback" and r.state == "rolled-back":  # done; the caller may still withdraw its bundles
            return summary(db, rollout_id)
        if r.state not in allowed:
            raise EdgeopsError(f"rollout {rollout_id} is {r.state}; {action} applies to {' or '.join(allowed)} rollouts")
        why = reason or "requested by the operator"
        if action == "pause":
            _set_state(db, r.id, now, state="paused")
            _decide(db, r.id, actor, "pause", why, now)
        elif action == "resume":
            _set_state(db, r.id, now, state="running")
            _decide(db, r.id, actor, "resume", why, now)
        else:
            _close(db, r, "aborted" if action == "abort" else "rolled-back", why, actor, now, revert=action == "rollback")
    return summary(db, rollout_id)


def _close(db: sqlite_utils.Database, r: _Rollout, state: str, reason: str, actor: str, now: float, revert: bool) -> None:
    """End a rollout: queued devices are cancelled; with `revert`, devices on it go back to their previous release."""
    action = {"superseded": "supersede", "aborted": "abort", "rolled-back": "rollback"}[state]
    rows = db.execute("select e.device, e.state, d.desired_release from executions e join devices d on d.id = e.device "
                      "where e.release_id = ? and e.state not in ('rolled-back', 'cancelled')", [r.id]).fetchall()
    returned = stayed = 0
    for device_id, execution, desired in rows:
        ran_it = execution not in FAILED and execution != "queued"  # it may have switched to this release
        if execution == "queued" or (revert and ran_it):
            previous = _previous(db, device_id, r.id) if desired == r.id else desired
            note = f"{state}: {reason}"
            if ran_it and previous is None and desired == r.id:
                note += f"; no earlier release to return to, it keeps {r.version}"
            db.execute("update executions set state = ?, reason = ?, updated_at = ? where device = ? and release_id = ?",
                       ["cancelled" if execution == "queued" else "rolled-back", note[:500], now, device_id, r.id])
        elif revert and desired == r.id:  # failed here, so still on its previous release: name that one again
            previous = _previous(db, device_id, r.id)
        else:
            continue
        if desired == r.id:
            _set_desired(db, device_id, previous)
            returned += ran_it and previous is not None
            stayed += ran_it and previous is None
    _set_state(db, r.id, now, state=state)
    extra = f"; {returned} device(s) return to their previous release" if returned else ""
    extra += f"; {stayed} device(s) have no earlier release and keep {r.version}" if stayed else ""
    _decide(db, r.id, actor, action, reason + extra, now)


def tick(db: sqlite_utils.Database, now: float | None = None) -> None:
    """One round of the engine: time-outs, assignments, gate checks, advances. One transaction."""
    now = time.time() if now is None else now
    with transaction(db):
        _time_out(db, now)
        fleet = _Fleet(db)
        live = _rollouts(db, "o.state in ('running', 'completed')")
        for r in live:  # newest first: a device joins the newest rollout that has room for it
            _assign(db, r, fleet, now)
        memo: dict[str, Any] = {}
        for r in live:
            if r.state == "running":
                _evaluate(db, r, fleet, now, memo)


def _time_out(db: sqlite_utils.Database, now: float) -> None:
    plans: dict[int, Plan] = {}
    silent: dict[int, list[str]] = {}
    rows = db.execute("select e.device, e.release_id, e.state, e.updated_at, o.plan from executions e "
                      f"join rollouts o on o.id = e.release_id where o.state in ('running', 'paused', 'completed') "
                      f"and e.state in ({','.join('?' * len(IN_FLIGHT))})",
                      list(IN_FLIGHT)).fetchall()
    for device_id, release_id, state, updated_at, plan in rows:
        limit = plans.setdefault(release_id, Plan.from_dict(json.loads(plan))).deadlines_s[state]
        if now - updated_at > limit:
            db.execute("update executions set state = 'timed-out', reason = ?, updated_at = ? where device = ? and release_id = ?",
                       [f"no report for {limit:g}s while {state}", now, device_id, release_id])
            silent.setdefault(release_id, []).append(f"{device_id} ({state})")
    for release_id, names in silent.items():
        _decide(db, release_id, "engine", "timeout", f"{len(names)} device(s) silent past their deadline: "
                                                     f"{', '.join(names[:5])}{' ...' if len(names) > 5 else ''}", now)


# ---------------------------------------------------------------------------------------- inspection

@dataclass
class _View:
    """A rollout's devices right now: what the engine decides on and what operators see. Counts come
    from one grouped query; the device lists are read only when asked (closed rollouts never need them)."""

    n_targeted: int
    states: Counter[str]  # executions per state, cancelled ones included
    quota: int
    find_executions: Callable[[], dict[str, str]]
    find_eligible: Callable[[], list[_Device]]

    @cached_property
    def executions(self) -> dict[str, str]:
        """Device -> state, cancelled ones included."""
        return self.find_executions()

    @cached_property
    def eligible(self) -> list[_Device]:
        """Targeted, not assigned yet, online, not on a newer release; profiles interleaved."""
        return self.find_eligible()

    @cached_property
    def active(self) -> list[str]:
        return [d for d, s in self.executions.items() if s == "active"]

    @property
    def assigned(self) -> int:
        """Devices on or moving to this release: not cancelled, not rolled back."""
        return sum(self.states.values()) - self.states["cancelled"] - self.states["rolled-back"]

    def count(self, states: tuple[str, ...]) -> int:
        return sum(self.states[s] for s in states)


def _inspect(db: sqlite_utils.Database, r: _Rollout, fleet: _Fleet) -> _View:
    n_targeted = fleet.count_targeted(r)
    states = Counter(dict(db.execute("select state, count(*) from executions where release_id = ? group by state",
                                     [r.id]).fetchall()))
    quota = n_targeted if r.state == "completed" else r.plan.stages[min(r.stage, len(r.plan.stages) - 1)].quota(n_targeted)

    def executions() -> dict[str, str]:
        return dict(db.execute("select device, state from executions where release_id = ?", [r.id]).fetchall())

    def eligible() -> list[_Device]:
        # a device that took part in a newer rollout of this model (even one rolled back) never moves back here
        newer = {row[0] for row in db.execute("select distinct e.device from executions e join rollouts o on o.id = e.release_id "
                                              "where o.model = ? and o.id > ?", [r.model, r.id])}
        found = [d for d in fleet.targeted(r) if d.id not in view.executions and d.id not in newer and d.online
                 and (d.desired_release is None or d.desired_release < r.id)]
        rank: dict[str, int] = {}
        keys = []
        for d in found:  # interleave profiles, so the first stages cover every board the release has a bundle for
            rank[d.profile] = rank.get(d.profile, -1) + 1
            keys.append((rank[d.profile], d.profile, d.id))
        return [d for _, d in sorted(zip(keys, found), key=lambda pair: pair[0])]

    view = _View(n_targeted, states, quota, executions, eligible)  # (eligible reads view.executions)
    return view


def _assign(db: sqlite_utils.Database, r: _Rollout, fleet: _Fleet, now: float) -> None:
    view = _inspect(db, r, fleet)
    room = view.quota - view.assigned
    picked = view.eligible[:room] if room > 0 else []
    for d in picked:
        db.execute("insert into executions (device, release_id, state, reason, updated_at) values (?, ?, 'queued', '', ?)",
                   [d.id, r.id, now])
        _set_desired(db, d.id, r.id)
        d.desired_release = r.id
    if picked and r.state == "running" and r.stage_settled_at is not None:
        _set_state(db, r.id, now, stage_settled_at=None)  # the newcomers bake too
        r.stage_settled_at = None


def health(db: sqlite_utils.Database, r: _Rollout, view: _View, drift_memo: dict[str, Any] | None = None) -> list[Gate]:
    """Install success, then error rate, p95 latency and drift of the new version against the
    versions of the model released before it, on the same devices. `drift_memo` caches drift
    statuses per model across the rollouts of one round."""
    plan, gates = r.plan, []
    settled, failed = view.count(SETTLED), view.count(FAILED)
    need = min(plan.min_devices, view.assigned) or 1
    gates.append(Gate("install success", f"{settled - failed}/{settled} ok",
                      f"failed <= {plan.failed_pct:g}% (after {plan.min_devices} settle)",
                      None if settled < need else 100.0 * failed / settled <= plan.failed_pct))
    active = view.active
    (n_new, new_err, new_p95), (_, old_err, old_p95) = _call_stats(db, r, active)
    enough = n_new >= max(1, plan.min_calls) or (plan.min_calls == 0 and active)
    sample = f"{n_new}/{plan.min_calls} calls"
    if not enough:
        gates.append(Gate("error rate", "-", f"+{plan.gates.max_error_increase:.1%} over previous", None, f"waiting: {sample}"))
        gates.append(Gate("p95 latency", "-", f"x{plan.gates.max_latency_ratio:g} previous", None, f"waiting: {sample}"))
    else:
        limit = old_err + plan.gates.max_error_increase
        gates.append(Gate("error rate", f"{new_err:.1%}", f"<= {limit:.1%} (previous {old_err:.1%})",
                          new_err <= limit + 1e-12, sample))
        if new_p95 is None or old_p95 is None:
            gates.append(Gate("p95 latency", "-" if new_p95 is None else f"{new_p95:.2f} ms", "no baseline", True, sample))
        else:
            bound = old_p95 * plan.gates.max_latency_ratio + plan.gates.latency_slack_ms
            gates.append(Gate("p95 latency", f"{new_p95:.2f} ms", f"<= {bound:.2f} ms (previous {old_p95:.2f} ms)",
                              new_p95 <= bound, sample))
    if plan.gates.drift:
        gates.append(_drift_gate(db, r, active, {} if drift_memo is None else drift_memo))
    return gates


def _call_stats(db: sqlite_utils.Database, r: _Rollout, active: list[str]) -> list[tuple[int, float, float | None]]:
    """(calls, error rate, p95 latency) of the new version and of the versions before it (within
    BASELINE_S of the rollout's start) on the `active` devices, each device's baseline only from the
    versions of earlier releases the fleet assigned to it. They read every such inference record,
    so they are stored (fleet/derived.py) with what they were computed from, and computed again only
    when the active devices changed or inference records of the model arrived since."""
    key = hashlib.sha256(json.dumps([r.id, r.model, r.version, r.created_at, sorted(active)]).encode()).hexdigest()
    name = f"rollout-calls/{r.id}"
    stored = derived.blob(db, name)
    if stored is not None and stored["key"] == key and db.execute(  # (a restored database can go back)
            "select (select coalesce(max(rowid), 0) from telemetry) >= :mark and not exists "
            "(select 1 from telemetry where rowid > :mark and kind = 'inference' and model = :model)",
            {"mark": stored["mark"], "model": r.model}).fetchone()[0]:
        return [tuple(side) for side in stored["stats"]]
    mark = derived.top(db)
    new = _calls(db, r.model, "version = ?", [r.version], active, 0.0)
    old = _calls(db, r.model, "version in (select o.version from executions e join releases o on o.id = e.release_id "
                              "where e.device = telemetry.device and o.model = ? and o.id < ? and o.version != ?)",
                 [r.model, r.id, r.version], active, r.created_at - BASELINE_S)
    stats = [(len(calls), _error_rate(calls), _p95(calls)) for calls in (new, old)]
    with derived.writing(db):
        derived.put_blob(db, name, {"key": key, "mark": mark, "stats": stats})
    return stats


def _calls(db: sqlite_utils.Database, model: str, version_clause: str, args: list, devices: list[str],
           since: float) -> list[tuple[float | None, int]]:
    """(latency_ms, ok) of the inference records of `model` from `devices`."""
    if not devices:
        return []
    marks = ",".join("?" * len(devices))
    return db.execute(f"select json_extract(body, '$.latency_ms'), json_extract(body, '$.ok') from telemetry "
                      f"where kind = 'inference' and model = ? and {version_clause} and t >= ? and device in ({marks})",
                      [model, *args, since, *devices]).fetchall()


def _error_rate(calls: list[tuple[float | None, int]]) -> float:
    return sum(1 for _, ok in calls if not ok) / len(calls) if calls else 0.0


def _p95(calls: list[tuple[float | None, int]]) -> float | None:
    latencies = [lat for lat, ok in calls if ok and isinstance(lat, (int, float))]
    return float(np.percentile(latencies, 95)) if latencies else None


def _drift_gate(db: sqlite_utils.Database, r: _Rollout, active: list[str], memo: dict[str, Any]) -> Gate:
    from edgeops.fleet import drift

    if r.model not in memo:
        memo[r.model] = drift.retraining(db, r.model)
    retraining = memo[r.model]
    if retraining is None:
        return Gate("drift", "no windows", "no device newly drifting", True)
    before = {device for version, device in retraining if version != r.version}
    newly = [d for d in active if (r.version, d) in retraining and d not in before]
    return Gate("drift", f"{len(newly)} device(s) newly drifting", "0 newly drifting", not newly,
                ", ".join(newly[:5]))


def _baked_calls(db: sqlite_utils.Database, r: _Rollout, view: _View) -> int:
    """Inferences on the new version since the current stage settled: each stage's own minimum
    sample (counted by the fleet's clock, which a device's wrong clock cannot fake)."""
    active = view.active
    if r.stage_settled_at is None or not active:
        return 0
    marks = ",".join("?" * len(active))
    return db.execute(f"select count(*) from telemetry where kind = 'inference' and model = ? and version = ? "
                      f"and received_at >= ? and device in ({marks})",
                      [r.model, r.version, r.stage_settled_at, *active]).fetchone()[0]


def _evaluate(db: sqlite_utils.Database, r: _Rollout, fleet: _Fleet, now: float, memo: dict[str, Any]) -> None:
    view = _inspect(db, r, fleet)
    gates = health(db, r, view, memo)
    failing = [g for g in gates if g.ok is False]
    if failing:
        reason = "; ".join(f"{g.name} {g.value}, limit {g.threshold}" for g in failing)
        if r.plan.on_failure == "pause":
            _set_state(db, r.id, now, state="paused")
            _decide(db, r.id, "engine", "pause", f"health gate failed: {reason}", now)
        else:
            _close(db, r, "rolled-back", f"health gate failed: {reason}", "engine", now, revert=True)
        return
    assigned = view.assigned
    if not assigned or view.count(SETTLED) < assigned or (assigned < view.quota and view.eligible):
        return
    if r.stage_settled_at is None:
        _set_state(db, r.id, now, stage_settled_at=now)  # the bake starts now
        return
    if now - r.stage_settled_at < r.plan.bake_s or any(g.ok is None for g in gates) \
            or _baked_calls(db, r, view) < r.plan.min_calls:
        return
    passed = "; ".join(f"{g.name} {g.value}" for g in gates)
    if r.stage >= len(r.plan.stages) - 1:
        _set_state(db, r.id, now, state="completed")
        _decide(db, r.id, "engine", "complete", f"every targeted device reached: {passed}", now)
    else:
        _set_state(db, r.id, now, stage=r.stage + 1, stage_settled_at=None)
        _decide(db, r.id, "engine", "advance", f"stage {r.plan.stages[r.stage].label} -> "
                                               f"{r.plan.stages[r.stage + 1].label}: {passed}", now)


# --------------------------------------------------------------------------------------------- views

def _next(db: sqlite_utils.Database, r: _Rollout, view: _View, gates: list[Gate], now: float) -> str:
    if r.state == "paused":
        return f"paused: `edgeops rollout resume {r.id}` continues it"
    if r.state == "completed":
        return "done; devices that join or come online get it"
    if r.state not in OPEN:
        return r.state
    assigned, settled = view.assigned, view.count(SETTLED)
    if not assigned:
        return "waiting for a targeted device to come online"
    if settled < assigned:
        return f"installing: {settled}/{assigned} devices settled"
    if assigned < view.quota and view.eligible:
        return f"assigning devices ({assigned}/{view.quota})"
    if r.stage_settled_at is None:
        return "starting the bake"
    left = r.plan.bake_s - (now - r.stage_settled_at)
    if left > 0:
        return f"baking: {left:.0f}s left"
    waiting = [g.detail for g in gates if g.ok is None and g.detail]
    if waiting:
        return f"waiting for the minimum sample ({waiting[0]})"
    baked = _baked_calls(db, r, view)
    return "advancing" if baked >= r.plan.min_calls else f"waiting for the minimum sample: {baked}/{r.plan.min_calls} calls in this stage"


def _summarize(db: sqlite_utils.Database, r: _Rollout, fleet: _Fleet, now: float, gated: bool,
               memo: dict[str, Any]) -> dict[str, Any]:
    """`gated`: compute the gates too (costly; worth it for open rollouts and the newest of a model)."""
    view = _inspect(db, r, fleet)
    gates = health(db, r, view, memo) if gated else []
    n_active, n_failed = view.count(("active",)), view.count(FAILED)
    stages = []
    for i, stage in enumerate(r.plan.stages):
        target = stage.quota(view.n_targeted)
        stages.append({"label": stage.label, "target": target, "assigned": min(view.assigned, target),
                       "active": min(n_active, target), "failed": min(n_failed, target),
                       "done": r.state == "completed" or i < r.stage})
    return {"id": r.id, "model": r.model, "version": r.version, "selector": r.selector, "profiles": list(r.profiles),
            "state": r.state, "plan": r.plan.to_dict(), "stage": r.stage, "stages": stages,
            "targeted": view.n_targeted, "counts": {s: view.count((s,)) for s in STATES},
            "gates": [g.__dict__ for g in gates], "created_at": r.created_at, "updated_at": r.updated_at,
            "next": _next(db, r, view, gates, now)}


def summaries(db: sqlite_utils.Database) -> list[dict[str, Any]]:
    """Every rollout, newest first, with stage progress, counts per device state and what comes next; gates
    for the open ones and the newest completed one of each model (older ones: an empty list)."""
    fleet, now, memo, seen = _Fleet(db), time.time(), {}, set()
    found = []
    for r in _rollouts(db):
        gated = r.state in OPEN or (r.state == "completed" and r.model not in seen)
        seen.add(r.model)
        found.append(_summarize(db, r, fleet, now, gated, memo))
    return found


def summary(db: sqlite_utils.Database, rollout_id: int) -> dict[str, Any]:
    """One rollout as in `summaries`, with its decisions."""
    r = _get(db, rollout_id)
    return {**_summarize(db, r, _Fleet(db), time.time(), r.state in (*OPEN, "completed"), {}),
            "decisions": decisions(db, rollout_id)}


def decisions(db: sqlite_utils.Database, rollout_id: int | None = None, limit: int = 50) -> list[dict[str, Any]]:
    """The engine's and operators' decisions, newest first."""
    where, args = ("where rollout = ?", [rollout_id]) if rollout_id is not None else ("", [])
    return [dict(row) for row in db.query(f"select id, rollout, t, actor, action, reason from decisions {where} "
                                          "order by id desc limit ?", [*args, limit])]


def attention(db: sqlite_utils.Database, devices: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Devices an operator should look at: the latest execution failed, or offline while behind, or
    its wall clock is wrong."""
    found = []
    for d in devices:
        execution = d.get("execution")
        if execution and execution["state"] in FAILED:
            found.append({"device": d["id"], "rollout": execution["release_id"],
                          "reason": f"{execution['state']}: {execution['reason']}".rstrip(": ")})
        elif not d["online"] and d.get("desired_release") and (not execution or execution["state"] != "active"
                                                               or execution["release_id"] != d["desired_release"]):
            found.append({"device": d["id"], "rollout": d["desired_release"], "reason": "offline, not on its release yet"})
        if d.get("clock"):  # it keeps serving, but judges expiry by its time floor or freezes updates
            found.append({"device": d["id"], "rollout": None, "reason": f"wall clock {d['clock']}"})
    return found
