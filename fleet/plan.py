"""Rollout plans: how a release goes out (stages, bake time, minimum sample, abort criteria, health
gates, per-state deadlines), parsed from `edgeops push` options or a TOML file kept in git.

Syntax (docs/rollouts.md):
    stages      "1dev,10%,50%,100%": a count of devices ("3dev") or a percentage of the targeted
                devices ("10%" or plain "10"); cumulative, increasing, the last one 100%
    bake        "10m": how long a stage's devices run the new version, all settled, before the next
    min_calls   inferences on the new version before its health gates count, and again during
                each stage's bake before that stage advances
    abort       "failed>5%,min=5": install failures (failed, rejected, timed-out) above 5% of the
                settled devices, once 5 have settled (or all of a smaller rollout), abort it
    on_failure  "rollback" (the updated devices go back to their previous release) or "pause"

Invariants: a Plan is validated when made, so the engine never meets a bad one; `to_dict` and
`from_dict` round-trip exactly (the registry stores plans as JSON); defaults are the safe ones.
"""

from __future__ import annotations

import math
import re
import tomllib
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from edgeops.protocol.errors import EdgeopsError

DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
UNITS = {"ms": 0.001, "s": 1, None: 1, "m": 60, "h": 3600, "d": 86400}
STAGE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(%|dev|devs|devices)?\s*$")
# Bounded digits: int() refuses numbers over 4,300 digits with a ValueError, and no fleet needs more.
ABORT = re.compile(r"^\s*failed\s*>\s*(\d{1,9}(?:\.\d{1,9})?)\s*%\s*(?:,\s*min\s*=\s*(\d{1,9})\s*)?$")
IN_FLIGHT = ("queued", "downloading", "verifying", "installing", "self-test")
DEFAULT_DEADLINES = {"queued": 600.0, "downloading": 1800.0, "verifying": 600.0, "installing": 600.0, "self-test": 600.0}
ON_FAILURE = ("rollback", "pause")


def _names(keys) -> str:
    """Keys for a one-line message: as written, or quoted when they hold a newline or another control."""
    return ", ".join(k if isinstance(k, str) and k.isprintable() else repr(k) for k in keys)


def parse_duration(text: str | int | float, what: str) -> float:
    """Seconds from "90", "90s", "10m", "1.5h", "2d" (or a number of seconds)."""
    if isinstance(text, (int, float)) and not isinstance(text, bool) and text >= 0:
        try:
            return float(text)
        except OverflowError:  # TOML integers are unbounded in tomllib
            raise EdgeopsError(f"{what} of {len(str(text))} digits is too long a duration") from None
    match = DURATION.match(text) if isinstance(text, str) else None
    if not match:
        raise EdgeopsError(f"{what} {text!r} is not a duration; write e.g. 30s, 10m, 2h")
    return float(match.group(1)) * UNITS[match.group(2)]


@dataclass(frozen=True)
class Stage:
    label: str  # as the operator wrote it, normalized: "3dev" or "10%"
    count: int | None = None
    percent: float | None = None

    @classmethod
    def parse(cls, text: str | int | float) -> "Stage":
        match = STAGE.match(str(text))
        if not match:
            raise EdgeopsError(f"stage {text!r} must be a percentage (10% or 10) or a count of devices (3dev)")
        value, unit = float(match.group(1)), match.group(2)
        if unit in ("dev", "devs", "devices"):
            if not math.isfinite(value) or value != int(value) or value < 1:  # "1"*400 + "dev" is inf
                raise EdgeopsError(f"stage {text!r}: a count of devices is a whole number, at least 1")
            return cls(f"{int(value)}dev", count=int(value))
        if not 0 < value <= 100:
            raise EdgeopsError(f"stage {text!r}: a percentage is above 0 and at most 100")
        return cls(f"{value:g}%", percent=value)

    def quota(self, targeted: int) -> int:
        """How many of `targeted` devices this stage covers (at least one, when there are any)."""
        if self.count is not None:
            return min(self.count, targeted)
        return min(targeted, max(1, math.ceil(self.percent * targeted / 100 - 1e-9))) if targeted else 0


