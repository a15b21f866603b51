"""The API's request and answer models (pydantic): what fleet/api.py validates every request and
answer against, and what its generated OpenAPI document describes. Models only; no I/O."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from edgeops.fleet import operators, registry
from edgeops.fleet.plan import IN_FLIGHT
from edgeops.protocol.wire import STATES


class Strict(BaseModel):
    """Every field present (maybe null), nothing else."""

    model_config = ConfigDict(extra="forbid")


Labels = dict[str, str]
UnixTime = Annotated[float, Field(description="Unix time.")]


class Error(Strict):
    error: str = Field(description="What was wrong with the request, in one line.")


class Health(Strict):
    status: Literal["ok"]
    version: str


class Execution(Strict):
    device: str
    release_id: int
    state: Literal[STATES]
    reason: str = Field(description="Why it failed or was rejected; empty otherwise.")
    updated_at: UnixTime


class DeviceTelemetry(Strict):
    received: int = Field(description="Records received from the device (each counted once).")
    dropped: int = Field(description="Records the device dropped because its outbox was full.")
    rejected_batches: int | None = Field(None, description="Telemetry batches the fleet refused from it.")
    inferences: int = Field(description="Inference records among its latest 1000 records of that kind.")
    errors: int = Field(description="Failed inferences among those.")
    p95_ms: float | None = Field(description="95th percentile runtime latency over those.")
    metrics: dict[str, Any] | None = Field(description="Its latest device metrics sample (docs/protocol.md).")


class Anomaly(Strict):
    """A report of the device that disagreed with the fleet's records (fleet/registry.py)."""

    claimed: str
    assigned: str
    first_at: UnixTime
    last_at: UnixTime
    count: int


class DeviceAnomaly(Anomaly):
    device: str


class Device(Strict):
    id: str
    profile: str
    labels: Labels
    enrolled_at: UnixTime
    last_seen: float | None = Field(description="Unix time; null before the device's first report.")
    online: bool
    installed_model: str | None
    installed_version: str | None
    installed_target: str | None
    slot: str | None
    execution: Execution | None = Field(description="The latest execution.")
    telemetry: DeviceTelemetry | None = Field(description="What the device's telemetry says; null before any arrived.")
    desired_release: int | None = Field(description="The release the rollout engine chose for it.")
    clock: str | None = Field(description="Why the device's wall clock is wrong; null while it is right.")
    anomaly: Anomaly | None = Field(None, description="Its latest report that disagreed with the fleet's records.")


class DesiredRelease(Strict):
    release_id: int
    model: str
    version: str
    target: str = Field(description="The bundle built for the device's profile.")
    sha256: str
    length: int


class DeviceDetail(Device):
    desired: DesiredRelease | None = Field(description="The release the rollout engine chose for it, with its bundle.")
    history: list[Execution] = Field(description="Its executions, newest release first.")


class DevicePage(Strict):
    devices: list[Device]
    next: str | None = Field(description="The id to pass as `after` for the next page; null on the last page.")
    total: int = Field(description="Devices matching the filters, in all pages.")


class ReleaseTarget(Strict):
    release_id: int
    profile: str
    target: str
    sha256: str
    length: int


class Release(Strict):
    id: int
    model: str
    version: str
    selector: Labels
    created_at: UnixTime
    targets: list[ReleaseTarget]


class Releases(Strict):
    releases: list[Release]


class Created(Strict):
    release: int


class Stage(Strict):
    label: str
    target: int = Field(description="Devices this stage covers, cumulative.")
    assigned: int
    active: int
    failed: int
    done: bool


class Gate(Strict):
    name: Literal["install success", "error rate", "p95 latency", "drift"]
    value: str
    threshold: str
    ok: bool | None = Field(description="null: not enough data yet (the minimum sample).")
    detail: str


class Decision(Strict):
    id: int
    rollout: int
    t: UnixTime
    actor: Literal["engine", "operator"]
    action: Literal["start", "advance", "pause", "resume", "abort", "rollback", "complete", "supersede", "timeout",
                    "withdraw"]
    reason: str


class Abort(Strict):
    failed_pct: float
    min_devices: int


class Gates(Strict):
    max_error_increase: float
    max_latency_ratio: float
    latency_slack_ms: float
    drift: bool


class Plan(Strict):
    """The rollout plan (docs/rollouts.md)."""

    stages: list[str]
    bake_s: float
    min_calls: int
    abort: Abort
    on_failure: Literal["rollback", "pause"]
    gates: Gates
    deadlines_s: dict[str, float]


