"""The OpenAPI 3.1 description of the fleet's HTTP API (edgeops.fleet.api), written by hand.

Invariants (checked by tests/test_fleet_api.py): `DOCUMENT["paths"]` lists exactly the routes of
`edgeops.fleet.api.ROUTES`, and every answer the server gives conforms to the schema documented for
it: response objects list all their fields as required and allow no others.
"""

from __future__ import annotations

from typing import Any

from edgeops import __version__
from edgeops.fleet.plan import IN_FLIGHT
from edgeops.fleet.registry import DEFAULT_PAGE, LISTED, MAX_PAGE
from edgeops.protocol.wire import STATES

_NULLABLE_STRING = {"type": ["string", "null"]}
_LABELS = {"type": "object", "additionalProperties": {"type": "string"}, "examples": [{"site": "lab"}]}
_DURATION = {"type": ["string", "number"], "minimum": 0, "description": "Seconds, or e.g. 30s, 10m, 2h.",
             "examples": ["10m", 90]}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _object(properties: dict[str, Any]) -> dict[str, Any]:
    """A response object: every property present (maybe null), nothing else."""
    return {"type": "object", "properties": properties, "required": sorted(properties), "additionalProperties": False}


def _json(description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _error(description: str) -> dict[str, Any]:
    return _json(description, _ref("Error"))


_OTHER = {"default": _error("Any other failure: 404 unknown path, 405 wrong method, 500 server fault (logged).")}
_AUTHED = {"401": _error("Missing or wrong bearer token."), **_OTHER}
_OPEN = {"401": _error("A bearer token was sent and is wrong (reads need none)."), **_OTHER}


def _read(summary: str, description: str, schema: dict[str, Any], **errors: dict[str, Any]) -> dict[str, Any]:
    return {"get": {"summary": summary, "security": [], "responses": {"200": _json(description, schema), **errors, **_OPEN}}}


def _file(summary: str, content_type: str, description: str) -> dict[str, Any]:
    return {"get": {"summary": summary, "security": [], "responses": {
        "200": {"description": description, "content": {content_type: {"schema": {"type": "string"}}}}, **_OPEN}}}


_SCHEMAS: dict[str, Any] = {
    "Error": _object({"error": {"type": "string", "description": "What was wrong with the request, in one line."}}),
    "Health": _object({"status": {"const": "ok"}, "version": {"type": "string"}}),
    "Execution": _object({
        "device": {"type": "string"},
        "release_id": {"type": "integer"},
        "state": {"enum": list(STATES)},
        "reason": {"type": "string", "description": "Why it failed or was rejected; empty otherwise."},
        "updated_at": {"type": "number", "description": "Unix time."},
    }),
    "Device": _object({
        "id": {"type": "string"},
        "profile": {"type": "string"},
        "labels": _LABELS,
        "enrolled_at": {"type": "number", "description": "Unix time."},
        "last_seen": {"type": ["number", "null"], "description": "Unix time; null before the device's first report."},
        "online": {"type": "boolean"},
        "installed_model": _NULLABLE_STRING,
        "installed_version": _NULLABLE_STRING,
        "installed_target": _NULLABLE_STRING,
        "slot": _NULLABLE_STRING,
        "execution": {"anyOf": [_ref("Execution"), {"type": "null"}], "description": "The latest execution."},
        "telemetry": {"anyOf": [_ref("DeviceTelemetry"), {"type": "null"}],
                      "description": "What the device's telemetry says; null before any arrived."},
        "desired_release": {"type": ["integer", "null"], "description": "The release the rollout engine chose for it."},
        "clock": {**_NULLABLE_STRING, "description": "Why the device's wall clock is wrong (behind or ahead of the "
                                                     "time its signed metadata vouches for); null while it is right."},
    }),
    "Stage": _object({
        "label": {"type": "string", "examples": ["1dev", "10%"]},
        "target": {"type": "integer", "description": "Devices this stage covers, cumulative."},
        "assigned": {"type": "integer"}, "active": {"type": "integer"}, "failed": {"type": "integer"},
        "done": {"type": "boolean"},
    }),
    "Gate": _object({
        "name": {"enum": ["install success", "error rate", "p95 latency", "drift"]},
        "value": {"type": "string"}, "threshold": {"type": "string"},
        "ok": {"type": ["boolean", "null"], "description": "null: not enough data yet (the minimum sample)."},
        "detail": {"type": "string"},
    }),
    "Decision": _object({
        "id": {"type": "integer"}, "rollout": {"type": "integer"}, "t": {"type": "number", "description": "Unix time."},
        "actor": {"enum": ["engine", "operator"]},
        "action": {"enum": ["start", "advance", "pause", "resume", "abort", "rollback", "complete", "supersede", "timeout",
                            "withdraw"]},
        "reason": {"type": "string"},
    }),
    "Plan": {"type": "object", "description": "The rollout plan (docs/rollouts.md).",
             "required": ["stages", "bake_s", "min_calls", "abort", "on_failure", "gates", "deadlines_s"]},
    "Rollout": _object({
        "id": {"type": "integer", "description": "The same as its release's id."},
        "model": {"type": "string"}, "version": {"type": "string"}, "selector": _LABELS,
        "profiles": {"type": "array", "items": {"type": "string"}},
        "state": {"enum": ["running", "paused", "completed", "aborted", "rolled-back", "superseded"]},
        "plan": _ref("Plan"),
        "stage": {"type": "integer", "description": "Index of the current stage."},
        "stages": {"type": "array", "items": _ref("Stage")},
        "targeted": {"type": "integer", "description": "Devices matching the selector, with a bundle for their profile."},
        "counts": {"type": "object", "additionalProperties": {"type": "integer"}, "description": "Devices per execution state."},
        "gates": {"type": "array", "items": _ref("Gate")},
        "created_at": {"type": "number"}, "updated_at": {"type": "number"},
        "next": {"type": "string", "description": "What the engine waits for next."},
    }),
    "DeviceTelemetry": _object({
        "received": {"type": "integer", "description": "Records received from the device (each counted once)."},
        "dropped": {"type": "integer", "description": "Records the device dropped because its outbox was full."},
        "inferences": {"type": "integer", "description": "Inference records among its latest 1000 records of that kind."},
        "errors": {"type": "integer", "description": "Failed inferences among those."},
        "p95_ms": {"type": ["number", "null"], "description": "95th percentile runtime latency over those."},
        "metrics": {"type": ["object", "null"], "description": "Its latest device metrics sample (docs/protocol.md)."},
    }),
    "DesiredRelease": _object({
        "release_id": {"type": "integer"},
        "model": {"type": "string"},
        "version": {"type": "string"},
        "target": {"type": "string", "description": "The bundle built for the device's profile."},
        "sha256": {"type": "string"},
        "length": {"type": "integer"},
    }),
    "ReleaseTarget": _object({
        "release_id": {"type": "integer"},
        "profile": {"type": "string"},
        "target": {"type": "string"},
        "sha256": {"type": "string"},
        "length": {"type": "integer"},
    }),
    "Release": _object({
        "id": {"type": "integer"},
        "model": {"type": "string"},
        "version": {"type": "string"},
        "selector": _LABELS,
        "created_at": {"type": "number", "description": "Unix time."},
        "targets": {"type": "array", "items": _ref("ReleaseTarget")},
    }),
    "PushRequest": {
        "type": "object",
        "required": ["bundles"],
        "additionalProperties": False,
        "properties": {
            "bundles": {
                "type": "array", "minItems": 1,
                "description": "The bundles of one model version, at most one per profile.",
                "items": {
                    "type": "object", "required": ["name", "data"], "additionalProperties": False,
                    "properties": {
                        "name": {"type": "string", "pattern": "^[A-Za-z0-9_-][A-Za-z0-9._-]{0,199}$",
                                 "description": "File name; becomes the TUF target name.",
                                 "examples": ["digits-1.1.0-rpi4.edgeops"]},
                        "data": {"type": "string", "contentEncoding": "base64", "description": "The bundle file."},
                    },
                },
            },
            "select": {**_LABELS, "description": "Only devices with these labels; default: every device."},
            "plan": {"type": "object", "additionalProperties": False,
                     "description": "Rollout plan settings, as in a plan file (docs/rollouts.md).",
                     "examples": [{"stages": "1dev,10%,100%", "bake": "10m", "abort": "failed>5%,min=5"}],
                     "properties": {
                         "stages": {"type": ["string", "array"], "items": {"type": ["string", "number"]},
                                    "examples": ["1dev,10%,100%", ["1dev", "100%"]]},
                         "bake": _DURATION, "deadline": _DURATION,
                         "min_calls": {"type": "integer", "minimum": 0},
                         "abort": {"type": "string", "examples": ["failed>5%,min=5"]},
                         "on_failure": {"enum": ["rollback", "pause"]},
                         "gates": {"type": "object", "additionalProperties": False, "properties": {
                             "max_error_increase": {"type": "number", "minimum": 0},
                             "max_latency_ratio": {"type": "number", "minimum": 0},
                             "latency_slack_ms": {"type": "number", "minimum": 0},
                             "drift": {"type": "boolean"}}},
                         "deadlines": {"type": "object", "additionalProperties": False,
                                       "properties": {state: _DURATION for state in IN_FLIGHT}},
                     }},
        },
    },
}
_SCHEMAS["RolloutDetail"] = _object({**_SCHEMAS["Rollout"]["properties"],
                                     "decisions": {"type": "array", "items": _ref("Decision")}})
_ROLLOUT_ID = [{"name": "rollout_id", "in": "path", "required": True,
                "schema": {"type": "integer", "minimum": 1, "maximum": 2**63 - 1}}]
_SCHEMAS["DeviceDetail"] = _object({
    **_SCHEMAS["Device"]["properties"],
    "desired": {"anyOf": [_ref("DesiredRelease"), {"type": "null"}],
                "description": "The release the rollout engine chose for it, with the bundle for its profile."},
    "history": {"type": "array", "items": _ref("Execution"), "description": "Its executions, newest release first."},
})

DOCUMENT: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {
        "title": "edgeops fleet API",
        "version": __version__,
        "description": (
            "Operators' HTTP JSON API of `edgeops fleet serve`, its dashboard (/) and Prometheus metrics "
            "(/metrics). Reads need no token; changes (POST) need `Authorization: Bearer <token>`, the token "
            "being `api_token` in the fleet's fleet.json, and a token that is sent is always checked. Errors are `{\"error\": \"...\"}` with a 4xx status for bad requests and "
            "500 for server faults. Pushes are signed with the targets key kept in the fleet repository; "
            "to sign with an offline targets key, push with `edgeops push --fleet DIR --key KEY` instead."
        ),
    },
    "security": [{"bearer": []}],
    "paths": {
        "/v1/health": _read("Liveness.", "The server is up.", _ref("Health")),
        "/v1/openapi.json": _read("This document.", "OpenAPI 3.1 document.", {"type": "object"}),
        "/v1/status": _read("Everything `edgeops status --json` prints.", "Fleet status.",
                            _object({"devices": {"type": "array", "items": _ref("Device"), "description": (
                                         f"Every device up to {LISTED} of them; past that, those that need "
                                         "attention (GET /v1/devices pages through them all).")},
                                     "device_counts": _object({
                                         "total": {"type": "integer"}, "online": {"type": "integer"},
                                         "states": {"type": "object", "additionalProperties": {"type": "integer"},
                                                    "description": "Devices per state of their latest execution "
                                                                   "(none: no report yet)."}}),
                                     "releases": {"type": "array", "items": _ref("Release")},
                                     "rollouts": {"type": "array", "items": _ref("Rollout"), "description": "Newest first."},
                                     "decisions": {"type": "array", "items": _ref("Decision"),
                                                   "description": "The latest 50, newest first."},
                                     "attention": {"type": "array", "items": _object({
                                         "device": {"type": "string"}, "rollout": {"type": ["integer", "null"]},
                                         "reason": {"type": "string"}})},
                                     "drift": {"type": "array", "items": _object({
                                         "model": {"type": "string"}, "version": {"type": "string"},
                                         "status": {"type": "string"},
                                         "devices": {"type": "array", "items": {"type": "string"}}})}})),
        "/v1/rollouts": _read("Every rollout, newest first.", "Rollouts.",
                              _object({"rollouts": {"type": "array", "items": _ref("Rollout")}})),
        "/v1/rollouts/{rollout_id}": {"parameters": _ROLLOUT_ID, **_read(
            "One rollout with its decisions.", "The rollout.", _ref("RolloutDetail"), **{"404": _error("No such rollout.")})},
        "/v1/rollouts/{rollout_id}/{action}": {
            "parameters": [*_ROLLOUT_ID, {"name": "action", "in": "path", "required": True,
                                          "schema": {"enum": ["pause", "resume", "abort", "rollback"]}}],
            "post": {
                "summary": "Pause, resume, abort or roll back a rollout.",
                "requestBody": {"required": False, "content": {"application/json": {"schema": {
                    "type": "object", "additionalProperties": False,
                    "properties": {"reason": {"type": "string", "description": "Why, for the decision log."}}}}}},
                "responses": {"200": _json("Done; the rollout afterwards.", _ref("RolloutDetail")),
                              "400": _error("The body is not {} or {\"reason\": ...}."),
                              "404": _error("No such rollout or action."),
                              "409": _error("The rollout's state does not allow it (e.g. resuming a completed one)."),
                              **_AUTHED},
            },
        },
        "/v1/series": {
            "parameters": [{"name": "model", "in": "query", "required": False, "schema": {"type": "string"}},
                           {"name": "bucket", "in": "query", "required": False,
                            "schema": {"type": "integer", "minimum": 1, "maximum": 86400, "default": 60}}],
            **_read("Per model version over time: calls, error rate, p95 latency, drift windows and alarms.",
                    "Time series, one per model version.", {"type": "object", "required": ["bucket_s", "versions"]},
                    **{"400": _error("Bad bucket.")}),
        },
        "/metrics": _file("Prometheus exposition: devices by state, rollout progress, ingest counters, drift flags.",
                          "text/plain", "Prometheus text format 0.0.4."),
        "/": _file("The dashboard.", "text/html", "The dashboard's page."),
        "/ui/{name}": {"parameters": [{"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}],
                       **_file("The dashboard's scripts and styles.", "application/octet-stream", "A dashboard file.")},
        "/v1/devices": {
            "parameters": [
                {"name": "limit", "in": "query", "required": False, "description": "Devices per page.",
                 "schema": {"type": "integer", "minimum": 1, "maximum": MAX_PAGE, "default": DEFAULT_PAGE}},
                {"name": "after", "in": "query", "required": False, "schema": {"type": "string", "maxLength": 200},
                 "description": "Start after this device id: the `next` of the previous page."},
                {"name": "online", "in": "query", "required": False, "schema": {"enum": ["true", "false"]},
                 "description": "Only devices online (true) or offline (false)."},
                {"name": "state", "in": "query", "required": False, "schema": {"enum": [*STATES, "none"]},
                 "description": "Only devices whose latest execution is in this state (none: no report yet)."},
                {"name": "q", "in": "query", "required": False, "schema": {"type": "string", "maxLength": 200},
                 "description": "Words separated by spaces, each a case-insensitive substring of the device's id, "
                                "profile, a label as key=value, its latest execution's state or installed version."}],
            **_read("Devices with their latest execution, a page at a time, by id.",
                    "A page of devices. Follow `next` as `after` until it is null for all of them.",
                    _object({"devices": {"type": "array", "items": _ref("Device")},
                             "next": {**_NULLABLE_STRING, "description": "The id to pass as `after` for the "
                                                                         "next page; null on the last page."},
                             "total": {"type": "integer", "description": "Devices matching the filters, in all pages."}}),
                    **{"400": _error("Bad limit, online, state, or a too long after or q.")}),
        },
        "/v1/devices/{device_id}": {
            "parameters": [{"name": "device_id", "in": "path", "required": True, "schema": {"type": "string"}}],
            **_read("One device, with the release it should run.", "The device.", _ref("DeviceDetail"),
                    **{"404": _error("No device with this id is enrolled.")}),
        },
        "/v1/drift": {
            "parameters": [{"name": "model", "in": "query", "required": False, "schema": {"type": "string"},
                            "description": "Only this model; default: every model with drift telemetry."},
                           {"name": "devices", "in": "query", "required": False,
                            "schema": {"enum": ["drifting", "all"], "default": "drifting"},
                            "description": "drifting: each version lists only its devices whose status is not ok, "
                                           "and `device_statuses` counts all its devices per status; all: every "
                                           "device, exactly as `edgeops drift report --json` prints it."}],
            **_read("Drift per model version, merged over devices.",
                    "The drift report (fields: docs/drift.md).",
                    {"type": "object", "required": ["alpha", "psi_floor", "persistence", "versions"],
                     "properties": {"alpha": {"type": "number"}, "psi_floor": {"type": "number"},
                                    "persistence": {"type": "string"},
                                    "versions": {"type": "array", "items": {"type": "object"}}}},
                    **{"400": _error("Bad devices."), "404": _error("No drift telemetry from that model.")}),
        },
        "/v1/releases": {
            **_read("Every release, oldest first.", "Releases.",
                    _object({"releases": {"type": "array", "items": _ref("Release")}})),
            "post": {
                "summary": "Sign bundles of one model version into the repository and release them.",
                "requestBody": {"required": True, "content": {"application/json": {"schema": _ref("PushRequest")}}},
                "responses": {
                    "201": _json("The release was created.", _object({"release": {"type": "integer"}})),
                    "400": _error("Bad JSON, a missing or mistyped field, bad base64, or a bundle refused "
                                  "(the reason says why: tampered, not a bundle, mixed versions, ...)."),
                    "411": _error("No Content-Length."),
                    "413": _error("The body is larger than the server's limit."),
                    "415": _error("The body is not application/json."),
                    **_AUTHED,
                },
            },
        },
    },
    "components": {
        "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer",
                                       "description": "`api_token` from the fleet's fleet.json."}},
        "schemas": _SCHEMAS,
    },
}