@dataclass(frozen=True)
class Gates:
    """Health of the new version against the previous one, on the same devices."""

    max_error_increase: float = 0.01  # error rate may rise by at most this (0.01 = 1 point)
    max_latency_ratio: float = 1.5  # p95 latency at most this times the previous version's ...
    latency_slack_ms: float = 1.0  # ... plus this, so microsecond-scale noise never trips it
    drift: bool = True  # fail when the new version drifts on devices where the previous one did not


@dataclass(frozen=True)
class Plan:
    stages: tuple[Stage, ...] = (Stage("1dev", count=1), Stage("10%", percent=10.0), Stage("50%", percent=50.0),
                                 Stage("100%", percent=100.0))
    bake_s: float = 600.0
    min_calls: int = 100
    failed_pct: float = 5.0
    min_devices: int = 5
    on_failure: str = "rollback"
    gates: Gates = field(default_factory=Gates)
    deadlines_s: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_DEADLINES))

    def __post_init__(self) -> None:
        if not self.stages:
            raise EdgeopsError("a rollout needs at least one stage")
        if self.stages[-1].percent != 100:
            raise EdgeopsError(f"the last stage must be 100% (every targeted device), not {self.stages[-1].label}")
        for before, after in zip(self.stages, self.stages[1:]):
            if (before.percent is not None and after.percent is not None and after.percent <= before.percent) or \
                    (before.count is not None and after.count is not None and after.count <= before.count):
                raise EdgeopsError(f"stages must grow: {after.label} after {before.label}")
        if self.on_failure not in ON_FAILURE:
            raise EdgeopsError(f"on_failure must be rollback or pause, not {self.on_failure!r}")
        if not isinstance(self.min_calls, int) or isinstance(self.min_calls, bool) or self.min_calls < 0:
            raise EdgeopsError(f"min_calls {self.min_calls!r} must be a whole number >= 0")
        if not isinstance(self.min_devices, int) or isinstance(self.min_devices, bool) or self.min_devices < 1:
            raise EdgeopsError(f"abort min {self.min_devices!r} must be a whole number >= 1")
        if not 0 <= self.failed_pct <= 100:
            raise EdgeopsError(f"abort failed% {self.failed_pct:g} must be from 0 to 100 (100: failures never abort)")
        if self.bake_s < 0:
            raise EdgeopsError(f"bake {self.bake_s:g}s must be >= 0")
        unknown = set(self.deadlines_s) - set(IN_FLIGHT)
        if unknown:
            raise EdgeopsError(f"deadlines name unknown state(s) {_names(sorted(unknown))}; states: {', '.join(IN_FLIGHT)}")
        if any(v <= 0 for v in self.deadlines_s.values()):
            raise EdgeopsError("deadlines must be above zero")
        object.__setattr__(self, "deadlines_s", {**DEFAULT_DEADLINES, **self.deadlines_s})

    @property
    def abort(self) -> str:
        return f"failed>{self.failed_pct:g}%,min={self.min_devices}"

    def to_dict(self) -> dict[str, Any]:
        return {"stages": [s.label for s in self.stages], "bake_s": self.bake_s, "min_calls": self.min_calls,
                "abort": {"failed_pct": self.failed_pct, "min_devices": self.min_devices},
                "on_failure": self.on_failure, "gates": asdict(self.gates), "deadlines_s": dict(self.deadlines_s)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Plan":
        return cls(stages=tuple(Stage.parse(s) for s in data["stages"]), bake_s=data["bake_s"],
                   min_calls=data["min_calls"], failed_pct=data["abort"]["failed_pct"],
                   min_devices=data["abort"]["min_devices"], on_failure=data["on_failure"],
                   gates=Gates(**data["gates"]), deadlines_s=data["deadlines_s"])


def parse_abort(text: str) -> tuple[float, int]:
    """`failed>5%,min=5` as (5.0, 5); min defaults to 1."""
    match = ABORT.match(text) if isinstance(text, str) else None
    if not match:
        raise EdgeopsError(f"abort criteria {text!r} must look like failed>5%,min=5")
    return float(match.group(1)), int(match.group(2) or 1)


def make_plan(base: Plan | None = None, *, stages: str | list | None = None, bake: str | float | None = None,
              min_calls: int | None = None, abort: str | None = None, on_failure: str | None = None,
              deadline: str | float | None = None, gates: dict[str, Any] | None = None,
              deadlines: dict[str, Any] | None = None) -> Plan:
    """`base` (default: the safe defaults) with the given settings replaced; EdgeopsError naming a bad one."""
    plan = base or Plan()
    changes: dict[str, Any] = {}
    if stages is not None:
        if not isinstance(stages, (str, list, tuple)):
            raise EdgeopsError(f"stages {stages!r} must be a list of stages, e.g. 1dev,10%,100%")
        items = stages.split(",") if isinstance(stages, str) else list(stages)
        changes["stages"] = tuple(Stage.parse(s) for s in items if str(s).strip())
    if bake is not None:
        changes["bake_s"] = parse_duration(bake, "bake")
    if min_calls is not None:
        changes["min_calls"] = min_calls
    if abort is not None:
        changes["failed_pct"], changes["min_devices"] = parse_abort(abort)
    if on_failure is not None:
        changes["on_failure"] = on_failure
    if deadline is not None:
        changes["deadlines_s"] = dict.fromkeys(IN_FLIGHT, parse_duration(deadline, "deadline"))
    if deadlines is not None:
        if not isinstance(deadlines, dict):
            raise EdgeopsError(f"deadlines {deadlines!r} must map install states to durations, e.g. downloading = \"1h\"")
        changes["deadlines_s"] = {**changes.get("deadlines_s", plan.deadlines_s),
                                  **{k: parse_duration(v, f"deadline of {k}") for k, v in deadlines.items()}}
    if gates is not None:
        changes["gates"] = _gates(plan.gates, gates)
    return replace(plan, **changes)


def _gates(base: Gates, given: dict[str, Any]) -> Gates:
    if not isinstance(given, dict):
        raise EdgeopsError(f"gates {given!r} must map gate settings to values, e.g. drift = false")
    known = set(asdict(base))
    unknown = set(given) - known
    if unknown:
        raise EdgeopsError(f"unknown gate setting(s) {_names(sorted(unknown))}; known: {', '.join(sorted(known))}")
    for name, value in given.items():
        expected = bool if name == "drift" else (int, float)
        if not isinstance(value, expected) or (name != "drift" and (isinstance(value, bool) or value < 0)):
            raise EdgeopsError(f"gate {name} must be {'true or false' if name == 'drift' else 'a number >= 0'}")
    return replace(base, **given)


PLAN_KEYS = ("stages", "bake", "min_calls", "abort", "on_failure", "deadline", "gates", "deadlines")


def load_plan(path: str | Path) -> Plan:
    """A plan from a TOML file: its `[rollout]` table (or the top level), keys as in `make_plan`."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except OSError as exc:
        raise EdgeopsError(f"cannot read plan {path}: {exc.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise EdgeopsError(f"plan {path} is not valid TOML: {exc}") from None
    table = data.get("rollout", data)
    if not isinstance(table, dict):
        raise EdgeopsError(f"plan {path}: rollout {table!r} must be a table ([rollout])")
    unknown = sorted(set(table) - set(PLAN_KEYS))
    if unknown:
        raise EdgeopsError(f"plan {path}: unknown key(s) {_names(unknown)}; known: {', '.join(PLAN_KEYS)}")
    try:
        return make_plan(**table)
    except (TypeError, AttributeError) as exc:
        raise EdgeopsError(f"plan {path}: {exc}") from None
    except EdgeopsError as exc:
        raise EdgeopsError(f"plan {path}: {exc}") from None