class Rollout(Strict):
    id: int = Field(description="The same as its release's id.")
    model: str
    version: str
    selector: Labels
    profiles: list[str]
    state: Literal["running", "paused", "completed", "aborted", "rolled-back", "superseded"]
    plan: Plan
    stage: int = Field(description="Index of the current stage.")
    stages: list[Stage]
    targeted: int = Field(description="Devices matching the selector, with a bundle for their profile.")
    counts: dict[str, int] = Field(description="Devices per execution state.")
    gates: list[Gate]
    created_at: UnixTime
    updated_at: UnixTime
    next: str = Field(description="What the engine waits for next.")


class RolloutDetail(Rollout):
    decisions: list[Decision]


class Rollouts(Strict):
    rollouts: list[Rollout]


class DeviceCounts(Strict):
    total: int
    online: int
    states: dict[str, int] = Field(description="Devices per state of their latest execution (none: no report yet).")


class Attention(Strict):
    device: str
    rollout: int | None
    reason: str


class DriftFlag(Strict):
    model: str
    version: str
    status: str
    devices: list[str]


class Status(Strict):
    """Sections the registry adds beyond these pass through undocumented (`additionalProperties`)."""

    model_config = ConfigDict(extra="allow")
    devices: list[Device] = Field(description=f"Every device up to {registry.LISTED} of them; past that, those that "
                                              "need attention (GET /v1/devices pages through them all).")
    device_counts: DeviceCounts
    releases: list[Release]
    rollouts: list[Rollout] = Field(description="Newest first.")
    decisions: list[Decision] = Field(description="The latest 50, newest first.")
    attention: list[Attention]
    drift: list[DriftFlag]
    anomalies: list[DeviceAnomaly] = Field([], description="The latest reports that disagreed with the fleet's "
                                                           "records, newest first.")


class Series(Strict):
    bucket_s: int
    versions: list[dict[str, Any]] = Field(description="Per model version: points of calls, errors, error_rate, "
                                                       "p95_ms, drift_windows and drift_alarms per bucket.")


class DriftReport(BaseModel):
    """The drift report (fields: docs/drift.md)."""

    alpha: float
    psi_floor: float
    persistence: str
    versions: list[dict[str, Any]]


class Whoami(Strict):
    name: str | None = Field(description="The operator the token belongs to; null without a token.")
    role: Literal[operators.ROLES] | None
    reads_open: bool = Field(description="Whether reads need no token on this server.")


class AuditEntry(Strict):
    t: UnixTime
    actor: str = Field(description="An operator's name, `cli:<os user>`, or `engine` for the rollout engine.")
    action: str
    object: str
    result: str = Field(description="`ok`, or `error: ...` (with the HTTP status for refused API requests).")
    detail: str


class AuditLog(Strict):
    entries: list[AuditEntry] = Field(description="Newest first.")


class OperatorInfo(Strict):
    name: str
    role: Literal[operators.ROLES]
    created_at: UnixTime
    revoked_at: float | None


class Operators(Strict):
    operators: list[OperatorInfo]


class NewOperator(Strict):
    name: Annotated[str, Field(pattern=f"^{operators.NAME.pattern}$", examples=["alice"])]
    role: Literal[operators.ROLES]


class IssuedToken(Strict):
    name: str
    role: Literal[operators.ROLES]
    token: str = Field(description="Shown this once; the fleet keeps only its hash.")


class ActionRequest(Strict):
    reason: Annotated[str, Field(max_length=300, description="Why, for the decision log.")] = ""


Duration = Annotated[str | float, Field(description="Seconds, or e.g. 30s, 10m, 2h.", examples=["10m", 90])]


class GateSettings(Strict):
    max_error_increase: float | None = None
    max_latency_ratio: float | None = None
    latency_slack_ms: float | None = None
    drift: bool | None = None


class PlanSettings(Strict):
    """Rollout plan settings, as in a plan file (docs/rollouts.md); absent ones take the defaults."""

    stages: str | list[str | int | float] | None = None
    bake: Duration | None = None
    deadline: Duration | None = None
    min_calls: Annotated[int, Field(ge=0)] | None = None
    abort: str | None = None
    on_failure: Literal["rollback", "pause"] | None = None
    gates: GateSettings | None = None
    deadlines: dict[Literal[IN_FLIGHT], Duration] | None = None


class Revoked(Strict):
    device: str
    certificates: int = Field(description="How many of its certificates went onto the CRL.")
